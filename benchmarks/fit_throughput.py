"""Fit throughput: galaxies per second for one chunk on this machine, with convergence figures.

    python benchmarks/fit_throughput.py [--n-gal 1000] [--emulator toy|NAME|PATH] [--prior analytic|uniform]
                                        [--walkers 64] [--burn 800] [--draws 32] [--thin 12]

(defaults: :class:`popflow.fit.FitSettings`'s).

Simulates S/N ~ 20 toy (or emulator) photometry for plausible galaxies, compiles
the fit kernel of :func:`popflow.fit.fit_chunk` for the chunk, fits it once and
prints the compile and fit wall times, galaxies per second, evaluations per
second and the convergence diagnostics. pop-cosmos's reference figure is 0.6
GPU-s per galaxy under the Prospector-alpha prior (Thorp et al. 2024).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.toymodel

from popflow.datamodel import DataModel  # noqa: E402
from popflow.fit import FitSettings, _cached_kernel  # noqa: E402
from tests.toymodel import ToyEmulator, UniformPrior, simulate_photometry, typical_theta  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gal", type=int, default=1000)
    ap.add_argument("--emulator", default="toy")
    ap.add_argument("--prior", default="analytic", help="analytic, uniform, or a shipped prior name / folder (e.g. analytic-diffusion)")
    ap.add_argument("--walkers", type=int, default=FitSettings.n_walkers)
    ap.add_argument("--burn", type=int, default=FitSettings.n_burn)
    ap.add_argument("--draws", type=int, default=FitSettings.n_draws)
    ap.add_argument("--thin", type=int, default=FitSettings.thin)
    ap.add_argument("--de-prob", type=float, default=FitSettings.de_prob)
    ap.add_argument("--snr", type=float, default=20.0)
    args = ap.parse_args(argv)

    if args.emulator == "toy":
        emu = ToyEmulator()
    else:
        from popflow.emulator.model import Emulator

        emu = Emulator.load(args.emulator)
    if args.prior == "analytic":
        from popflow.priors.analytic import AnalyticPrior

        prior = AnalyticPrior(emu.space)
    elif args.prior == "uniform":
        prior = UniformPrior(emu.space)
    else:
        from popflow.priors import load_prior

        prior = load_prior(args.prior)
    settings = FitSettings(n_walkers=args.walkers, n_burn=args.burn, n_draws=args.draws, thin=args.thin, de_prob=args.de_prob)
    dm = DataModel.from_emulator(emu)
    truth = typical_theta(args.n_gal, seed=0, space=emu.space)
    flux, err, mask = simulate_photometry(emu, truth, snr=args.snr, seed=1)
    dm.validate(flux, err, mask, None, where="fit_throughput")
    call = (jax.random.key(1), np.asarray(flux, np.float32), np.asarray(err, np.float32), np.asarray(mask), None)

    t0 = time.perf_counter()
    compiled = _cached_kernel(emu, prior, dm, settings).lower(*call).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = {k: np.asarray(v) for k, v in compiled(*call).items()}  # = fit_chunk(...) without the compilation
    t = time.perf_counter() - t0

    n_eval = args.n_gal * settings.n_walkers * settings.n_steps  # posterior evaluations in the sampler
    z = out["samples"][..., emu.space.index("redshift")].reshape(args.n_gal, -1)
    lo, med, hi = np.percentile(z, [2.5, 50, 97.5], axis=1)
    zt = truth[:, emu.space.index("redshift")]
    e = (med - zt) / (1 + zt)
    print(f"emulator {emu.id} ({len(emu.bands)} bands), prior {args.prior}, {args.n_gal} galaxies, S/N {args.snr}")
    print(f"settings: {settings.to_dict()}  ({settings.n_steps} steps per walker)")
    print(f"devices: {jax.devices()}")
    print(f"compilation: {t_compile:.1f} s; fit: {t:.1f} s")
    print(f"throughput: {args.n_gal / t:.2f} galaxies/s = {t / args.n_gal:.3f} CPU-wall-s per galaxy; "
          f"{n_eval / t:.3g} posterior evaluations/s")
    print(f"acceptance median {np.median(out['acceptance_rate']):.3f}; tau median {np.median(out['tau']):.0f} steps; "
          f"rhat median {np.median(out['rhat']):.2f}; converged {np.mean(out['converged']):.1%}; "
          f"converged galaxies/s {args.n_gal * np.mean(out['converged']) / t:.2f}")
    print(f"redshift: 95% coverage {np.mean((zt >= lo) & (zt <= hi)):.3f}; sigma_NMAD {1.4826 * np.median(np.abs(e - np.median(e))):.4f}; "
          f"outliers |dz|/(1+z) > 0.15: {np.mean(np.abs(e) > 0.15):.3f}")


if __name__ == "__main__":
    main()
