"""Emulated magnitudes per second for 1e4 galaxies versus bagpipes on the same bands.

    python benchmarks/emulator_speed.py [--emulator lsst] [--n 10000] [--n-bagpipes 40]

Prints the emulator's throughput (jit-compiled, float32, one batched call for
all galaxies, timed after a warm-up call, best of --repeat) and bagpipes'
(popflow.sps simulator, one process, the same filters), and their ratio. The
bagpipes side needs the `sps` extra; zCOSMOS filter files are found with
--filter-path (default: ../shared/data/zcosmos_bright/filters).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from popflow.emulator import Emulator
from popflow.priors import AnalyticPrior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulator", default="lsst")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--n-bagpipes", type=int, default=40, help="models for the bagpipes timing (0: skip)")
    ap.add_argument("--filter-path", default="../shared/data/zcosmos_bright/filters")
    args = ap.parse_args()

    emu = Emulator.load(args.emulator)
    theta = np.array(AnalyticPrior(emu.space).sample(jax.random.PRNGKey(0), args.n), np.float32)
    theta[:, emu.space.index("redshift")] = np.maximum(theta[:, emu.space.index("redshift")], 1e-3)
    f = jax.jit(emu.magnitudes)
    f(theta).block_until_ready()
    best = np.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        f(theta).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    rate = args.n / best
    print(f"device: {jax.devices()[0].device_kind}  emulator {emu.meta.get('name')} ({emu.id}, "
          f"{emu.meta['architecture']['design']} {emu.meta['architecture'].get('hidden', '')}), {len(emu.bands)} bands")
    print(f"emulator: {args.n} galaxies in {best * 1e3:.1f} ms -> {rate:.3g} galaxies/s "
          f"({rate * len(emu.bands):.3g} band magnitudes/s)")
    if args.n_bagpipes <= 0:
        return
    from popflow.sps.bagpipes_model import get_simulator

    sim = get_simulator(tuple(emu.filters), (args.filter_path,))
    sim.magnitudes(theta[:2])  # warm-up: grids loaded, first-call caches
    t0 = time.perf_counter()
    sim.magnitudes(theta[: args.n_bagpipes])
    dt = (time.perf_counter() - t0) / args.n_bagpipes
    print(f"bagpipes: {1 / dt:.3g} galaxies/s ({dt * 1e3:.2f} ms per galaxy, one process)")
    print(f"speed-up: {rate * dt:.0f}x")


if __name__ == "__main__":
    main()
