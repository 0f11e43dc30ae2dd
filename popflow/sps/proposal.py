"""Proposals: where in the parameter box the training and validation models are drawn.

Every proposal draws ``n`` physical points (n, dim) float32 inside the box with
``redshift`` in ``[z_min, z_max]`` (z_min = :data:`popflow.sps.bagpipes_model.Z_MIN`),
deterministically from a NumPy ``Generator``. ``log_mass`` is drawn uniformly
but does not matter: the simulator makes unit-mass models.

- ``"wide"`` (training default): a mixture of the analytic Prospector-alpha-like
  prior (:mod:`popflow.priors.analytic`) widened, with probability
  ``1 - uniform_fraction``, and the uniform distribution on the box, with
  probability ``uniform_fraction`` (default 0.2). Widened prior: SFR ratios
  Student-t (nu = 2) with scale :data:`WIDE_SFR_SCALE` (prior: 0.3) truncated to
  the box; ``dust2`` normal (0.3, :data:`WIDE_DUST2_SIGMA`) truncated to
  [0, 4] (truncated, never clipped: clipping piles draws on the edge);
  ``dust1_fraction`` normal (1, :data:`WIDE_DUST1_SIGMA`) truncated to [0, 2];
  ``log_zstar``, ``dust_index``, ``log_zgas``, ``log_u`` uniform. Redshift is
  uniform in both components.
- ``"prior"``: the analytic prior itself (``AnalyticPrior()``, the region fits
  visit), with draws below ``z_min`` redrawn: the held-out validation sets.
- ``"uniform"``: uniform on the box.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import stats

from popflow.params import DEFAULT_SPACE, ParameterSpace

__all__ = ["PROPOSALS", "draw", "describe", "WIDE_SFR_SCALE", "WIDE_DUST2_SIGMA", "WIDE_DUST1_SIGMA",
           "UNIFORM_FRACTION"]

PROPOSALS = ("wide", "prior", "uniform")
WIDE_SFR_SCALE = 0.8
WIDE_DUST2_SIGMA = 1.5
WIDE_DUST1_SIGMA = 0.6
UNIFORM_FRACTION = 0.2


def describe(kind: str, z_min: float, z_max: float, uniform_fraction: float = UNIFORM_FRACTION) -> dict:
    """The proposal's settings as a JSON-able dict (recorded in the training store)."""
    _check_kind(kind)
    d = {"kind": kind, "z_min": float(z_min), "z_max": float(z_max)}
    if kind == "wide":
        d.update(uniform_fraction=float(uniform_fraction), sfr_nu=2.0, sfr_scale=WIDE_SFR_SCALE,
                 dust2_mu=0.3, dust2_sigma=WIDE_DUST2_SIGMA, dust1_fraction_mu=1.0,
                 dust1_fraction_sigma=WIDE_DUST1_SIGMA)
    elif kind == "prior":
        from popflow.priors.analytic import AnalyticPrior

        d.update(prior_id=AnalyticPrior().id)
    return d


def _check_kind(kind: str) -> None:
    if kind not in PROPOSALS:
        raise ValueError(f"unknown proposal {kind!r}; choose one of {', '.join(PROPOSALS)}")


def _truncnorm(rng, mu, sigma, lo, hi, n):
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    return stats.truncnorm.rvs(a, b, loc=mu, scale=sigma, size=n, random_state=rng)


def _truncated_t(rng, nu, scale, lo, hi, n):
    """Student-t(nu, scale) truncated to [lo, hi] by inverse CDF (exact, no rejection loop)."""
    c_lo, c_hi = stats.t.cdf(lo / scale, nu), stats.t.cdf(hi / scale, nu)
    return scale * stats.t.ppf(c_lo + (c_hi - c_lo) * rng.random(n), nu)


def _uniform(rng, space, n, z_min, z_max):
    lo, hi = space.lower.astype(np.float64), space.upper.astype(np.float64)
    j = space.index("redshift")
    lo[j], hi[j] = z_min, z_max
    return lo + (hi - lo) * rng.random((n, space.dim))


def _wide(rng, space, n, z_min, z_max):
    theta = _uniform(rng, space, n, z_min, z_max)
    lo, hi = space.lower.astype(np.float64), space.upper.astype(np.float64)
    for i, name in enumerate(space.names):
        if name.startswith("logsfr_ratio"):
            theta[:, i] = _truncated_t(rng, 2.0, WIDE_SFR_SCALE, lo[i], hi[i], n)
    j = space.index("dust2")
    theta[:, j] = _truncnorm(rng, 0.3, WIDE_DUST2_SIGMA, lo[j], hi[j], n)
    j = space.index("dust1_fraction")
    theta[:, j] = _truncnorm(rng, 1.0, WIDE_DUST1_SIGMA, lo[j], hi[j], n)
    return theta


@functools.lru_cache(maxsize=4)
def _prior_sampler(space: ParameterSpace):
    """``AnalyticPrior(space).sample`` jitted once per process (un-jitted it retraces its rejection loops)."""
    import jax

    from popflow.priors.analytic import AnalyticPrior

    return jax.jit(AnalyticPrior(space).sample, static_argnums=1)


def _prior(rng, space, n, z_min, z_max):
    import jax

    sample = _prior_sampler(space)
    j = space.index("redshift")
    out = np.empty((0, space.dim))
    while out.shape[0] < n:
        key = jax.random.PRNGKey(int(rng.integers(2**31)))
        draws = np.asarray(sample(key, n), np.float64)
        keep = (draws[:, j] >= z_min) & (draws[:, j] <= z_max)
        out = np.concatenate([out, draws[keep]])
    return out[:n]


def draw(rng: np.random.Generator, n: int, kind: str = "wide", *, z_min: float, z_max: float = 6.0,
         uniform_fraction: float = UNIFORM_FRACTION, space: ParameterSpace = DEFAULT_SPACE) -> np.ndarray:
    """``n`` proposal draws, physical, shape (n, dim) float32 (see the module docstring for ``kind``)."""
    _check_kind(kind)
    j = space.index("redshift")
    if not space.lower[j] <= z_min < z_max <= space.upper[j]:
        raise ValueError(f"proposal: redshift range [{z_min}, {z_max}] is not inside the box "
                         f"[{space.lower[j]}, {space.upper[j]}]")
    if not 0.0 <= uniform_fraction <= 1.0:
        raise ValueError(f"proposal: uniform_fraction = {uniform_fraction} must lie in [0, 1]")
    if kind == "uniform":
        theta = _uniform(rng, space, n, z_min, z_max)
    elif kind == "prior":
        theta = _prior(rng, space, n, z_min, z_max)
    else:
        theta = _wide(rng, space, n, z_min, z_max)
        pick = rng.random(n) < uniform_fraction
        theta[pick] = _uniform(rng, space, int(pick.sum()), z_min, z_max)
    lo, hi = space.lower, space.upper
    theta = np.clip(theta.astype(np.float32), lo, hi)  # float32 rounding only; draws are inside the box
    theta[:, j] = np.maximum(theta[:, j], np.float32(z_min))
    return theta
