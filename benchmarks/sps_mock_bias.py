"""Does the emulator bias photo-z? The same realistic galaxies made by bagpipes and by the emulator, fitted alike.

Truths: one posterior draw per galaxy from a posterior store of real galaxies (e.g. the zCOSMOS training fits at
their spectroscopic redshifts that ``photoz_real.py``'s ``specz_population`` variant writes), so the parameters,
redshifts and signal-to-noise are those of the real sample. Each truth gets two noiseless photometries, from
bagpipes itself (:class:`popflow.sps.bagpipes_model.BagpipesSimulator`, the SPS the emulator was trained on) and
from the emulator, the same Gaussian noise at the galaxy's catalogue errors, and is fitted by popflow with the
emulator, unit zero points and the emulator's error floor, under the AnalyticPrior with an n(z) of the truths.
The emulator-made mocks are the control (the model is exact there); the difference between the two rows is what
the emulator's error does to the redshifts, with no zero points or missing physics involved. ``--prior`` fits
under another prior instead (e.g. the population prior learned from the same store's draws).

    POPFLOW_FILTER_PATH=../shared/data/zcosmos_bright/filters python benchmarks/sps_mock_bias.py \
        --posterior /tmp/popflow-bench/zcosmos/specz_population_1000_0_d1197f53_fits.zarr --emulator zcosmos_bright --n 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from popflow import metrics
from popflow.calibrate import nz_from_redshifts
from popflow.catalog import open_catalog
from popflow.datamodel import DataModel
from popflow.fit import FitSettings, fit_chunk, mag_to_njy
from popflow.pipeline import load_model, open_posterior
from popflow.priors import AnalyticPrior
from popflow.sps.bagpipes_model import BagpipesSimulator

EDGES = (0.0, 0.3, 0.5, 0.7, 0.9, 1.5, 6.0)


def truths(posterior: Path, names, n: int, seed: int):
    """One random draw (n, dim), columns ``names``, of n random usable galaxies of the store, and those galaxies'
    catalogue rows and catalogue path."""
    tree = open_posterior(posterior)
    usable = np.flatnonzero(tree["sample_stats"]["usable"].values.astype(bool))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(usable, min(n, usable.size), replace=False))
    post = tree["posterior"].to_dataset().isel(galaxy=rows)
    c = rng.integers(post.sizes["chain"], size=rows.size)
    d = rng.integers(post.sizes["draw"], size=rows.size)
    theta = np.stack([post[k].values[np.arange(rows.size), c, d] for k in names], axis=-1)
    return theta.astype(np.float32), rows, tree.attrs["catalog"]


def by_bin(z_point, z_true) -> list[dict]:
    out = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        sel = (z_true >= lo) & (z_true < hi)
        if sel.sum() >= 5:
            m = metrics.photoz_metrics(z_point[sel], z_true[sel])
            out.append({"bin": f"{lo:g}-{hi:g}", "n": int(sel.sum()), "sigma_nmad": m["sigma_nmad"], "bias": m["bias"],
                        "outliers": m["outlier_frac"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posterior", type=Path, required=True, help="posterior store of real galaxies (their truths)")
    ap.add_argument("--emulator", required=True, help="the emulator the store was fitted with")
    ap.add_argument("--prior", default=None, help="fit under this prior (name or folder; default: AnalyticPrior with the truths' n(z))")
    ap.add_argument("--sources", nargs="+", choices=("bagpipes", "emulator"), default=["bagpipes", "emulator"])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    emu = load_model(args.emulator, "emulator")
    theta, rows, catalog = truths(args.posterior, emu.space.names, args.n, args.seed)
    cat = open_catalog(catalog).isel(galaxy=rows)
    filters = tuple(cat.attrs["filters"])
    emu = emu.select(filters)
    err, mask = np.asarray(cat["flux_err"].values, np.float32), np.asarray(cat["mask"].values, bool)
    log_mass = theta[:, emu.space.index("log_mass")]

    mags = {"emulator": np.asarray(emu.magnitudes(theta))}
    if "bagpipes" in args.sources:
        t0 = time.perf_counter()
        mags["bagpipes"] = BagpipesSimulator(filters).magnitudes(theta) - 2.5 * log_mass[:, None]
        print(f"bagpipes: {len(theta)} models in {time.perf_counter() - t0:.1f} s; emulator - bagpipes [mag] median / p68 |.| per band:")
        diff = mags["emulator"] - mags["bagpipes"]
        for b, col, m in zip(emu.bands, diff.T, mask.T):
            print(f"  {b}: {np.median(col[m]):+.3f} / {np.percentile(np.abs(col[m]), 68):.3f}")

    noise = np.random.default_rng(args.seed + 1).standard_normal(err.shape).astype(np.float32)
    z_true = theta[:, emu.space.index("redshift")].astype(np.float64)
    prior = AnalyticPrior(space=emu.space, nz=nz_from_redshifts(z_true)) if args.prior is None else load_model(args.prior, "prior")
    settings = FitSettings()
    dm = DataModel.from_emulator(emu)
    results = {}
    for source in args.sources:
        m = mags[source]
        flux = np.asarray(mag_to_njy(m)) + err * noise
        t0 = time.perf_counter()
        out = fit_chunk(jax.random.key(args.seed), flux, err, mask, emulator=emu, prior=prior, datamodel=dm, settings=settings)
        z = out["samples"][..., emu.space.index("redshift")].reshape(len(theta), -1)
        z_point = np.median(z, axis=1)
        overall = metrics.photoz_metrics(z_point, z_true)
        lo, hi = np.percentile(z, [16, 84], axis=1)
        results[source] = {"overall": {"sigma_nmad": overall["sigma_nmad"], "bias": overall["bias"],
                                       "outliers": overall["outlier_frac"],
                                       "coverage_68": float(np.mean((z_true >= lo) & (z_true <= hi)))},
                           "by_redshift": by_bin(z_point, z_true), "seconds": time.perf_counter() - t0}
        print(f"{source}-made mocks: {json.dumps(results[source]['overall'])} ({results[source]['seconds']:.0f} s)")
    print("\n| z_true bin | n | " + " | ".join(f"{k} mocks: sigma_NMAD | bias | outliers" for k in args.sources) + " |")
    print("|---|---|" + "---|---|---|" * len(args.sources))
    for rows_ in zip(*(results[k]["by_redshift"] for k in args.sources)):
        print(f"| {rows_[0]['bin']} | {rows_[0]['n']} | " + " | ".join(
            f"{r['sigma_nmad']:.4f} | {r['bias']:+.4f} | {100 * r['outliers']:.1f}%" for r in rows_) + " |")
    for k in args.sources:
        o = results[k]["overall"]
        print(f"all ({k} mocks): {len(theta)} galaxies, sigma_NMAD {o['sigma_nmad']:.4f}, bias {o['bias']:+.4f}, "
              f"outliers {100 * o['outliers']:.1f}%, 68% coverage {o['coverage_68']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
