"""Recovery and calibration on mock galaxies made with the fit's own forward model.

    python benchmarks/mock_recovery.py [--n-gal 500] [--seed 7] [--walkers 64] [--ensembles 2] [--burn 800]
                                       [--draws 32] [--thin 12] [--init laplace|top] [--init-scale 2]
                                       [--ind-prob 0.2] [--ind-scale 1] [--starts 8] [--n-init 16384] [--newton 40]
                                       [--no-dust-starts] [--no-mass-anchor] [--tempered-fraction 0.5] [--beta 0.3]
                                       [--save out.npz]

Defaults are :class:`popflow.fit.FitSettings`'s.

Mocks: theta from the AnalyticPrior, magnitudes from the shipped ``lsst`` emulator,
LSST 10-year photerr noise and i < 25.3 (:func:`popflow.mock.simulate_catalog`), plus
the data model's fractional error floor drawn as extra Gaussian noise on the true
flux, so the likelihood (``DataModel.from_emulator``) is exactly the generating
model. (The i < 25.3 cut on the TRUE magnitude is not in the fit prior; it matters
only for galaxies near the limit.) Prints, for the posterior from
:func:`popflow.fit.fit_chunk` with the given settings: the fraction of true redshifts
and log masses inside the central 68% / 95% intervals, the PIT KS p-value for
redshift, sigma_NMAD, bias and outlier fraction of the median redshift, the fraction
flagged converged with the coverage of converged and not-converged galaxies apart, and
the compilation time and galaxies per second of the (compiled) fit.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from scipy import stats

from popflow.datamodel import DataModel
from popflow.emulator import Emulator
from popflow.fit import FitSettings, _cached_kernel
from popflow.metrics import bias, outlier_fraction, scaled_errors, sigma_nmad
from popflow.mock import simulate_catalog
from popflow.priors import AnalyticPrior


def coverage(draws, truth, level):
    """Fraction of ``truth`` (n,) inside the central ``level`` interval of ``draws`` (n, m)."""
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=1)
    return float(np.mean((truth >= lo) & (truth <= hi)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gal", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--walkers", type=int, default=FitSettings.n_walkers)
    ap.add_argument("--burn", type=int, default=FitSettings.n_burn)
    ap.add_argument("--draws", type=int, default=FitSettings.n_draws)
    ap.add_argument("--thin", type=int, default=FitSettings.thin)
    ap.add_argument("--init", default=FitSettings.init)
    ap.add_argument("--ensembles", type=int, default=None, help="n_ensembles (default: FitSettings's rule)")
    ap.add_argument("--burn-stages", type=int, default=FitSettings.burn_stages)
    ap.add_argument("--init-scale", type=float, default=FitSettings.init_scale)
    ap.add_argument("--ind-prob", type=float, default=FitSettings.ind_prob)
    ap.add_argument("--ind-scale", type=float, default=FitSettings.ind_scale)
    ap.add_argument("--starts", type=int, default=FitSettings.n_starts)
    ap.add_argument("--n-init", type=int, default=FitSettings.n_init)
    ap.add_argument("--no-dust-starts", action="store_true")
    ap.add_argument("--no-mass-anchor", action="store_true", help="sample the latent log_mass, not the flux-anchored mass")
    ap.add_argument("--tempered-fraction", type=float, default=FitSettings.tempered_fraction)
    ap.add_argument("--beta", type=float, default=FitSettings.beta)
    ap.add_argument("--newton", type=int, default=FitSettings.n_newton)
    ap.add_argument("--save", default=None, help="write the fit outputs and the truths to this .npz")
    a = ap.parse_args(argv)

    emu = Emulator.load("lsst")
    prior = AnalyticPrior(emu.space)
    dm = DataModel.from_emulator(emu)
    df = simulate_catalog(a.seed, a.n_gal, emulator=emu, prior=prior, bands="lsst")
    bands = emu.bands
    true_flux = np.stack([10 ** (-0.4 * (df[f"true_mag_{b}"].to_numpy(np.float64) - 31.4)) for b in bands], 1)
    rng = np.random.default_rng(a.seed + 1)
    flux = np.stack([df[f"{b}_cModelFlux"] for b in bands], 1) + np.asarray(dm.error_floor) * true_flux * rng.normal(size=true_flux.shape)
    err = np.stack([df[f"{b}_cModelFluxErr"] for b in bands], 1)
    mask = np.ones(flux.shape, bool)
    base = FitSettings()
    settings = FitSettings(n_walkers=a.walkers, n_ensembles=a.ensembles if a.ensembles else base.n_ensembles, n_burn=a.burn,
                           burn_stages=a.burn_stages, n_draws=a.draws, thin=a.thin,
                           init=a.init, init_scale=a.init_scale, ind_prob=a.ind_prob, ind_scale=a.ind_scale,
                           n_starts=a.starts, n_init=a.n_init, n_newton=a.newton, dust_starts=not a.no_dust_starts,
                           tempered_fraction=a.tempered_fraction, beta=a.beta, mass_anchor=not a.no_mass_anchor)
    flux, err = flux.astype(np.float32), err.astype(np.float32)
    dm.validate(flux, err, mask, None, where="mock_recovery")
    kernel = _cached_kernel(emu, prior, dm, settings)
    args = (jax.random.key(1), flux, err, mask, None)
    t0 = time.perf_counter()
    compiled = kernel.lower(*args).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = {k: np.asarray(v) for k, v in compiled(*args).items()}  # = fit_chunk(...) without the compilation
    t = time.perf_counter() - t0

    iz, im = emu.space.index("redshift"), emu.space.index("log_mass")
    z = out["samples"][..., iz].reshape(a.n_gal, -1)
    m = out["samples"][..., im].reshape(a.n_gal, -1)
    zt, mt = df["true_redshift"].to_numpy(), df["true_log_mass"].to_numpy()
    pit = np.mean(z < zt[:, None], axis=1)
    e = scaled_errors(np.median(z, axis=1), zt)
    print(f"{a.n_gal} mocks (seed {a.seed}), lsst emulator {emu.id}, analytic prior; settings {settings.to_dict()}")
    print(f"compilation {t_compile:.0f} s; fit {t:.0f} s = {a.n_gal / t:.2f} galaxies/s "
          f"({a.n_gal * out['converged'].mean() / t:.2f} converged galaxies/s; {settings.n_walkers * settings.n_steps} "
          "sampler evaluations per galaxy + init)")
    print(f"redshift: in 68% {coverage(z, zt, 0.68):.3f}, in 95% {coverage(z, zt, 0.95):.3f}; "
          f"PIT KS p = {stats.kstest(pit, 'uniform').pvalue:.3g}")
    print(f"log_mass: in 68% {coverage(m, mt, 0.68):.3f}, in 95% {coverage(m, mt, 0.95):.3f}")
    print(f"median z: sigma_NMAD {sigma_nmad(e):.4f}, bias {bias(e):+.4f}, outliers (|e| > 0.15) {outlier_fraction(e):.3f}")
    print(f"converged {np.mean(out['converged']):.1%}; acceptance median {np.median(out['acceptance_rate']):.3f}; "
          f"tau median {np.median(out['tau']):.0f} steps; R-hat median {np.median(out['rhat']):.3f}; "
          f"ESS median {np.median(out['ess']):.0f}")
    conv = out["converged"]
    for label, sel in (("converged", conv), ("not converged", ~conv)):
        if sel.any():
            print(f"{label} ({sel.sum()}): redshift in 68% {coverage(z[sel], zt[sel], 0.68):.3f}, "
                  f"in 95% {coverage(z[sel], zt[sel], 0.95):.3f}; log_mass in 68% {coverage(m[sel], mt[sel], 0.68):.3f}, "
                  f"in 95% {coverage(m[sel], mt[sel], 0.95):.3f}")
    if a.save:
        np.savez(a.save, **out, z_true=zt, mass_true=mt, flux=flux, flux_err=err)


if __name__ == "__main__":
    main()
