"""Mock catalogues from popflow's own forward model, with their true parameters kept.

A mock galaxy is a draw theta from a population prior, its apparent magnitudes
from an emulator, optionally an independent Gaussian model error of
``model_error`` mag per band (the galaxy's SED departing from the model's: real
galaxies differ from any SPS model by a few hundredths of a magnitude, the
error floors calibrated on real catalogues in BENCHMARKS.md), and LSST-like noise from photerr (Crenshaw et al. 2024,
``photerr.LsstErrorModel``: the Ivezic et al. 2019 error model, 10-year depth by
default). Noise is drawn in flux (photerr ``outputType="maggy"``), so faint
galaxies keep negative fluxes, as real forced photometry does. Galaxies are kept
when the emulator is inside its domain and the true magnitude in ``select_band``
is brighter than ``mag_limit`` (default i < 25.3, the LSST gold sample).

The table has the column names of a band set (``popflow ingest --bands NAME``
reads it as it is): the id column, flux and error columns in nJy, plus
``true_<parameter>`` for every parameter and ``true_mag_<band>`` for every band (the
emulator's magnitudes, before the model error).

Regenerate the shipped demo catalogue with::

    python -m popflow.mock --emulator lsst --bands lsst --n 1000 --seed 1 --model-error 0.03 \\
        --out popflow/data/catalogs/lsst_demo.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["simulate_catalog", "main"]

NJY_PER_MAGGY = 3631e9  # 1 maggy = 3631 Jy


def simulate_catalog(seed: int, n: int, *, emulator, prior, bands="lsst", mag_limit: float = 25.3,
                     select_band: str = "i", n_years: float = 10.0, model_error: float = 0.0, batch: int = 20_000):
    """Draw ``n`` mock galaxies; returns a pandas DataFrame (columns: module docstring).

    Args:
        seed: seeds both the prior draws (JAX) and the noise (NumPy).
        n: number of galaxies kept after the selection.
        emulator: an :class:`~popflow.emulator.Emulator` covering the band set's filters.
        prior: a prior with ``sample(key, n)`` over the emulator's parameter space.
        bands: band-set name or :class:`~popflow.catalog.BandSet`; its band names must be
            photerr LSST bands (u, g, r, i, z, y).
        mag_limit, select_band: keep galaxies with true magnitude in ``select_band`` < ``mag_limit``.
        n_years: survey duration for photerr's depths.
        model_error: rms [mag] of the Gaussian model error added to every band before the noise
            (a fit should then add it to its error floor); 0 for photometry exactly on the model.
        batch: prior draws per round of rejection.
    """
    import jax
    import pandas as pd
    from photerr import LsstErrorModel

    from popflow.catalog import load_bandset

    if not model_error >= 0.0:
        raise ValueError(f"model_error={model_error} must be a non-negative magnitude")
    bandset = load_bandset(bands)
    names = list(bandset.band_names)
    model = LsstErrorModel(nYrObs=n_years, outputType="maggy")
    known = list(model.getLimitingMags())
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(f"band set {bandset.name}: bands {unknown} are not photerr LSST bands {known}")
    if select_band not in names:
        raise ValueError(f"select_band {select_band!r} is not in band set {bandset.name} ({', '.join(names)})")
    emu = emulator.select(bandset.filters)
    if prior.space.names != emu.space.names:
        raise ValueError(f"prior parameters {prior.space.names} differ from the emulator's {emu.space.names}")
    mags_fn = jax.jit(lambda t: (emu.magnitudes(t), emu.in_domain(t)))

    key = jax.random.PRNGKey(seed)
    thetas, mags, kept, rounds = [], [], 0, 0
    while kept < n:
        key, sub = jax.random.split(key)
        theta = np.asarray(prior.sample(sub, batch), np.float32)
        m, inside = (np.asarray(a) for a in mags_fn(theta))
        ok = inside & np.all(np.isfinite(m), axis=1) & (m[:, names.index(select_band)] < mag_limit)
        thetas.append(theta[ok])
        mags.append(m[ok])
        kept += int(ok.sum())
        rounds += 1
        if rounds > 1000 and kept == 0:
            raise RuntimeError(f"no prior draw passes {select_band} < {mag_limit} in {rounds * batch} draws")
    theta = np.concatenate(thetas)[:n]
    mag = np.concatenate(mags)[:n].astype(np.float64)

    rng = np.random.default_rng(seed)
    observed = mag + model_error * rng.standard_normal(mag.shape) if model_error > 0 else mag
    noisy = model(pd.DataFrame(observed, columns=names), random_state=rng)
    out = {bandset.id_column or "id": np.arange(n, dtype=np.int64)}
    for b in bandset.bands:
        out[b.column] = (noisy[b.name].to_numpy() * NJY_PER_MAGGY).astype(np.float32)
        out[b.error] = (noisy[f"{b.name}_err"].to_numpy() * NJY_PER_MAGGY).astype(np.float32)
    for i, p in enumerate(emu.space.names):
        out[f"true_{p}"] = theta[:, i]
    for j, b in enumerate(names):
        out[f"true_mag_{b}"] = mag[:, j].astype(np.float32)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    """``python -m popflow.mock``: write a mock catalogue (Parquet or CSV, by the --out suffix)."""
    from popflow.emulator import Emulator
    from popflow.priors import AnalyticPrior, load_prior

    p = argparse.ArgumentParser(prog="python -m popflow.mock", description=__doc__.splitlines()[0])
    p.add_argument("--emulator", default="lsst", help="shipped emulator name or artifact folder")
    p.add_argument("--prior", default=None, help="shipped prior name or artifact folder (default: the analytic prior)")
    p.add_argument("--bands", default="lsst", help="band set (names the columns)")
    p.add_argument("--n", type=int, default=1000, help="galaxies")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mag-limit", type=float, default=25.3)
    p.add_argument("--select-band", default="i")
    p.add_argument("--model-error", type=float, default=0.0, help="Gaussian model error per band [mag] (module docstring)")
    p.add_argument("--out", required=True, help="output table (.parquet or .csv)")
    a = p.parse_args(argv)
    df = simulate_catalog(a.seed, a.n, emulator=Emulator.load(a.emulator), prior=AnalyticPrior() if a.prior is None else load_prior(a.prior), bands=a.bands,
                          mag_limit=a.mag_limit, select_band=a.select_band, model_error=a.model_error)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        df.to_csv(out, index=False, float_format="%.7g")
    else:
        df.to_parquet(out, index=False)
    print(f"wrote {len(df)} galaxies to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
