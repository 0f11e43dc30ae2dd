"""Issue 7: design (b), the rest-frame spectral emulator, against design "trunk" (the shipped emulators).

    python benchmarks/emulator_designs.py --spectral RUN_DIR [--bands lsst] [--n-speed 10000]
        [--validation tests/data/emulator_validation/validation_prior.npz]

``RUN_DIR`` is a ``python -m popflow.emulator.train_spectral`` output folder. Both
designs are measured on the committed validation set (bagpipes models drawn from
the analytic prior, unit-mass magnitudes): median and 95th percentile |dm| per band
and per redshift slice (both sides capped as in :func:`popflow.emulator.train.accuracy_table`),
then emulated magnitudes per second for ``--n-speed`` galaxies (jit, best of 3; one process).
Filters of the zCOSMOS set need ``--filter-path`` (or $POPFLOW_FILTER_PATH).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from popflow.emulator import Emulator
from popflow.emulator.train import accuracy_table
from popflow.emulator.train_spectral import load_run

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
    ap.add_argument("--spectral", required=True)
    ap.add_argument("--bands", default="lsst", help="comma-separated shipped band sets")
    ap.add_argument("--validation", default=str(DEFAULT_VALIDATION))
    ap.add_argument("--filter-path", default=None)
    ap.add_argument("--n-speed", type=int, default=10_000)
    args = ap.parse_args()
    with np.load(args.validation) as z:
        theta, mags, filters = z["theta"], z["mag_unit"], [str(f) for f in z["filters"]]
    spectral = load_run(args.spectral)
    print(f"validation: {args.validation}, {len(theta)} models; spectral run: {args.spectral}")
    for name in args.bands.split(","):
        trunk = Emulator.load(name)
        cols = [filters.index(f) for f in trunk.filters]
        phot = spectral.photometer(trunk.filters, args.filter_path)
        rows = {}
        for label, emu in (("trunk", trunk), ("spectral", phot)):
            rows[label] = accuracy_table(emu, theta, mags[:, cols])
        acc_t, acc_s = rows["trunk"], rows["spectral"]
        print(f"\n### {name}: median / p95 |dm| (mag), trunk -> spectral")
        print("| band | all | " + " | ".join(f"z {s['z_lo']}-{s['z_hi']}" for s in acc_s["by_z"]) + " |")
        print("|---|---|" + "---|" * len(acc_s["by_z"]))
        for i, b in enumerate(trunk.bands):
            cells = [f"{acc_t['median'][i]:.3f}/{acc_t['p95'][i]:.3f} -> {acc_s['median'][i]:.3f}/{acc_s['p95'][i]:.3f}"]
            for st, ss in zip(acc_t["by_z"], acc_s["by_z"]):
                cells.append(f"{st['median'][i]:.3f}/{st['p95'][i]:.3f} -> {ss['median'][i]:.3f}/{ss['p95'][i]:.3f}")
            print(f"| {b} | " + " | ".join(cells) + " |")
        rng = np.random.default_rng(0)
        th = jnp.asarray(theta[rng.integers(0, len(theta), args.n_speed)])
        for label, emu in (("trunk", trunk), ("spectral", phot)):
            r = _rate(jax.jit(emu.magnitudes), th)
            print(f"speed {name} {label}: {r:.3g} galaxies/s ({len(trunk.bands)} bands, {args.n_speed} galaxies, "
                  f"jit, best of 3)")


if __name__ == "__main__":
    main()
