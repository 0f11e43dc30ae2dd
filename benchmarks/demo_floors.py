"""How the demo's calibration depends on the error floor: LSST mocks fitted under several floors.

    python benchmarks/demo_floors.py --n 100 [--model-error 0.0] [--floor 0.015] [--settings '{"n_burn": 2400}']

The mock is the demo catalogue's recipe (:func:`popflow.mock.simulate_catalog`, shipped ``lsst`` emulator,
AnalyticPrior, seed 1, photerr 10-year noise) with ``--model-error`` mag of Gaussian model error per band
(the shipped demo uses 0.03; 0 reproduces the earlier demo catalogue). Its first ``--n`` galaxies are fitted
with :func:`popflow.fit.fit_chunk` (one chunk, no Dask), the AnalyticPrior and a data model whose floor is
``--floor`` mag in every band (default: the emulator's own, ``DataModel.from_emulator``), under
``FitSettings(**settings)`` (``--demo-settings``: the demo's). Prints the redshift point metrics, the 68 / 95 %
coverage of redshift and the 68 % coverage of log_mass, the converged fraction, the median R-hat and the
fraction of galaxies whose true parameters fit better than every draw (a missed mode).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from popflow.datamodel import DataModel
from popflow.demo import demo_settings
from popflow.emulator import Emulator
from popflow.fit import FitSettings, fit_chunk, mag_to_njy
from popflow.metrics import photoz_metrics
from popflow.mock import simulate_catalog
from popflow.priors import AnalyticPrior


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="galaxies fitted (the first n of 1000 mocks)")
    ap.add_argument("--model-error", type=float, default=0.0, help="mock model error per band [mag]")
    ap.add_argument("--floor", type=float, default=None, help="fit floor per band [mag] (default: the emulator's)")
    ap.add_argument("--settings", default="{}", help="FitSettings overrides as JSON")
    ap.add_argument("--demo-settings", action="store_true", help="start from popflow.demo.demo_settings()")
    a = ap.parse_args()
    emu, prior = Emulator.load("lsst"), AnalyticPrior()
    df = simulate_catalog(1, 1000, emulator=emu, prior=prior, bands="lsst", model_error=a.model_error)[: a.n]
    dm = DataModel.from_emulator(emu) if a.floor is None else DataModel.from_magnitude_floor([a.floor] * len(emu.bands))
    base = demo_settings().to_dict() if a.demo_settings else {}
    settings = FitSettings(**(base | json.loads(a.settings)))
    bands = "ugrizy"
    flux = np.stack([df[f"{b}_cModelFlux"].to_numpy() for b in bands], 1).astype(np.float32)
    err = np.stack([df[f"{b}_cModelFluxErr"].to_numpy() for b in bands], 1).astype(np.float32)
    mask = np.ones_like(flux, bool)
    names = emu.space.names
    truth = np.stack([df[f"true_{k}"].to_numpy() for k in names], 1)
    t0 = time.perf_counter()
    out = fit_chunk(jax.random.PRNGKey(0), flux, err, mask, emulator=emu, prior=prior, datamodel=dm, settings=settings)
    seconds = time.perf_counter() - t0
    z = out["samples"][..., names.index("redshift")].reshape(a.n, -1)
    z_true = truth[:, names.index("redshift")]
    m = photoz_metrics(np.median(z, 1), z_true)
    q = np.percentile(z, [16, 84, 2.5, 97.5], axis=1)
    mass = out["samples"][..., names.index("log_mass")].reshape(a.n, -1)
    qm = np.percentile(mass, [16, 84], axis=1)
    ll_true = np.asarray(dm.log_likelihood(mag_to_njy(emu.magnitudes(jnp.asarray(truth))), flux, err, mask))
    missed = ll_true > out["log_likelihood"].reshape(a.n, -1).max(1)
    print(f"n {a.n}, model error {a.model_error} mag, floor {a.floor if a.floor is not None else 'emulator'}, "
          f"settings {json.loads(a.settings)}{' (demo)' if a.demo_settings else ''}: {seconds:.0f} s")
    print(f"sigma_NMAD {m['sigma_nmad']:.4f}  bias {m['bias']:+.4f}  outliers {m['outlier_frac']:.1%}  "
          f"RAIL outliers {m['rail_outlier_frac']:.1%}")
    print(f"z coverage 68/95% {np.mean((z_true >= q[0]) & (z_true <= q[1])):.2f} / {np.mean((z_true >= q[2]) & (z_true <= q[3])):.2f}  "
          f"log_mass 68% {np.mean((truth[:, 0] >= qm[0]) & (truth[:, 0] <= qm[1])):.2f}  "
          f"converged {out['converged'].mean():.0%}  R-hat median {np.median(out['rhat']):.3f}  truth above every draw {missed.mean():.0%}")


if __name__ == "__main__":
    main()
