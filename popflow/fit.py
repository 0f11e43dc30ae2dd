"""One chunk of galaxies: photometry arrays in, posterior draws and diagnostics out.

For each galaxy the target is the posterior over the probit latent ``phi``
(:meth:`ParameterSpace.from_latent`),

    log p(phi | f) = log L(f | flux(theta(phi))) + log p_prior,latent(phi),

with the emulator's magnitudes turned into nJy fluxes
(``f = 10^(-0.4 (m - 31.4))``), the :class:`~popflow.datamodel.DataModel`
likelihood and the prior's latent density (so the Jacobian of the transform is
included). Points outside the emulator's domain have zero density.

The sampler does not move in ``phi`` itself but in ``psi``, where log_mass's
latent coordinate is replaced by the flux-anchored mass (``mass_anchor``,
default on)

    A = log_mass - 0.4 sum_b w_b m_b(theta; log_mass = 0),

the galaxy's mass minus its weighted mean unit-mass magnitude over -2.5, with
``w_b`` the galaxy's inverse magnitude variances (error floor included,
normalised to 1). The data fix ``A`` to the photometric precision whatever the
age, dust and redshift, so the mass-to-light degeneracy, a curved ridge in
``phi`` along which stretch moves crawl, becomes a straight valley at constant
``A``: moving the SED parameters at fixed ``A`` rescales the mass with them. The
map ``psi -> phi`` keeps every other coordinate and is triangular with
``d log_mass / d A = 1``, so the target in ``psi`` is the posterior above plus
``log |d phi_mass / d log_mass|``; it costs the same single emulator call
(magnitudes at the middle of the mass box, shifted exactly). Everything the
fit returns is in ``theta``; the diagnostics use ``phi``.

Each galaxy gets ``n_ensembles`` independent ensembles of
``n_walkers / n_ensembles`` walkers (:mod:`popflow.sampler`); all ensembles of
all galaxies of the chunk move in one call. The outputs keep one ``chain``
axis of length ``n_walkers``: chain ``c`` is walker ``c % (n_walkers //
n_ensembles)`` of ensemble ``c // (n_walkers // n_ensembles)``.

Initialisation (``FitSettings.init``). ``n_init`` candidates are drawn
uniformly on the parameter box (standard normal in latent space; shared by the
whole chunk, so the emulator runs once per candidate, not per galaxy). The mass
scaling is exact, so each candidate's ``log_mass`` is set per galaxy to its
weighted least-squares flux amplitude, and the candidates are scored by the
posterior density. Then:

- ``"laplace"`` (default): the best candidate in each of ``n_starts`` redshift
  bins (equal in ``log(1 + z)``) and, with ``dust_starts``, the best one in the
  same bin whose dust2 differs from it by more than 0.5 (the other branch of the
  dust-age-mass degeneracy) start ``n_newton`` damped Newton steps on the
  log posterior, so every redshift mode the photometry allows gets a local
  optimum. (pop-cosmos refines its starts with Adam, Thorp et al. 2024; on the
  lsst emulator 1000 Adam steps still ended several nats below the Newton
  optima, BENCHMARKS.md.) Each optimum gets a Laplace
  approximation (the Hessian of the log posterior, eigenvalues floored at 1,
  i.e. never wider than the latent unit normal); optima closer than the typical
  radius are merged, and walkers are drawn from the mixture of these Gaussians
  weighted by their Laplace evidence ``p(phi*) |2 pi Sigma|^(1/2)``. The walkers
  thus start close to the posterior, mode weights included, and burn-in only has
  to correct the Gaussian approximation. Each ensemble draws its walkers
  independently. The same mixture (widths times ``ind_scale``) is then the
  proposal of an independence Metropolis-Hastings move made in a fraction
  ``ind_prob`` of the half-steps: stretch and differential-evolution moves
  explore a mode, but walkers cross between separated modes (redshift
  solutions, dust-age branches) only through this move, whose acceptance
  ratio corrects the Laplace weights to the true posterior mass of each mode.
  Candidate scores, Newton steps and Hessians use the prior's cheap stand-in
  ``init_log_prob_latent`` (:class:`popflow.priors.base.Prior`) (the density itself, except for the diffusion
  prior: the Gaussian of its whitening, instead of an ODE solve per candidate
  and its second derivatives); the sampler's target is always exact.
- ``"top"``: the ``n_walkers`` best candidates (dealt to the ensembles in turn)
  start the walkers; gradient-free (works with a prior that has no usable
  gradient) but far from the posterior, so it needs a long burn-in.

Burn-in starts with ``n_tempered`` steps on the tempered posterior
``L(f | theta)^beta p(theta)`` (beta = 0.3 by default): with the likelihood
flattened, the walkers spread from the Laplace starts along the curved
mass-age-dust and redshift degeneracies that a Gaussian approximation at the
optimum cannot describe; the untempered burn-in then contracts them onto the
posterior from outside (over-dispersed, as R-hat assumes) instead of letting
them expand slowly from inside. At equal cost this raised the 68 % coverage
of log_mass on lsst mocks from 0.55 to 0.60 and of redshift from 0.67 to
0.69 (BENCHMARKS.md). Then burn-in runs in ``burn_stages`` equal stages. After each stage but the last,
walkers stranded far below their ensemble (``log p < median - reset_dlogp``,
or out of the domain) are moved onto randomly chosen good walkers of the same
ensemble with a small jitter. Stretch moves cannot rescue such walkers (their
proposals lie on lines through the bulk of the ensemble); resetting them during
burn-in only changes the starting point of the kept chain, not its stationary
distribution.

Convergence (per galaxy): ``converged`` when the rank-normalised split R-hat
across the ensembles (:func:`popflow.sampler.ensemble_rhat`, maximum over
parameters) is below ``rhat_max`` and the kept chain is at least
``tau_factor`` autocorrelation times long (``n_draws * thin >= tau_factor *
tau``, ``tau`` in steps, the slowest parameter's walker-averaged integrated
time). The ``ess`` output is ``n_walkers * n_draws * thin / tau``, the
effective number of independent draws.

Choosing settings: at least ``2 * dim`` walkers per ensemble (the stretch move
needs the walkers to span the space) and 2 ensembles (so R-hat compares
independent starts); ``thin`` about a quarter of ``tau`` so kept draws are
nearly independent; ``n_draws * thin`` at least ``tau_factor * tau``; burn-in
of a few ``tau``. The defaults (2 ensembles of 32 walkers, Laplace init from
16,384 candidates and 8 x 2 starts, independence moves in 20 % of the
half-steps, 800 burn-in steps, 32 draws thinned by 12: 75,776 posterior
evaluations per galaxy plus the init) were chosen on lsst mocks against "top"
init, wider / more walkers, HMC sweeps and other independence-move settings.
With the anchored mass they are calibrated on 500 lsst mocks (68 / 95 %
coverage of redshift 0.69 / 0.96 and of log_mass 0.66 / 0.95; 95 % of the
galaxies flagged converged, tau ~35 steps) with the trunk emulator's error
floors (0.03-0.08 mag). With floors of 0.015 mag or less (posteriors at the
spectral emulator's own 0.005 mag precision) they under-cover: 68 % coverage
of redshift 0.50 at 0.005 mag (BENCHMARKS.md, "The demo with the spectral
emulator"); real catalogues' calibrated floors are 0.02-0.06 mag. Measured figures are in
BENCHMARKS.md ("Per-galaxy inference").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from jax.scipy.stats import norm

from popflow import sampler
from popflow.datamodel import DataModel

__all__ = ["FitSettings", "make_fit_kernel", "fit_chunk", "mag_to_njy", "INIT_STRATEGIES"]

INIT_STRATEGIES = ("laplace", "top")
_INIT_BATCH = 32  # galaxies scored at once at initialisation: bounds memory at 32 x n_init x dim
_U_TINY = 1e-6  # probit argument kept in [1e-6, 1 - 1e-6]: |phi| <= 4.75, finite in float32
_DUST_SEPARATION = 0.5  # dust2 (optical depth) between the two starts of a redshift bin (``dust_starts``)
_ANCHOR_MIN_WEIGHT = 1e-3  # anchor weight (S/N^2 units) of a band without positive flux: defined even then
_MIN_PRECISION = 1.0  # Laplace init: eigenvalues of -Hessian floored here (latent sd <= 1, the prior's own width)


def _probit(u):
    """Standard-normal quantile of u, clipped to [_U_TINY, 1 - _U_TINY] so the box edges stay finite."""
    return ndtri(jnp.clip(u, _U_TINY, 1.0 - _U_TINY))


def mag_to_njy(m):
    """AB magnitude -> flux density in nJy: ``10^(-0.4 (m - 31.4))``."""
    return jnp.power(10.0, -0.4 * (m - 31.4))


@dataclass(frozen=True)
class FitSettings:
    """Sampler settings for one fit (frozen and hashable: they key the compiled-kernel cache).

    n_walkers: walkers per galaxy, all ensembles together (the ``chain``
    axis of the outputs). n_ensembles: independent ensembles per galaxy
    (``None``: as many as have ``2 dim`` walkers each, at least 1).
    n_burn: steps discarded: the first ``tempered_fraction`` of them on the
    tempered posterior ``L^beta p`` (module docstring), the rest in
    burn_stages stages with stuck-walker resets between them (reset_dlogp).
    n_draws: draws kept per walker; thin: steps between kept draws (a fit
    runs ``n_burn + n_draws * thin`` steps).
    init: one of INIT_STRATEGIES; n_init: box candidates; n_starts,
    dust_starts, n_newton: the ``"laplace"`` optimisation (redshift bins,
    a second start per bin on the other dust branch, damped Newton steps
    from each start); init_scale: the Laplace Gaussians' widths are
    multiplied by it (> 1: over-dispersed starts, as R-hat assumes).
    a_stretch: the stretch-move scale a; ind_prob: probability of an
    independence move from the Laplace mixture (``"laplace"`` init only),
    whose Gaussians' widths are multiplied by ind_scale; de_prob: otherwise,
    probability of a differential-evolution move instead of a stretch move
    (each per ensemble, half and step).
    mass_anchor: sample in the flux-anchored mass coordinate (module
    docstring) instead of the latent log_mass.
    tau_factor, rhat_max: the convergence criterion (module docstring).
    """

    n_walkers: int = 64
    n_ensembles: int | None = None
    n_burn: int = 800
    tempered_fraction: float = 0.5
    beta: float = 0.3
    burn_stages: int = 2
    reset_dlogp: float = 20.0
    n_draws: int = 32
    thin: int = 12
    init: str = "laplace"
    n_init: int = 16384
    n_starts: int = 8
    dust_starts: bool = True
    n_newton: int = 40
    init_scale: float = 2.0
    a_stretch: float = 2.0
    de_prob: float = 0.5
    ind_prob: float = 0.2
    ind_scale: float = 1.0
    mass_anchor: bool = True
    tau_factor: float = 10.0
    rhat_max: float = 1.05

    def __post_init__(self):
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"FitSettings.init={self.init!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        if self.n_walkers % 2 or self.n_walkers < 4:
            raise ValueError(f"FitSettings.n_walkers={self.n_walkers} must be even and >= 4")
        if self.n_ensembles is not None and (self.n_ensembles < 1 or self.n_walkers % (2 * self.n_ensembles)):
            raise ValueError(f"FitSettings.n_ensembles={self.n_ensembles} must be >= 1 and split n_walkers={self.n_walkers} "
                             "into ensembles of an even number of walkers")
        if self.n_burn < 0:
            raise ValueError(f"FitSettings.n_burn={self.n_burn} must be >= 0")
        if not (0.0 <= self.tempered_fraction < 1.0 and 0.0 < self.beta <= 1.0):
            raise ValueError(f"FitSettings: tempered_fraction={self.tempered_fraction} must lie in [0, 1) and beta={self.beta} in (0, 1]")
        rest = self.n_burn - self.n_tempered
        if self.burn_stages < 1 or rest % self.burn_stages:
            raise ValueError(f"FitSettings.burn_stages={self.burn_stages} must be >= 1 and divide the untempered burn-in "
                             f"({rest} of n_burn={self.n_burn} steps)")
        for name in ("n_draws", "thin", "n_init", "n_starts"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitSettings.{name} must be >= 1")
        if not self.init_scale > 0:
            raise ValueError(f"FitSettings.init_scale={self.init_scale} must be positive")
        if self.n_newton < 0:
            raise ValueError(f"FitSettings.n_newton={self.n_newton} must be >= 0")
        if self.n_draws < 4:
            raise ValueError(f"FitSettings.n_draws={self.n_draws}: at least 4 draws per walker are needed for split R-hat")
        if self.n_init < max(self.n_walkers, self.n_starts):
            raise ValueError(f"FitSettings.n_init={self.n_init} must be >= n_walkers={self.n_walkers} and n_starts={self.n_starts}")
        if not 0.0 <= self.ind_prob <= 1.0 or not 0.0 <= self.de_prob <= 1.0:
            raise ValueError(f"FitSettings: ind_prob={self.ind_prob} and de_prob={self.de_prob} must lie in [0, 1]")
        if not self.ind_scale > 0:
            raise ValueError(f"FitSettings.ind_scale={self.ind_scale} must be positive")
        if not self.a_stretch > 1.0:
            raise ValueError(f"FitSettings.a_stretch={self.a_stretch} must exceed 1")

    @property
    def n_steps(self) -> int:
        """Total sampler steps per fit (burn-in and kept chain)."""
        return self.n_burn + self.n_draws * self.thin

    @property
    def n_tempered(self) -> int:
        """Burn-in steps on the tempered posterior (the first ``tempered_fraction`` of ``n_burn``)."""
        return int(round(self.n_burn * self.tempered_fraction))

    def ensembles(self, dim: int) -> int:
        """The number of ensembles used in ``dim`` dimensions (resolves ``n_ensembles=None``)."""
        if self.n_ensembles is not None:
            return self.n_ensembles
        e = max(self.n_walkers // (2 * dim), 1)
        while self.n_walkers % (2 * e):
            e -= 1
        return e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FitSettings":
        return cls(**d)


def _check_compatible(emulator, prior, datamodel: DataModel, settings: FitSettings):
    es, ps = emulator.space, prior.space
    if es.names != ps.names or not (np.array_equal(es.lower, ps.lower) and np.array_equal(es.upper, ps.upper)):
        raise ValueError(
            f"emulator {emulator.id} and prior {prior.id} use different parameter spaces "
            f"({es.names} {es.lower.tolist()}..{es.upper.tolist()} vs {ps.names} {ps.lower.tolist()}..{ps.upper.tolist()})"
        )
    if datamodel.n_bands != len(emulator.bands):
        raise ValueError(
            f"the data model has {datamodel.n_bands} bands but emulator {emulator.id} has {len(emulator.bands)} ({', '.join(emulator.bands)})"
        )
    per = settings.n_walkers // settings.ensembles(ps.dim)
    if per < 2 * ps.dim:
        raise ValueError(f"FitSettings: {per} walkers per ensemble (n_walkers={settings.n_walkers}, "
                         f"{settings.ensembles(ps.dim)} ensembles) is below 2 x dim = {2 * ps.dim} for the stretch move")


def make_fit_kernel(emulator, prior, datamodel: DataModel, settings: FitSettings):
    """The jitted per-chunk fit: ``kernel(key, flux, flux_err, mask, field=None, redshift=None, datamodel=datamodel)
    -> dict of jax arrays``.

    Inputs (n_gal, n_band) float32 nJy / bool, ``field`` (n_gal,) int for
    per-field zero points, ``redshift`` (n_gal,) float32 known redshifts (NaN:
    free). A known redshift replaces the sampler's redshift coordinate, which
    then carries a unit-normal dummy and is left out of tau and R-hat; the
    prior is evaluated at it, i.e. the draws follow the conditional posterior
    (``log_prior`` is then the joint density at the known redshift).
    Outputs: ``samples`` (n_gal, n_walkers, n_draws, dim) physical (chain axis:
    module docstring); ``log_prior`` (physical density), ``log_likelihood``
    (n_gal, n_walkers, n_draws); per galaxy (n_gal,):
    ``acceptance_rate``, ``tau`` (steps), ``ess``, ``rhat``, ``converged``,
    ``usable``. Galaxies without a usable band are sampled from the prior
    internally (finite, harmless) and come out NaN. Galaxy g's randomness comes
    from ``fold_in(key, g)``, so its result does not depend on the rest of the chunk.

    ``datamodel`` fixes what the compiled code depends on (band count, likelihood, per-field
    zero points or not, rest-frame nodes); its numbers (zero points, floors, rest-frame
    offsets) are the kernel's arguments: a data model of the same structure passed as
    ``datamodel=`` runs without recompiling (e.g. each floor scale of :func:`popflow.calibrate.tune_floor_scale`).
    Omitted, the one given here is compiled in as constants.
    """
    _check_compatible(emulator, prior, datamodel, settings)

    def kernel(key, flux, flux_err, mask, field=None, redshift=None, datamodel=datamodel):
        return _kernel_body(emulator, prior, datamodel, settings)(key, flux, flux_err, mask, field, redshift)

    return jax.jit(kernel)


def _kernel_body(emulator, prior, datamodel: DataModel, settings: FitSettings):
    """The traceable fit of :func:`make_fit_kernel` for one (possibly traced) data model."""
    space = prior.space
    dim = space.dim
    s = settings
    n_ens = s.ensembles(dim)
    w_ens = s.n_walkers // n_ens
    i_mass, i_z, i_dust = space.index("log_mass"), space.index("redshift"), space.index("dust2")
    lo_mass, hi_mass = float(space.lower[i_mass]), float(space.upper[i_mass])
    lo_z, hi_z = float(space.lower[i_z]), float(space.upper[i_z])
    mid_mass = 0.5 * (lo_mass + hi_mass)  # from_latent's log_mass at latent 0
    init_log_prior = getattr(prior, "init_log_prob_latent", prior.log_prob_latent)  # a duck-typed prior may lack it

    def model_magnitudes(theta):
        """The emulator's magnitudes plus the data model's rest-frame correction, (..., dim) -> (..., B)."""
        return emulator.magnitudes(theta) + datamodel.rest_correction(theta[..., i_z])

    def sym(h):
        return 0.5 * (h + jnp.swapaxes(h, -1, -2))

    def to_latent(theta):
        return _probit((theta - space.lower) / (space.upper - space.lower))

    def anchor_weights(flux, flux_err, mask):
        """Band weights (G, B) of the anchored magnitude, summing to 1: inverse magnitude variances, floor included."""
        f = jnp.maximum(flux, 0.0)
        floor = jnp.asarray(datamodel.error_floor, jnp.float32)
        w = jnp.where(mask, f**2 / (flux_err**2 + (floor * f) ** 2) + _ANCHOR_MIN_WEIGHT, 0.0)
        return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)

    def unit_magnitudes(phi):
        """Magnitudes at the box's middle log_mass, whatever phi's; (G, k, dim) -> (G, k, B)."""
        return model_magnitudes(space.from_latent(phi.at[..., i_mass].set(0.0)))

    def fix_redshift(psi, z_known):
        """Known redshifts (G,) physical, NaN where free, into psi (G, k, dim): returns psi with the redshift
        coordinate set to the known latent value and the log density (G, k) of the coordinate it replaces,
        which the sampler then draws from a unit normal (a dummy that keeps the sampler's dimension)."""
        if z_known is None:
            return psi, 0.0
        known = ~jnp.isnan(z_known)
        phi_z = _probit((jnp.where(known, z_known, lo_z) - lo_z) / (hi_z - lo_z))
        fixed = jnp.where(known[:, None], phi_z[:, None], psi[..., i_z])
        return psi.at[..., i_z].set(fixed), jnp.where(known[:, None], norm.logpdf(psi[..., i_z]), 0.0)

    def encode(phi, weights):
        """Latent phi (G, k, dim) -> the sampler's coordinates psi (module docstring)."""
        if not s.mass_anchor:
            return phi
        log_mass = space.from_latent(phi)[..., i_mass]
        anchor = log_mass - mid_mass - 0.4 * jnp.sum(weights[:, None] * unit_magnitudes(phi), axis=-1)
        return phi.at[..., i_mass].set(anchor)

    def decode(psi, weights, z_known):
        """The sampler's coordinates psi (G, k, dim) -> latent phi, magnitudes (G, k, B), log |d phi / d psi| (G, k)
        (with the dummy density of a known redshift's coordinate) and whether log_mass lies inside the box (G, k);
        one emulator call."""
        psi, log_dummy = fix_redshift(psi, z_known)
        if not s.mass_anchor:
            return psi, model_magnitudes(space.from_latent(psi)), log_dummy, True
        m_mid = unit_magnitudes(psi)
        log_mass = psi[..., i_mass] + mid_mass + 0.4 * jnp.sum(weights[:, None] * m_mid, axis=-1)
        u = (log_mass - lo_mass) / (hi_mass - lo_mass)
        phi_mass = _probit(u)
        log_det = -np.log(hi_mass - lo_mass) - norm.logpdf(phi_mass)  # d phi_mass / d log_mass; d log_mass / d anchor = 1
        mags = m_mid - 2.5 * (log_mass - mid_mass)[..., None]  # exact mass scaling
        return psi.at[..., i_mass].set(phi_mass), mags, log_det + log_dummy, (u > 0.0) & (u < 1.0)

    def log_like(mags, flux, flux_err, mask, field):
        """Magnitudes (G, k, B), data (G, B) -> (G, k)."""
        f = None if field is None else field[:, None]
        return datamodel.log_likelihood(mag_to_njy(mags), flux[:, None], flux_err[:, None], mask[:, None], f)

    def log_target(psi, data, log_prior_latent=prior.log_prob_latent):
        """Log posterior in the sampler's coordinates (G, k, dim) -> (G, k), -inf outside the emulator's domain;
        aux: log-likelihood, latent log prior, latent phi. The initialisation passes the prior's cheap stand-in."""
        phi, mags, log_det, inside = decode(psi, *data[4:])
        ll = log_like(mags, *data[:4])
        lp = log_prior_latent(phi)
        ok = inside & emulator.in_domain(space.from_latent(phi)) & jnp.isfinite(ll)
        return jnp.where(ok, ll + lp + log_det, -jnp.inf), (ll, lp, phi)

    def smooth_target(psi, data):
        """The initialisation's log posterior without the domain cut, for Newton steps (G, k, dim) -> (G, k)."""
        phi, mags, log_det, _ = decode(psi, *data[4:])
        return log_like(mags, *data[:4]) + init_log_prior(phi) + log_det

    def score_one(unit, cand, flux, flux_err, mask, field):
        """One galaxy's candidates, mass set to the best flux amplitude: latent (K, dim) and log posterior (K,)."""
        w = jnp.where(mask, 1.0 / flux_err**2, 0.0)
        mu = datamodel.model_flux(unit, field)  # (K, B) with zero points
        num = jnp.sum(w * flux * mu, axis=-1)
        den = jnp.sum(w * mu * mu, axis=-1)
        amp = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)  # best flux scale per candidate
        new_mass = jnp.clip(cand[:, i_mass] + jnp.log10(jnp.maximum(amp, 1e-30)), lo_mass, hi_mass)
        scale = jnp.power(10.0, new_mass - cand[:, i_mass])  # exact: m(log_mass + d) = m - 2.5 d
        theta = cand.at[:, i_mass].set(new_mass)
        ll = datamodel.log_likelihood(unit * scale[:, None], flux, flux_err, mask, field)
        phi = to_latent(theta)
        score = ll + init_log_prior(phi)
        return phi, jnp.where(emulator.in_domain(theta) & ~jnp.isnan(score), score, -jnp.inf)

    def pick_one(unit, cand, zbin, flux, flux_err, mask, field):
        """One galaxy's picks from the scored candidates: (n_starts, dim) for "laplace", (n_walkers, dim) for "top"."""
        phi, score = score_one(unit, cand, flux, flux_err, mask, field)
        if s.init == "top":
            _, idx = jax.lax.top_k(score, s.n_walkers)  # distinct candidates, best first
            return phi[idx.reshape(w_ens, n_ens).T.reshape(-1)]  # dealt to the ensembles in turn
        in_bin = zbin[None, :] == jnp.arange(s.n_starts)[:, None]  # (S, K)
        best = jnp.argmax(jnp.where(in_bin, score[None, :], -jnp.inf), axis=1)
        if not s.dust_starts:
            return phi[best]
        # a second start per bin on the other branch of the dust-age degeneracy: the best candidate whose dust2
        # differs from the first start's by more than _DUST_SEPARATION
        far = jnp.abs(cand[None, :, i_dust] - cand[best, i_dust][:, None]) > _DUST_SEPARATION
        other = jnp.argmax(jnp.where(in_bin & far, score[None, :], -jnp.inf), axis=1)
        return phi[jnp.concatenate([best, other])]

    def candidate_picks(key, flux, flux_err, mask, field, z_known):
        cand = space.from_latent(jax.random.normal(key, (s.n_init * dim,)).reshape(s.n_init, dim))  # (K, dim) physical
        # (K, B) fluxes at the candidates' own masses, shared by the chunk; with known redshifts they are per galaxy
        unit = mag_to_njy(model_magnitudes(cand)) if z_known is None else None
        lz = jnp.log1p(cand[:, i_z])
        zbin = jnp.clip(((lz - np.log1p(lo_z)) / (np.log1p(hi_z) - np.log1p(lo_z)) * s.n_starts).astype(jnp.int32), 0, s.n_starts - 1)
        fld = jnp.zeros(flux.shape[0], jnp.int32) if field is None else field
        zk = jnp.full(flux.shape[0], jnp.nan) if z_known is None else z_known

        def per_gal(a):
            f, e, m, fl, z = a
            fl = None if field is None else fl
            if z_known is None:
                return pick_one(unit, cand, zbin, f, e, m, fl)
            # candidates moved to the galaxy's known redshift: one emulator call per candidate and galaxy; the
            # redshift bins of their original draws still split them into n_starts groups of distinct starts
            at_z = jnp.where(jnp.isnan(z), cand, cand.at[:, i_z].set(z))
            return pick_one(mag_to_njy(model_magnitudes(at_z)), at_z, zbin, f, e, m, fl)

        return jax.lax.map(per_gal, (flux, flux_err, mask, fld, zk), batch_size=_INIT_BATCH)

    def point(fn):
        """fn(psi (G, k, dim), data) -> (G, k) as a function of one point (dim,) and one galaxy's data."""
        return lambda x, d: fn(x[None, None], jax.tree.map(lambda a: a[None], d))[0, 0]

    smooth_hess = jax.vmap(jax.vmap(jax.hessian(point(smooth_target)), in_axes=(0, None)))  # (G, S, dim, dim)
    smooth_grad = jax.vmap(jax.vmap(jax.grad(point(smooth_target)), in_axes=(0, None)))

    def optimise(psi, data):
        """n_newton damped Newton (Levenberg-Marquardt) steps on every start (G, S, dim).

        The step solves ``(A + lam I) dx = grad`` with ``A`` the negative Hessian, its
        eigenvalues clipped at 0; a step that does not raise the log posterior is
        rejected and ``lam`` grows tenfold, an accepted one shrinks it 3-fold.
        Returns the optima (G, S, dim), their log posterior (G, S) and Hessian."""
        lp_fn = lambda x: log_target(x, data, init_log_prior)[0]  # noqa: E731

        def body(carry, _):
            x, lp, lam = carry
            evals, evecs = jnp.linalg.eigh(jnp.nan_to_num(-sym(smooth_hess(x, data))))
            g = jnp.nan_to_num(smooth_grad(x, data))
            coef = jnp.einsum("gsji,gsj->gsi", evecs, g) / (jnp.maximum(evals, 0.0) + lam[..., None])
            x_new = x + jnp.einsum("gsij,gsj->gsi", evecs, coef)
            lp_new = lp_fn(x_new)
            better = lp_new > lp
            return (jnp.where(better[..., None], x_new, x), jnp.where(better, lp_new, lp),
                    jnp.where(better, lam / 3.0, lam * 10.0)), None

        lp0 = lp_fn(psi)
        carry = (psi, jnp.where(jnp.isnan(lp0), -jnp.inf, lp0), jnp.ones(psi.shape[:2]))
        (x, lp, _), _ = jax.lax.scan(body, carry, None, length=s.n_newton)
        return x, lp, jnp.nan_to_num(smooth_hess(x, data))

    def laplace_one(key, modes, lp, hess):
        """One galaxy: walkers (n_ens * w_ens, dim) drawn from the Laplace mixture at its optima.

        modes (S, dim), lp (S,), hess (S, dim, dim) of the log posterior."""
        evals, evecs = jnp.linalg.eigh(-sym(hess))
        evals = jnp.maximum(jnp.nan_to_num(evals, nan=_MIN_PRECISION), _MIN_PRECISION)
        log_ev = jnp.where(jnp.isfinite(lp), lp - 0.5 * jnp.sum(jnp.log(evals), axis=-1), -jnp.inf)
        prec = jnp.einsum("sij,sj,skj->sik", evecs, evals, evecs)
        order = jnp.argsort(-lp)

        def merge(keep, i):
            # an optimum within the typical radius (Mahalanobis distance^2 < dim) of a better kept one is a duplicate
            diff = modes[i][None, :] - modes
            d2 = jnp.einsum("si,sij,sj->s", diff, prec, diff)
            dup = jnp.any(keep & (d2 < dim) & (lp > lp[i]))
            return keep.at[i].set(~dup & jnp.isfinite(lp[i])), None

        keep, _ = jax.lax.scan(merge, jnp.zeros(lp.shape[0], bool), order)
        k_c, k_x = jax.random.split(key)
        n = n_ens * w_ens
        log_w = jnp.where(keep, log_ev, -jnp.inf)
        comp = jax.random.categorical(k_c, log_w, shape=(n,))
        xi = jax.random.normal(k_x, (n * dim,)).reshape(n, dim)
        sd = 1.0 / jnp.sqrt(evals)
        step = s.init_scale * jnp.einsum("nij,nj->ni", evecs[comp], xi * sd[comp])
        return modes[comp] + step, modes[comp], sampler.Mixture(modes, evecs, s.ind_scale * sd, log_w)

    def initialise(key, data):
        """Walker starts (G, n_walkers, dim), latent, ensemble-major, and the independence proposal
        (a :class:`~popflow.sampler.Mixture` per galaxy; None for "top")."""
        k_c, k_l = jax.random.split(key)
        picks = encode(candidate_picks(k_c, *data[:4], data[5]), data[4])
        if s.init == "top":
            return picks, None
        modes, lp, hess = optimise(picks, data)
        keys = _galaxy_keys(k_l, modes.shape[0])
        x, fallback, mixture = jax.vmap(laplace_one)(keys, modes, lp, hess)
        ok = jnp.isfinite(log_target(x, data)[0])  # a draw outside the domain restarts at its optimum
        return jnp.where(ok[..., None], x, fallback), mixture

    def reset_one(key, positions, log_prob):
        """One ensemble: move walkers with log p < median - reset_dlogp onto jittered good walkers; (W, dim)."""
        bad = ~(log_prob >= jnp.median(log_prob) - s.reset_dlogp)  # -inf and NaN count as bad
        k_donor, k_jit = jax.random.split(key)
        donor = jax.random.categorical(k_donor, jnp.where(bad, -jnp.inf, 0.0), shape=(w_ens,))
        good = ~bad[:, None]
        n_good = jnp.maximum(jnp.sum(good), 1)
        mean = jnp.sum(jnp.where(good, positions, 0.0), axis=0) / n_good
        sd = jnp.sqrt(jnp.sum(jnp.where(good, (positions - mean) ** 2, 0.0), axis=0) / n_good)
        jitter = 0.1 * sd * jax.random.normal(k_jit, (w_ens * dim,)).reshape(w_ens, dim)
        return jnp.where(bad[:, None], positions[donor] + jitter, positions)

    def burn_in(key, state, target, n_rows, moves):
        if s.n_burn == s.n_tempered:
            return state
        seg = (s.n_burn - s.n_tempered) // s.burn_stages

        def stage(st, i):
            k = jax.random.fold_in(key, i)
            st, _ = sampler.run(_galaxy_keys(k, n_rows), st, target, seg, thin=seg, **moves)
            return st, None

        def stage_and_reset(st, i):
            st, _ = stage(st, i)
            keys = _galaxy_keys(jax.random.fold_in(key, s.burn_stages + i), n_rows)
            return sampler.init(jax.vmap(reset_one)(keys, st.positions, st.log_prob), target), None

        state, _ = jax.lax.scan(stage_and_reset, state, jnp.arange(s.burn_stages - 1))
        return stage(state, s.burn_stages - 1)[0]

    def kernel(key, flux, flux_err, mask, field=None, redshift=None):
        flux = jnp.asarray(flux, jnp.float32)
        flux_err = jnp.asarray(flux_err, jnp.float32)
        mask = jnp.asarray(mask, bool)
        n_gal = flux.shape[0]
        usable = jnp.any(mask, axis=-1)
        # masked entries (NaN allowed there) become finite dummies; a galaxy with no usable band samples its prior
        flux = jnp.where(mask, flux, 0.0)
        flux_err = jnp.where(mask, flux_err, 1.0)
        z_known = None if redshift is None else jnp.asarray(redshift, jnp.float32)
        # data[:4] feed the likelihood, data[4:] (anchor weights, known redshifts) the map psi -> phi (decode)
        data = (flux, flux_err, mask, field, anchor_weights(flux, flux_err, mask), z_known)
        k_init, k_burn, k_draw = (jax.random.fold_in(key, i) for i in range(3))
        psi0, mixture = initialise(k_init, data)
        # every ensemble is a row of the sampler's batch: (G * n_ens, w_ens, dim), galaxy-major, with its own data row
        rows = n_gal * n_ens
        per_row = lambda t: jax.tree.map(lambda a: jnp.repeat(a, n_ens, axis=0), t)  # noqa: E731
        data_e = per_row(data)
        target = lambda psi: log_target(psi, data_e)  # noqa: E731
        moves = dict(a=s.a_stretch, de_prob=s.de_prob, mixture=None if mixture is None else per_row(mixture), ind_prob=s.ind_prob)
        psi0 = psi0.reshape(rows, w_ens, dim)
        if s.n_tempered:
            # a tempered phase (likelihood^beta) lets the walkers spread along the degeneracies first
            def tempered(psi):  # -inf - (-inf) = NaN outside the domain: the sampler reads NaN as -inf
                lt, aux = target(psi)
                return lt - (1.0 - s.beta) * aux[0], aux

            st, _ = sampler.run(_galaxy_keys(jax.random.fold_in(k_burn, 99), rows), sampler.init(psi0, tempered), tempered,
                                s.n_tempered, thin=s.n_tempered, **moves)
            psi0 = st.positions
        state = sampler.init(psi0, target)
        state = burn_in(k_burn, state, target, rows, moves)
        _, trace = sampler.run(_galaxy_keys(k_draw, rows), state, target, s.n_draws * s.thin, thin=s.thin, **moves)
        per_gal = lambda x: x.reshape((n_gal, s.n_walkers) + x.shape[2:])  # noqa: E731
        ll, lp_latent, phi = (per_gal(a) for a in trace.aux)  # phi (G, n_walkers, n_draws, dim): diagnostics in latent space
        tau_p = sampler.autocorr_time(phi)
        rhat_p = sampler.ensemble_rhat(phi.reshape(n_gal, n_ens, w_ens, s.n_draws, dim))  # (G, dim) each
        if z_known is not None:  # a known redshift does not move: leave it out of the diagnostics
            held = ~jnp.isnan(z_known)[:, None] & (jnp.arange(dim) == i_z)
            tau_p, rhat_p = jnp.where(held, 0.0, tau_p), jnp.where(held, 1.0, rhat_p)
        tau = jnp.max(tau_p, axis=-1) * s.thin
        rhat = jnp.max(rhat_p, axis=-1)
        n_kept = s.n_draws * s.thin
        converged = (n_kept >= s.tau_factor * tau) & (rhat < s.rhat_max) & usable
        nan_g = lambda x: jnp.where(usable.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.nan)  # noqa: E731
        return {
            "samples": nan_g(space.from_latent(phi)),
            "log_prior": nan_g(lp_latent - space.log_jacobian(phi)),
            "log_likelihood": nan_g(ll),
            "acceptance_rate": nan_g(jnp.mean(per_gal(trace.acceptance_rate), axis=-1)),
            "tau": nan_g(tau),
            "ess": nan_g(s.n_walkers * n_kept / tau),
            "rhat": nan_g(rhat),
            "converged": converged,
            "usable": usable,
        }

    return kernel


