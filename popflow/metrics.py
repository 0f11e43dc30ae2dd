"""Photometric-redshift metrics (pure NumPy) and the two standard diagnostic plots.

Conventions (SCIENCE.md, "Photo-z metrics"):

- e = (z_phot - z_spec) / (1 + z_spec);
- bias = median(e); sigma_NMAD = 1.4826 median|e - median(e)|;
- outliers: |e| > 0.15 (COSMOS: Ilbert et al. 2006, 2009; pop-cosmos, Thorp et al. 2024)
  and |e| > max(0.06, 3 sigma_IQR), sigma_IQR = IQR(e) / 1.349 (LSST DESC RAIL,
  Schmidt et al. 2020);
- PIT_i = CDF_i(z_spec,i), uniform for calibrated p(z) (KS and Cramer-von Mises statistics
  against U(0, 1));
- CRPS_i = integral of (CDF_i(z) - H(z - z_spec,i))^2 dz (Gneiting & Raftery 2007);
- coverage of the central 68% / 95% credible intervals = fraction of PIT values inside
  [(1 - c)/2, (1 + c)/2].

A p(z) is given either as samples (n_gal, n_samp) (optionally weighted, e.g. importance
weights after reweighting) or as a density on a grid: z_grid (n_z,), pz (n_gal, n_z).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NMAD_SCALE = 1.4826
IQR_SCALE = 1.349
COSMOS_OUTLIER = 0.15
RAIL_OUTLIER_MIN = 0.06
COVERAGE_LEVELS = (0.68, 0.95)


def scaled_errors(z_phot, z_spec) -> np.ndarray:
    """e = (z_phot - z_spec) / (1 + z_spec); shapes (n,) -> (n,)."""
    z_phot = np.asarray(z_phot, dtype=np.float64)
    z_spec = np.asarray(z_spec, dtype=np.float64)
    return (z_phot - z_spec) / (1.0 + z_spec)


def bias(e) -> float:
    """Median of the scaled errors e."""
    return float(np.median(e))


def sigma_nmad(e) -> float:
    """Normalised median absolute deviation 1.4826 median|e - median(e)|."""
    e = np.asarray(e)
    return float(NMAD_SCALE * np.median(np.abs(e - np.median(e))))


def sigma_iqr(e) -> float:
    """Interquartile range of e divided by 1.349 (a Gaussian's sigma)."""
    q25, q75 = np.percentile(e, [25.0, 75.0])
    return float((q75 - q25) / IQR_SCALE)


def outlier_fraction(e, threshold: float = COSMOS_OUTLIER) -> float:
    """Fraction of |e| > threshold (0.15: the COSMOS convention)."""
    return float(np.mean(np.abs(np.asarray(e)) > threshold))


def rail_outlier_threshold(e) -> float:
    """RAIL's catastrophic-outlier cut max(0.06, 3 sigma_IQR)."""
    return max(RAIL_OUTLIER_MIN, 3.0 * sigma_iqr(e))


def pit_from_samples(samples, z_spec, weights=None) -> np.ndarray:
    """PIT_i = fraction (weighted) of the samples of galaxy i below z_spec,i.

    samples: (n_gal, n_samp); z_spec: (n_gal,); weights: optional (n_gal, n_samp),
    non-negative, normalised per galaxy here. NaN samples carry no weight.
    Returns (n_gal,) in [0, 1] (NaN for a galaxy without any finite sample).
    """
    samples = np.asarray(samples, dtype=np.float64)
    z_spec = np.asarray(z_spec, dtype=np.float64)
    w = _sample_weights(samples, weights)
    below = (samples <= z_spec[:, None]) & np.isfinite(samples)
    return np.sum(w * below, axis=1)


def pit_from_grid(z_grid, pz, z_spec) -> np.ndarray:
    """PIT_i = CDF_i(z_spec,i) for densities pz (n_gal, n_z) tabulated on z_grid (n_z,).

    The density is taken piecewise linear between grid points and renormalised to unit
    integral over the grid; z_spec outside the grid gives 0 or 1.
    """
    z_grid = np.asarray(z_grid, dtype=np.float64)
    cdf = _grid_cdf(z_grid, pz)
    return np.array([np.interp(zs, z_grid, c, left=0.0, right=1.0) for zs, c in zip(np.asarray(z_spec, np.float64), cdf)])


def ks_uniform(pit) -> float:
    """Kolmogorov-Smirnov distance between the PIT values and U(0, 1)."""
    pit = np.sort(np.asarray(pit, dtype=np.float64))
    n = pit.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - pit), np.max(pit - (i - 1) / n)))


