"""One chunk of galaxies: photometry arrays in, posterior draws and diagnostics out.

For each galaxy the target is the posterior over the probit latent ``phi``
(:meth:`ParameterSpace.from_latent`),

    log p(phi | f) = log L(f | flux(theta(phi))) + log p_prior,latent(phi),

with the emulator's magnitudes turned into nJy fluxes
(``f = 10^(-0.4 (m - 31.4))``), the :class:`~popflow.datamodel.DataModel`
likelihood and the prior's latent density (so the Jacobian of the transform is
included). Points outside the emulator's domain have zero density. The
ensemble sampler of :mod:`popflow.sampler` runs on all galaxies of the chunk
at once.

Initialisation (``FitSettings.init``): ``n_init`` candidates are drawn
uniformly on the parameter box (standard normal in latent space; shared by the
whole chunk, so the emulator runs once per candidate, not per galaxy). Because
the mass scaling is exact, each candidate's ``log_mass`` is then set per galaxy
to its weighted least-squares flux amplitude, and candidates are scored by the
posterior density.

- ``"top"`` (default): the ``n_walkers`` best candidates start the
  walkers. The start spans every redshift mode the candidates found plausible,
  so a multimodal p(z) is not collapsed onto one peak before burn-in.
- ``"ball"``: the single best candidate plus a small Gaussian ball
  (``init_scale`` in latent units) — the emcee habit, blind to other modes.

(Candidates are not drawn with ``prior.sample``: it need not be cheap or
jit-friendly, and the box covers every redshift.)

Burn-in runs in ``burn_stages`` equal stages. After each stage but the last,
walkers stranded far below the ensemble (``log p < median - reset_dlogp``, or
out of the domain) are moved onto randomly chosen good walkers with a small
jitter. Stretch moves cannot rescue such walkers (their proposals lie on lines
through the bulk of the ensemble); resetting them during burn-in only changes
the starting point of the kept chain, not its stationary distribution.

Convergence (per galaxy, documented criterion): ``converged`` when the chain
length in steps is at least ``tau_factor`` autocorrelation times
(``n_draws * thin >= tau_factor * tau``, ``tau`` in steps, the mean over
parameters of the walker-averaged integrated time) and the split R-hat over
walkers (maximum over parameters) is below ``rhat_max``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from popflow import sampler
from popflow.datamodel import DataModel

__all__ = ["FitSettings", "make_fit_kernel", "fit_chunk", "mag_to_njy", "INIT_STRATEGIES"]

INIT_STRATEGIES = ("top", "ball")
_INIT_BATCH = 32  # galaxies scored at once at initialisation: bounds memory at 32 x n_init x dim
_U_TINY = 1e-6  # probit argument kept in [1e-6, 1 - 1e-6]: |phi| <= 4.75, finite in float32


def mag_to_njy(m):
    """AB magnitude -> flux density in nJy: ``10^(-0.4 (m - 31.4))``."""
    return jnp.power(10.0, -0.4 * (m - 31.4))


@dataclass(frozen=True)
class FitSettings:
    """Sampler settings for one fit (frozen and hashable: they key the compiled-kernel cache).

    n_walkers: walkers per galaxy (even, >= 2 dim). n_burn: steps discarded,
    in burn_stages stages with stuck-walker resets between them (reset_dlogp).
    n_draws: draws kept per walker; thin: steps between kept draws (so a fit
    runs ``n_burn + n_draws * thin`` steps). init: one of INIT_STRATEGIES;
    n_init: candidates for the initialisation; init_scale: latent ball
    radius for ``"ball"``. a_stretch: the stretch-move scale a; de_prob:
    probability of a differential-evolution move instead (per galaxy, half
    and step; on the 14-D toy posteriors it lowered R-hat at equal cost).
    tau_factor, rhat_max: the convergence criterion (module docstring).
    """

    n_walkers: int = 32
    n_burn: int = 1000
    burn_stages: int = 4
    reset_dlogp: float = 20.0
    n_draws: int = 64
    thin: int = 16
    init: str = "top"
    n_init: int = 4096
    init_scale: float = 0.05
    a_stretch: float = 2.0
    de_prob: float = 0.5
    tau_factor: float = 20.0
    rhat_max: float = 1.1

    def __post_init__(self):
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"FitSettings.init={self.init!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        if self.n_walkers % 2 or self.n_walkers < 4:
            raise ValueError(f"FitSettings.n_walkers={self.n_walkers} must be even and >= 4")
        if self.n_burn < 0:
            raise ValueError(f"FitSettings.n_burn={self.n_burn} must be >= 0")
        if self.burn_stages < 1 or self.n_burn % self.burn_stages:
            raise ValueError(f"FitSettings.burn_stages={self.burn_stages} must be >= 1 and divide n_burn={self.n_burn}")
        for name in ("n_draws", "thin", "n_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitSettings.{name} must be >= 1")
        if self.n_draws < 4:
            raise ValueError(f"FitSettings.n_draws={self.n_draws}: at least 4 draws per walker are needed for split R-hat")
        if self.n_init < self.n_walkers:
            raise ValueError(f"FitSettings.n_init={self.n_init} must be >= n_walkers={self.n_walkers}")
        if not self.a_stretch > 1.0:
            raise ValueError(f"FitSettings.a_stretch={self.a_stretch} must exceed 1")

    @property
    def n_steps(self) -> int:
        """Total sampler steps per fit (burn-in plus kept chain)."""
        return self.n_burn + self.n_draws * self.thin

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
    if settings.n_walkers < 2 * ps.dim:
        raise ValueError(f"FitSettings.n_walkers={settings.n_walkers} is below 2 x dim = {2 * ps.dim} for the stretch move")


def make_fit_kernel(emulator, prior, datamodel: DataModel, settings: FitSettings):
    """The jitted per-chunk fit: ``kernel(key, flux, flux_err, mask, field=None) -> dict of jax arrays``.

    Inputs (n_gal, n_band) float32 nJy / bool, ``field`` (n_gal,) int for
    per-field zero points. Outputs: ``samples`` (n_gal, n_walkers, n_draws, dim)
    physical; ``log_prior`` (physical density), ``log_likelihood`` (n_gal,
    n_walkers, n_draws); ``acceptance_rate``, ``tau`` (steps), ``rhat``,
    ``converged``, ``usable`` (n_gal,). Galaxies without a usable band are
    sampled from the prior internally (finite, harmless) and come out NaN.
    Galaxy g's randomness comes from ``fold_in(key, g)``, so its result does not
    depend on the rest of the chunk.
    """
    _check_compatible(emulator, prior, datamodel, settings)
    space = prior.space
    dim = space.dim
    s = settings
    i_mass = space.index("log_mass")
    lo_mass, hi_mass = float(space.lower[i_mass]), float(space.upper[i_mass])

    def to_latent(theta):
        u = (theta - space.lower) / (space.upper - space.lower)
        return ndtri(jnp.clip(u, _U_TINY, 1.0 - _U_TINY))

    def log_like(theta, flux, flux_err, mask, field):
        """theta (G, k, dim) physical; data (G, n_band) -> (G, k)."""
        model = mag_to_njy(emulator.magnitudes(theta))
        f = None if field is None else field[:, None]
        ll = datamodel.log_likelihood(model, flux[:, None], flux_err[:, None], mask[:, None], f)
        ok = emulator.in_domain(theta) & jnp.isfinite(ll)
        return jnp.where(ok, ll, -jnp.inf)

    def log_target(phi, data):
        theta = space.from_latent(phi)
        ll = log_like(theta, *data)
        lp = prior.log_prob_latent(phi)
        return ll + lp, (ll, lp)

    def init_one(unit, cand, key, flux, flux_err, mask, field):
        """One galaxy's walker starts (W, dim), latent, from the shared candidates (module docstring)."""
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
        score = ll + prior.log_prob_latent(phi)
        score = jnp.where(emulator.in_domain(theta) & ~jnp.isnan(score), score, -jnp.inf)
        if s.init == "top":
            _, idx = jax.lax.top_k(score, s.n_walkers)  # distinct candidates
            return phi[idx]
        best = phi[jnp.argmax(score)]
        return best + s.init_scale * jax.random.normal(key, (s.n_walkers * dim,)).reshape(s.n_walkers, dim)

    def initialise(key, flux, flux_err, mask, field):
        """Walker starts (G, W, dim): candidates shared by the chunk, chosen per galaxy."""
        cand = space.from_latent(jax.random.normal(key, (s.n_init * dim,)).reshape(s.n_init, dim))  # (K, dim) physical
        unit = mag_to_njy(emulator.magnitudes(cand))  # (K, B) fluxes at the candidates' own masses
        keys = _galaxy_keys(jax.random.fold_in(key, 1), flux.shape[0])
        field = jnp.zeros(flux.shape[0], jnp.int32) if field is None else field
        per_gal = lambda args: init_one(unit, cand, *args[:4], None if datamodel.n_fields is None else args[4])  # noqa: E731
        return jax.lax.map(per_gal, (keys, flux, flux_err, mask, field), batch_size=_INIT_BATCH)

    def reset_one(key, positions, log_prob):
        """One galaxy: move walkers with log p < median - reset_dlogp onto jittered good walkers; (W, dim)."""
        bad = ~(log_prob >= jnp.median(log_prob) - s.reset_dlogp)  # -inf and NaN count as bad
        k_donor, k_jit = jax.random.split(key)
        donor = jax.random.categorical(k_donor, jnp.where(bad, -jnp.inf, 0.0), shape=(s.n_walkers,))
        good = ~bad[:, None]
        n_good = jnp.maximum(jnp.sum(good), 1)
        mean = jnp.sum(jnp.where(good, positions, 0.0), axis=0) / n_good
        sd = jnp.sqrt(jnp.sum(jnp.where(good, (positions - mean) ** 2, 0.0), axis=0) / n_good)
        jitter = 0.1 * sd * jax.random.normal(k_jit, (s.n_walkers * dim,)).reshape(s.n_walkers, dim)
        return jnp.where(bad[:, None], positions[donor] + jitter, positions)

    def burn_in(key, state, target, n_gal):
        if s.n_burn == 0:
            return state
        seg = s.n_burn // s.burn_stages

        def stage(st, i):
            k = jax.random.fold_in(key, i)
            st, _ = sampler.run(_galaxy_keys(k, n_gal), st, target, seg, thin=seg, a=s.a_stretch, de_prob=s.de_prob)
            return st, None

        def stage_and_reset(st, i):
            st, _ = stage(st, i)
            keys = _galaxy_keys(jax.random.fold_in(key, s.burn_stages + i), n_gal)
            return sampler.init(jax.vmap(reset_one)(keys, st.positions, st.log_prob), target), None

        state, _ = jax.lax.scan(stage_and_reset, state, jnp.arange(s.burn_stages - 1))
        return stage(state, s.burn_stages - 1)[0]

    def kernel(key, flux, flux_err, mask, field=None):
        flux = jnp.asarray(flux, jnp.float32)
        flux_err = jnp.asarray(flux_err, jnp.float32)
        mask = jnp.asarray(mask, bool)
        n_gal = flux.shape[0]
        usable = jnp.any(mask, axis=-1)
        # masked entries (NaN allowed there) become finite dummies; a galaxy with no usable band samples its prior
        flux = jnp.where(mask, flux, 0.0)
        flux_err = jnp.where(mask, flux_err, 1.0)
        data = (flux, flux_err, mask, field)
        target = lambda phi: log_target(phi, data)  # noqa: E731
        k_init, k_burn, k_draw = (jax.random.fold_in(key, i) for i in range(3))
        phi0 = initialise(k_init, *data)
        state = sampler.init(phi0, target)
        state = burn_in(k_burn, state, target, n_gal)
        _, trace = sampler.run(_galaxy_keys(k_draw, n_gal), state, target, s.n_draws * s.thin, thin=s.thin, a=s.a_stretch, de_prob=s.de_prob)
        phi = trace.positions
        ll, lp_latent = trace.aux
        tau = jnp.mean(sampler.autocorr_time(phi), axis=-1) * s.thin
        rhat = jnp.max(sampler.split_rhat(phi), axis=-1)
        converged = (s.n_draws * s.thin >= s.tau_factor * tau) & (rhat < s.rhat_max) & usable
        nan_g = lambda x: jnp.where(usable.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.nan)  # noqa: E731
        return {
            "samples": nan_g(space.from_latent(phi)),
            "log_prior": nan_g(lp_latent - space.log_jacobian(phi)),
            "log_likelihood": nan_g(ll),
            "acceptance_rate": nan_g(jnp.mean(trace.acceptance_rate, axis=-1)),
            "tau": nan_g(tau),
            "rhat": nan_g(rhat),
            "converged": converged,
            "usable": usable,
        }

    return jax.jit(kernel)