def _check_redshift(redshift, n_gal: int, space) -> np.ndarray:
    """Known redshifts as float32 (n_gal,), NaN where unknown; a value outside the parameter box names its galaxy."""
    z = np.asarray(redshift, np.float64).reshape(-1)
    if z.shape != (n_gal,):
        raise ValueError(f"fit_chunk: redshift has {z.size} values for {n_gal} galaxies")
    lo, hi = (float(b[space.index("redshift")]) for b in (space.lower, space.upper))
    bad = np.flatnonzero(np.isfinite(z) & ((z < lo) | (z > hi)) | np.isinf(z))
    if bad.size:
        g = int(bad[0])
        raise ValueError(f"fit_chunk: known redshift {z[g]} of galaxy {g} ({bad.size} in all) lies outside the "
                         f"parameter box [{lo}, {hi}]")
    return z.astype(np.float32)


def _galaxy_keys(key, n_gal: int):
    """Per-galaxy keys ``fold_in(key, g)``, shape (n_gal,): galaxy g's stream ignores the chunk size."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n_gal))


_KERNELS: dict = {}


def _cached_kernel(emulator, prior, datamodel, settings):
    """The compiled kernel for this emulator, prior, settings and data-model structure (not its numbers)."""
    # artifacts without an id (e.g. an emulator fresh from select()) are keyed by the object itself
    key = (emulator.id or emulator, prior.id or prior, datamodel.structure, settings)
    if key not in _KERNELS:
        _KERNELS[key] = make_fit_kernel(emulator, prior, datamodel, settings)
    return _KERNELS[key]


def fit_chunk(key, flux, flux_err, mask, *, emulator, prior, datamodel: DataModel, settings: FitSettings, field=None,
              redshift=None, pad_to=None):
    """Fit a chunk of galaxies; returns a dict of NumPy arrays (see :func:`make_fit_kernel` for the keys).

    ``flux``, ``flux_err`` (n_gal, n_band) nJy, ``mask`` bool (n_gal, n_band);
    ``field`` (n_gal,) int for per-field zero points; ``redshift`` (n_gal,)
    known redshifts (NaN: unknown) at which those galaxies are fitted, i.e. the
    other parameters are sampled from their posterior conditional on it (e.g. a
    spectroscopic sample for a population prior). Inputs are validated
    (errors name the galaxy and band). ``pad_to``: pad the chunk with unusable
    dummy galaxies to this many rows so every chunk has one shape (the last,
    short chunk does not recompile); padding is stripped and does not change
    the real galaxies' results. The compiled kernel is cached per (emulator id,
    prior id, data-model structure, settings) for the life of the process; the
    data model's numbers are arguments, so new zero points or floors reuse it.
    """
    flux = np.asarray(flux, np.float32)
    flux_err = np.asarray(flux_err, np.float32)
    mask = np.asarray(mask)
    datamodel.validate(flux, flux_err, mask, field, where="fit_chunk")
    n_gal = flux.shape[0]
    if n_gal == 0:
        raise ValueError("fit_chunk: the chunk has no galaxies")
    if redshift is not None:
        redshift = _check_redshift(redshift, n_gal, prior.space)
    if pad_to is not None:
        if pad_to < n_gal:
            raise ValueError(f"fit_chunk: pad_to={pad_to} is smaller than the chunk ({n_gal} galaxies)")
        extra = pad_to - n_gal
        flux = np.concatenate([flux, np.zeros((extra, flux.shape[1]), np.float32)])
        flux_err = np.concatenate([flux_err, np.ones((extra, flux.shape[1]), np.float32)])
        mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), bool)])
        if field is not None:
            field = np.concatenate([np.asarray(field), np.zeros(extra, np.asarray(field).dtype)])
        if redshift is not None:
            redshift = np.concatenate([redshift, np.full(extra, np.nan, np.float32)])
    kernel = _cached_kernel(emulator, prior, datamodel, settings)
    out = kernel(key, flux, flux_err, mask, None if field is None else np.asarray(field, np.int32), redshift, datamodel)
    return {k: np.asarray(v)[:n_gal] for k, v in out.items()}