def cvm_uniform(pit) -> float:
    """Cramer-von Mises statistic T = 1/(12n) + sum_i ((2i - 1)/(2n) - u_(i))^2 against U(0, 1)."""
    pit = np.sort(np.asarray(pit, dtype=np.float64))
    n = pit.size
    i = np.arange(1, n + 1)
    return float(1.0 / (12 * n) + np.sum(((2 * i - 1) / (2 * n) - pit) ** 2))


def coverage(pit, level: float) -> float:
    """Fraction of truths inside the central `level` credible interval, from PIT values."""
    pit = np.asarray(pit)
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    return float(np.mean((pit >= lo) & (pit <= hi)))


def crps_from_samples(samples, z_spec, weights=None) -> np.ndarray:
    """CRPS of the (weighted) empirical distribution of the samples, per galaxy.

    CRPS = E|X - y| - 1/2 E|X - X'| (Gneiting & Raftery 2007, eq. 21), evaluated exactly for
    the empirical CDF with sorted samples and cumulative sums, O(n log n) per galaxy.
    samples (n_gal, n_samp), z_spec (n_gal,) -> (n_gal,) in redshift units.
    """
    samples = np.asarray(samples, dtype=np.float64)
    y = np.asarray(z_spec, dtype=np.float64)
    w = _sample_weights(samples, weights)
    x = np.where(np.isfinite(samples), samples, 0.0)
    order = np.argsort(x, axis=1)
    x = np.take_along_axis(x, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    term1 = np.sum(w * np.abs(x - y[:, None]), axis=1)
    # sum_ij w_i w_j |x_i - x_j| = 2 sum_i w_i (x_i W_<i - S_<i) for sorted x
    w_before = np.cumsum(w, axis=1) - w
    s_before = np.cumsum(w * x, axis=1) - w * x
    pair = 2.0 * np.sum(w * (x * w_before - s_before), axis=1)
    out = term1 - 0.5 * pair
    return np.where(np.any(np.isfinite(samples), axis=1), out, np.nan)


def crps_from_grid(z_grid, pz, z_spec) -> np.ndarray:
    """CRPS per galaxy for densities pz (n_gal, n_z) on z_grid (n_z,) (trapezoid rule).

    Below z_spec the integrand is CDF^2, above it (1 - CDF)^2; the cumulative integrals are
    interpolated at z_spec, and a z_spec outside the grid adds its distance to the grid edge.
    """
    z = np.asarray(z_grid, dtype=np.float64)
    y = np.asarray(z_spec, dtype=np.float64)
    cdf = _grid_cdf(z, pz)
    dz = np.diff(z)
    below = np.concatenate([np.zeros((cdf.shape[0], 1)), np.cumsum(0.5 * dz * (cdf[:, 1:] ** 2 + cdf[:, :-1] ** 2), axis=1)], axis=1)
    tail = (1.0 - cdf) ** 2
    above_cum = np.concatenate([np.zeros((cdf.shape[0], 1)), np.cumsum(0.5 * dz * (tail[:, 1:] + tail[:, :-1]), axis=1)], axis=1)
    above = above_cum[:, -1:] - above_cum
    out = np.empty(y.shape)
    for i, yi in enumerate(y):
        yc = np.clip(yi, z[0], z[-1])
        out[i] = np.interp(yc, z, below[i]) + np.interp(yc, z, above[i]) + abs(yi - yc)
    return out


def photoz_metrics(z_phot=None, z_spec=None, *, samples=None, weights=None, z_grid=None, pz=None) -> dict:
    """All point and p(z) metrics in one dict of floats.

    z_phot (n,): point estimates (default: the weighted median of `samples`); z_spec (n,).
    Optional p(z): `samples` (n, n_samp) with optional `weights`, or `z_grid` (n_z,) + `pz`
    (n, n_z). Galaxies with a non-finite z_phot (failed fits) are left out of every metric
    and counted in `n_missing`.

    Keys: n, n_missing, bias, sigma_nmad, sigma_iqr, outlier_frac (|e| > 0.15),
    rail_outlier_threshold, rail_outlier_frac; with a p(z) also pit_ks, pit_cvm, crps,
    coverage_68, coverage_95.
    """
    if z_spec is None:
        raise ValueError("photoz_metrics needs z_spec")
    z_spec = np.asarray(z_spec, dtype=np.float64)
    if z_phot is None:
        if samples is None:
            raise ValueError("photoz_metrics needs z_phot or samples")
        z_phot = weighted_quantile(samples, 0.5, weights)
    z_phot = np.asarray(z_phot, dtype=np.float64)
    if z_phot.shape != z_spec.shape or z_spec.ndim != 1:
        raise ValueError(f"z_phot {z_phot.shape} and z_spec {z_spec.shape} must be equal 1-D shapes")
    if not np.all(np.isfinite(z_spec)):
        raise ValueError(f"z_spec has {int(np.sum(~np.isfinite(z_spec)))} non-finite values; select the galaxies with a redshift first")
    ok = np.isfinite(z_phot)
    if not np.any(ok):
        raise ValueError("no galaxy has a finite z_phot")
    e = scaled_errors(z_phot[ok], z_spec[ok])
    out = {
        "n": int(ok.sum()),
        "n_missing": int((~ok).sum()),
        "bias": bias(e),
        "sigma_nmad": sigma_nmad(e),
        "sigma_iqr": sigma_iqr(e),
        "outlier_frac": outlier_fraction(e, COSMOS_OUTLIER),
        "rail_outlier_threshold": rail_outlier_threshold(e),
    }
    out["rail_outlier_frac"] = outlier_fraction(e, out["rail_outlier_threshold"])
    if samples is not None:
        s = np.asarray(samples)[ok]
        w = None if weights is None else np.asarray(weights)[ok]
        pit = pit_from_samples(s, z_spec[ok], w)
        crps = crps_from_samples(s, z_spec[ok], w)
    elif pz is not None:
        if z_grid is None:
            raise ValueError("pz needs z_grid")
        pit = pit_from_grid(z_grid, np.asarray(pz)[ok], z_spec[ok])
        crps = crps_from_grid(z_grid, np.asarray(pz)[ok], z_spec[ok])
    else:
        return out
    out["pit_ks"] = ks_uniform(pit)
    out["pit_cvm"] = cvm_uniform(pit)
    out["crps"] = float(np.mean(crps))
    for level in COVERAGE_LEVELS:
        out[f"coverage_{round(100 * level)}"] = coverage(pit, level)
    return out


def weighted_quantile(samples, q: float, weights=None) -> np.ndarray:
    """Per-row q-quantile of samples (n, n_samp) with optional weights (inverted weighted CDF, midpoint rule)."""
    samples = np.asarray(samples, dtype=np.float64)
    if weights is None:
        out = np.full(samples.shape[0], np.nan)
        rows = np.any(np.isfinite(samples), axis=1)
        out[rows] = np.nanquantile(samples[rows], q, axis=1)
        return out
    w = _sample_weights(samples, weights)
    x = np.where(np.isfinite(samples), samples, np.inf)
    order = np.argsort(x, axis=1)
    x = np.take_along_axis(x, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    cw = np.cumsum(w, axis=1) - 0.5 * w
    return np.array([np.interp(q, c, xi) if np.isfinite(xi[0]) else np.nan for c, xi in zip(cw, x)])


def format_metrics(metrics: dict) -> str:
    """Human-readable one-metric-per-line text of a photoz_metrics dict."""
    lines = []
    for key, value in metrics.items():
        lines.append(f"{key:>24s}  {value:d}" if isinstance(value, int) else f"{key:>24s}  {value:.4f}")
    return "\n".join(lines)


def plot_zphot_zspec(z_phot, z_spec, path, *, title: str | None = None, z_max: float | None = None) -> Path:
    """Write a z_phot vs z_spec density plot (log-count 2-D histogram, 1:1 and |e| = 0.15 lines) as PNG."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    z_phot = np.asarray(z_phot, dtype=np.float64)
    z_spec = np.asarray(z_spec, dtype=np.float64)
    ok = np.isfinite(z_phot) & np.isfinite(z_spec)
    top = z_max if z_max is not None else 1.05 * float(max(np.max(z_spec[ok]), np.percentile(z_phot[ok], 99.5)))
    fig = Figure(figsize=(5.2, 4.5), dpi=120)
    ax = fig.add_subplot()
    h = ax.hist2d(z_spec[ok], z_phot[ok], bins=80, range=[[0, top], [0, top]], norm=LogNorm(), cmap="viridis")
    fig.colorbar(h[3], ax=ax, label="galaxies")
    grid = np.linspace(0, top, 2)
    ax.plot(grid, grid, "k-", lw=0.8)
    for s in (1, -1):
        ax.plot(grid, grid + s * COSMOS_OUTLIER * (1 + grid), "k--", lw=0.6)
    m = photoz_metrics(z_phot[ok], z_spec[ok])
    ax.text(0.03, 0.97, f"N = {m['n']}\nbias = {m['bias']:+.4f}\n$\\sigma_{{NMAD}}$ = {m['sigma_nmad']:.4f}\n"
            f"$f_{{out}}$ = {100 * m['outlier_frac']:.1f}%", transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(facecolor="white", alpha=0.8, lw=0))
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="$z_{spec}$", ylabel="$z_{phot}$", title=title or "")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_pit(pit, path, *, title: str | None = None, bins: int = 20) -> Path:
    """Write a PIT histogram (density) with the uniform line and its +-2 sigma Poisson band as PNG."""
    from matplotlib.figure import Figure

    pit = np.asarray(pit, dtype=np.float64)
    pit = pit[np.isfinite(pit)]
    fig = Figure(figsize=(5.2, 3.6), dpi=120)
    ax = fig.add_subplot()
    ax.hist(pit, bins=bins, range=(0, 1), density=True, color="C0", alpha=0.8)
    expected = pit.size / bins
    band = 2 * np.sqrt(expected) / expected
    ax.axhspan(1 - band, 1 + band, color="k", alpha=0.12, lw=0)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.text(0.03, 0.95, f"N = {pit.size}\nKS = {ks_uniform(pit):.4f}", transform=ax.transAxes, va="top", fontsize=8)
    ax.set(xlim=(0, 1), xlabel="PIT", ylabel="density", title=title or "")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _sample_weights(samples: np.ndarray, weights) -> np.ndarray:
    """Per-row normalised weights (n_gal, n_samp); NaN samples get zero weight."""
    finite = np.isfinite(samples)
    w = np.ones_like(samples) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != samples.shape:
        raise ValueError(f"weights {w.shape} must match samples {samples.shape}")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    w = np.where(finite, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def _grid_cdf(z_grid: np.ndarray, pz) -> np.ndarray:
    """CDF (n_gal, n_z) at the grid points of densities pz (n_gal, n_z), normalised to end at 1."""
    pz = np.asarray(pz, dtype=np.float64)
    if pz.ndim != 2 or pz.shape[1] != z_grid.size:
        raise ValueError(f"pz {pz.shape} must be (n_gal, {z_grid.size}) to match z_grid")
    if np.any(pz < 0):
        raise ValueError("pz must be non-negative")
    steps = 0.5 * np.diff(z_grid) * (pz[:, 1:] + pz[:, :-1])
    cum = np.concatenate([np.zeros((pz.shape[0], 1)), np.cumsum(steps, axis=1)], axis=1)
    total = cum[:, -1:]
    if np.any(total <= 0):
        raise ValueError(f"{int(np.sum(total <= 0))} p(z) rows integrate to zero on the grid")
    return cum / total


# ----------------------------------------------------------------------------- shell: stores in, report out

def evaluate_posterior(posterior, *, truth: str = "z_spec", catalog=None, prior=None, out_dir=None,
                       point: str = "median", z_min: float | None = None) -> dict:
    """Photo-z metrics of a posterior store against a truth column of its catalogue.

    posterior: a popflow posterior store; catalog: the catalogue store holding ``truth``
    (default: the one the store records in its ``catalog`` attribute); prior: evaluate the
    importance-reweighted posterior under this prior (object, name or folder). Galaxies are
    matched by ``galaxy_id``; those without a finite truth (or with truth <= ``z_min``) are
    left out. ``point``: "median" or "mode" of the redshift draws. With ``out_dir``,
    writes ``zphot_zspec.png`` and ``pit.png`` there. Returns the :func:`photoz_metrics` dict
    plus ``plots`` (paths) and ``n_no_truth``.
    """
    from popflow.catalog import open_catalog
    from popflow.pipeline import open_posterior

    tree = open_posterior(posterior, prior=prior)
    attrs = dict(tree.attrs)
    catalog = catalog if catalog is not None else attrs.get("catalog")
    if catalog is None:
        raise ValueError(f"{posterior}: the store records no catalogue; pass the catalogue holding {truth!r}")
    cat = open_catalog(catalog)
    if truth not in cat:
        raise ValueError(f"{catalog}: no variable {truth!r} (it has: {', '.join(cat.data_vars)})")
    post = tree["posterior"].to_dataset(inherit=False)
    if "redshift" not in post:
        raise ValueError(f"{posterior}: /posterior has no 'redshift' variable")
    z = post["redshift"]
    samples = np.asarray(z.values, np.float64).reshape(z.sizes["galaxy"], -1)
    weights = None
    view = attrs.get("weights_prior_id")
    if view is not None:
        lw = np.asarray(tree[f"weights/{view}"]["log_weight"].values, np.float64).reshape(samples.shape)
        lw = np.where(np.isfinite(lw), lw, -np.inf)
        top = np.max(lw, axis=1, keepdims=True)
        weights = np.exp(lw - np.where(np.isfinite(top), top, 0.0))
    ids_post = np.asarray(post["galaxy_id"].values) if "galaxy_id" in post.coords else None
    ids_cat = np.asarray(cat["galaxy_id"].values)
    zt_all = np.asarray(cat[truth].values, np.float64)
    if ids_post is not None:
        pos = {g: i for i, g in enumerate(ids_cat.tolist())}
        missing = [g for g in ids_post.tolist() if g not in pos]
        if missing:
            raise ValueError(f"{posterior}: {len(missing)} galaxies (e.g. {missing[0]!r}) are not in catalogue {catalog}")
        z_true = zt_all[[pos[g] for g in ids_post.tolist()]]
    else:
        if samples.shape[0] > zt_all.size:
            raise ValueError(f"{posterior} has {samples.shape[0]} galaxies, catalogue {catalog} only {zt_all.size}")
        z_true = zt_all[: samples.shape[0]]
    keep = np.isfinite(z_true) & ((z_true > z_min) if z_min is not None else True)
    samples, z_true = samples[keep], z_true[keep]
    weights = None if weights is None else weights[keep]
    if point == "median":
        z_phot = weighted_quantile(samples, 0.5, weights)
    elif point == "mode":
        z_phot = _sample_mode(samples, weights)
    else:
        raise ValueError(f"point={point!r}: choose 'median' or 'mode'")
    out = photoz_metrics(z_phot, z_true, samples=samples, weights=weights)
    out["n_no_truth"] = int((~keep).sum())
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ok = np.isfinite(z_phot)
        pit = pit_from_samples(samples[ok], z_true[ok], None if weights is None else weights[ok])
        name = Path(str(posterior)).name
        out["plots"] = [str(plot_zphot_zspec(z_phot, z_true, out_dir / "zphot_zspec.png", title=name)),
                        str(plot_pit(pit, out_dir / "pit.png", title=name))]
    return out


def _sample_mode(samples: np.ndarray, weights=None, width: float = 0.01) -> np.ndarray:
    """Per-row mode of (weighted) samples: the fullest bin of width ``width`` (redshift units), its centre."""
    w = _sample_weights(samples, weights)
    out = np.full(samples.shape[0], np.nan)
    for i, (x, wi) in enumerate(zip(samples, w)):
        ok = np.isfinite(x) & (wi > 0)
        if not ok.any():
            continue
        lo = np.floor(x[ok].min() / width) * width
        idx = np.floor((x[ok] - lo) / width).astype(int)
        out[i] = lo + (np.argmax(np.bincount(idx, weights=wi[ok])) + 0.5) * width
    return out
