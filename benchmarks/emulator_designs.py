"""Issue 7: two emulator artifacts (e.g. design "trunk" against design "spectral") on the same validation set.

    python benchmarks/emulator_designs.py BASELINE CANDIDATE [--bands lsst,sdss] [--n-speed 10000]
        [--validation tests/data/emulator_validation/validation_prior.npz]

``BASELINE`` and ``CANDIDATE`` are emulator artifact folders (or shipped names)
covering the filters of the shipped band sets named in ``--bands``. Both are
measured on the committed validation set (bagpipes models drawn from the analytic
prior, unit-mass magnitudes): median and 95th percentile |dm| per band and per
redshift slice (both sides capped as in :func:`popflow.emulator.train.accuracy_table`),
then emulated magnitudes per second for ``--n-speed`` galaxies (jit, best of 3; one process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from popflow.catalog import load_bandset
from popflow.emulator import Emulator
from popflow.emulator.train import accuracy_table

DEFAULT_VALIDATION = Path(__file__).resolve().parent.parent / "tests" / "data" / "emulator_validation" / "validation_prior.npz"


def _rate(fn, theta) -> float:
    """Galaxies per second of a jitted ``fn`` on ``theta`` (best of 3 after a warm-up call)."""
    fn(theta).block_until_ready()
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        fn(theta).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return theta.shape[0] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--bands", default="lsst", help="comma-separated shipped band sets")
    ap.add_argument("--validation", default=str(DEFAULT_VALIDATION))
    ap.add_argument("--n-speed", type=int, default=10_000)
    args = ap.parse_args()
    with np.load(args.validation) as z:
        theta, mags, filters = z["theta"], z["mag_unit"], [str(f) for f in z["filters"]]
    full = {"baseline": Emulator.load(args.baseline), "candidate": Emulator.load(args.candidate)}
    print(f"validation: {args.validation}, {len(theta)} models; baseline {args.baseline} "
          f"({full['baseline'].meta['architecture']['design']}), candidate {args.candidate} "
          f"({full['candidate'].meta['architecture']['design']})")
    for name in args.bands.split(","):
        bandset = load_bandset(name)
        emus = {label: e.select(bandset.filters) for label, e in full.items()}
        cols = [filters.index(f) for f in bandset.filters]
        acc_a, acc_b = (accuracy_table(emus[k], theta, mags[:, cols]) for k in ("baseline", "candidate"))
        print(f"\n### {name}: median / p95 |dm| (mag), baseline -> candidate")
        print("| band | all | " + " | ".join(f"z {s['z_lo']}-{s['z_hi']}" for s in acc_b["by_z"]) + " |")
        print("|---|---|" + "---|" * len(acc_b["by_z"]))
        for i, b in enumerate(bandset.band_names):
            cells = [f"{acc_a['median'][i]:.3f}/{acc_a['p95'][i]:.3f} -> {acc_b['median'][i]:.3f}/{acc_b['p95'][i]:.3f}"]
            for sa, sb in zip(acc_a["by_z"], acc_b["by_z"]):
                cells.append(f"{sa['median'][i]:.3f}/{sa['p95'][i]:.3f} -> {sb['median'][i]:.3f}/{sb['p95'][i]:.3f}")
            print(f"| {b} | " + " | ".join(cells) + " |")
        rng = np.random.default_rng(0)
        th = jnp.asarray(theta[rng.integers(0, len(theta), args.n_speed)])
        for label, emu in emus.items():
            print(f"speed {name} {label}: {_rate(jax.jit(emu.magnitudes), th):.3g} galaxies/s "
                  f"({len(bandset.band_names)} bands, {args.n_speed} galaxies, jit, best of 3)")


if __name__ == "__main__":
    main()