def _galaxy_keys(key, n_gal: int):
    """Per-galaxy keys ``fold_in(key, g)``, shape (n_gal,): galaxy g's stream ignores the chunk size."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n_gal))


_KERNELS: dict = {}


def _cached_kernel(emulator, prior, datamodel, settings):
    # artifacts without an id (e.g. an emulator fresh from select()) are keyed by the object itself
    key = (emulator.id or emulator, prior.id or prior, datamodel, settings)
    if key not in _KERNELS:
        _KERNELS[key] = make_fit_kernel(emulator, prior, datamodel, settings)
    return _KERNELS[key]


def fit_chunk(key, flux, flux_err, mask, *, emulator, prior, datamodel: DataModel, settings: FitSettings, field=None, pad_to=None):
    """Fit a chunk of galaxies; returns a dict of NumPy arrays (see :func:`make_fit_kernel` for the keys).

    ``flux``, ``flux_err`` (n_gal, n_band) nJy, ``mask`` bool (n_gal, n_band);
    ``field`` (n_gal,) int for per-field zero points. Inputs are validated
    (errors name the galaxy and band). ``pad_to``: pad the chunk with unusable
    dummy galaxies to this many rows so every chunk has one shape (the last,
    short chunk does not recompile); padding is stripped and does not change
    the real galaxies' results. The compiled kernel is cached per (emulator id,
    prior id, data model, settings) for the life of the process.
    """
    flux = np.asarray(flux, np.float32)
    flux_err = np.asarray(flux_err, np.float32)
    mask = np.asarray(mask)
    datamodel.validate(flux, flux_err, mask, field, where="fit_chunk")
    n_gal = flux.shape[0]
    if n_gal == 0:
        raise ValueError("fit_chunk: the chunk has no galaxies")
    if pad_to is not None:
        if pad_to < n_gal:
            raise ValueError(f"fit_chunk: pad_to={pad_to} is smaller than the chunk ({n_gal} galaxies)")
        extra = pad_to - n_gal
        flux = np.concatenate([flux, np.zeros((extra, flux.shape[1]), np.float32)])
        flux_err = np.concatenate([flux_err, np.ones((extra, flux.shape[1]), np.float32)])
        mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), bool)])
        if field is not None:
            field = np.concatenate([np.asarray(field), np.zeros(extra, np.asarray(field).dtype)])
    kernel = _cached_kernel(emulator, prior, datamodel, settings)
    out = kernel(key, flux, flux_err, mask, None if field is None else np.asarray(field, np.int32))
    return {k: np.asarray(v)[:n_gal] for k, v in out.items()}
