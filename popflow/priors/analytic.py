"""The analytic Prospector-alpha-like population prior (the pop-cosmos baseline).

Components (Leja et al. 2017, 2019; Alsing et al. 2024 appendix), by parameter name:

- ``log_mass``: uniform over its bounds.
- ``log_zstar``: truncated normal on its bounds around the Gallazzi et al. (2005)
  mass-metallicity relation (median, 16th and 84th percentiles tabulated in
  SCIENCE.md, interpolated linearly in log mass and held constant beyond the
  table). Scale convention: ``sigma = zstar_sigma_factor * (p84 - p16)``; the
  default factor 1.0 is Prospector's ``MassMet`` choice (twice the Gaussian
  sigma, widened on purpose for systematics, Leja et al. 2019); 0.5 gives the
  literal Gaussian-equivalent width.
- ``logsfr_ratio_*``: Student-t (nu = 2, scale 0.3, centred on 0) truncated to
  the bounds [-5, 5], normalised by the truncated mass.
- ``dust2``: normal (mu 0.3, sigma 1) truncated to [0, 4]; ``dust1_fraction``:
  normal (mu 1, sigma 0.3) truncated to [0, 2]. Prospector "clips" these; a
  truncated normal is the normalised density of that intent (clipping piles mass
  on the edge, DESIGN.md pitfalls).
- ``redshift``: uniform, or a user n(z) given as a table (z, density), linearly
  interpolated, zero outside the table and normalised over the box by the code.
- any other parameter (``dust_index``, ``log_zgas``, ``log_u``, ...): uniform.

The joint density is the product (metallicity conditional on mass), normalised
over the parameter box, -inf outside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from jax.scipy.stats import norm
from jax.scipy.stats import t as student_t
from scipy import stats

from popflow.params import DEFAULT_SPACE, ParameterSpace
from popflow.priors.base import Prior

__all__ = ["AnalyticPrior", "GALLAZZI05", "SFR_NU"]

SFR_NU = 2.0  # Student-t degrees of freedom of the SFR-ratio prior (Prospector-alpha, Leja et al. 2019), fixed

# Gallazzi et al. (2005) as tabulated for Prospector: log M*, median, p16, p84 of log Z*/Zsun.
GALLAZZI05 = np.array(
    [
        [8.87, 9.07, 9.27, 9.47, 9.68, 9.87, 10.07, 10.27, 10.47, 10.68, 10.87, 11.07, 11.27, 11.47, 11.68, 11.87],
        [-0.60, -0.61, -0.65, -0.61, -0.52, -0.41, -0.23, -0.11, -0.01, 0.04, 0.07, 0.10, 0.12, 0.13, 0.14, 0.15],
        [-1.11, -1.07, -1.10, -1.03, -0.97, -0.90, -0.80, -0.65, -0.41, -0.24, -0.14, -0.09, -0.06, -0.04, -0.03, -0.03],
        [-0.00, -0.00, -0.05, -0.01, 0.05, 0.09, 0.14, 0.17, 0.20, 0.22, 0.24, 0.25, 0.26, 0.28, 0.29, 0.30],
    ]
)


def _log_truncnorm(x, mu, sigma, lo, hi):
    """log N(x; mu, sigma) truncated to [lo, hi], normalised."""
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    return norm.logpdf((x - mu) / sigma) - jnp.log(sigma) - jnp.log(ndtr(b) - ndtr(a))


class AnalyticPrior(Prior):
    """Prospector-alpha-like prior over ``space`` (default: the 14-parameter DEFAULT_SPACE).

    nz: optional ``(z, density)`` pair of 1-D arrays (z increasing, density >= 0)
    for the redshift marginal; normalised over the redshift bounds here.
    """

    kind = "analytic"

    def __init__(
        self,
        space: ParameterSpace = DEFAULT_SPACE,
        *,
        zstar_sigma_factor: float = 1.0,
        sfr_scale: float = 0.3,
        dust2_mu: float = 0.3,
        dust2_sigma: float = 1.0,
        dust1_fraction_mu: float = 1.0,
        dust1_fraction_sigma: float = 0.3,
        nz=None,
    ):
        self.space = space
        self.settings = dict(
            zstar_sigma_factor=float(zstar_sigma_factor),
            sfr_scale=float(sfr_scale),
            dust2_mu=float(dust2_mu),
            dust2_sigma=float(dust2_sigma),
            dust1_fraction_mu=float(dust1_fraction_mu),
            dust1_fraction_sigma=float(dust1_fraction_sigma),
        )
        names = space.names
        if "log_zstar" in names and "log_mass" not in names:
            raise ValueError("AnalyticPrior: log_zstar's mass-metallicity prior needs a log_mass parameter in the space")
        self._lo, self._hi = space.lower.astype(np.float64), space.upper.astype(np.float64)
        self._sfr = [i for i, n in enumerate(names) if n.startswith("logsfr_ratio")]
        self._truncnorm = {
            space.index(n): (self.settings[f"{n}_mu"], self.settings[f"{n}_sigma"]) for n in ("dust2", "dust1_fraction") if n in names
        }
        special = set(self._sfr) | set(self._truncnorm) | {space.index(n) for n in ("log_zstar", "redshift") if n in names}
        self._uniform = [i for i in range(space.dim) if i not in special]
        # Student-t truncated to each ratio's bounds: log of the kept probability mass (float64).
        sc, nu = self.settings["sfr_scale"], SFR_NU
        self._sfr_log_mass = np.array(
            [np.log(stats.t.cdf(self._hi[i] / sc, nu) - stats.t.cdf(self._lo[i] / sc, nu)) for i in self._sfr]
        )
        self._nz = None if nz is None else self._nz_table(*nz)
        arrays = {} if self._nz is None else {"nz_z": self._nz[0].astype(np.float32), "nz_density": self._nz[1].astype(np.float32)}
        self._meta = {
            "kind": self.kind,
            "space": space.to_dict(),
            "settings": {**self.settings, "redshift": "uniform" if self._nz is None else "table"},
            "description": "Prospector-alpha-like analytic prior (pop-cosmos baseline); see popflow/priors/analytic.py",
        }
        self._arrays = arrays

    # --- n(z) table ---------------------------------------------------------------
    def _nz_table(self, z, density):
        if "redshift" not in self.space.names:
            raise ValueError("AnalyticPrior: an n(z) table was given but the space has no 'redshift' parameter")
        z, d = np.asarray(z, np.float64).ravel(), np.asarray(density, np.float64).ravel()
        if z.shape != d.shape or z.size < 2:
            raise ValueError(f"n(z) table: z and density must be 1-D of equal length >= 2 (got {z.shape}, {d.shape})")
        if np.any(np.diff(z) <= 0) or np.any(d < 0) or not np.all(np.isfinite(d)):
            raise ValueError("n(z) table: z must increase strictly and density be finite and >= 0")
        j = self.space.index("redshift")
        lo, hi = float(self.space.lower[j]), float(self.space.upper[j])
        inside = (z > lo) & (z < hi)
        edges = [x for x in (lo, hi) if z[0] <= x <= z[-1]]
        zz = np.unique(np.concatenate([z[inside], edges]))
        dd = np.interp(zz, z, d)
        if zz.size < 2 or np.trapezoid(dd, zz) <= 0:
            raise ValueError(f"n(z) table has no probability inside the redshift bounds [{lo}, {hi}]")
        # float32 storage must reproduce the table exactly on reload
        return zz.astype(np.float32).astype(np.float64), dd.astype(np.float32).astype(np.float64)

    # --- density -----------------------------------------------------------------------
    def log_prob(self, theta):
        """Log-density of physical theta (..., dim) -> (...), normalised over the box, -inf outside."""
        theta = jnp.asarray(theta, jnp.float32)
        sp, s = self.space, self.settings
        lp = -jnp.float32(np.sum(np.log(self._hi[self._uniform] - self._lo[self._uniform])))
        if "log_zstar" in sp.names:
            j, m = sp.index("log_zstar"), theta[..., sp.index("log_mass")]
            mu = jnp.interp(m, GALLAZZI05[0], GALLAZZI05[1])
            sigma = s["zstar_sigma_factor"] * (jnp.interp(m, GALLAZZI05[0], GALLAZZI05[3]) - jnp.interp(m, GALLAZZI05[0], GALLAZZI05[2]))
            lp = lp + _log_truncnorm(theta[..., j], mu, sigma, self._lo[j], self._hi[j])
        if self._sfr:
            r = theta[..., self._sfr] / s["sfr_scale"]
            lp = lp + jnp.sum(student_t.logpdf(r, SFR_NU) - np.log(s["sfr_scale"]) - self._sfr_log_mass, axis=-1)
        for j, (mu, sigma) in self._truncnorm.items():
            lp = lp + _log_truncnorm(theta[..., j], mu, sigma, self._lo[j], self._hi[j])
        if "redshift" in sp.names:
            j = sp.index("redshift")
            if self._nz is None:
                lp = lp - np.log(self._hi[j] - self._lo[j])
            else:
                zt, dt = self._nz
                dens = jnp.interp(theta[..., j], zt, dt / np.trapezoid(dt, zt), left=0.0, right=0.0)
                lp = lp + jnp.log(dens)
        return jnp.where(sp.in_bounds(theta), lp, -jnp.inf).astype(jnp.float32)

    # --- sampling ----------------------------------------------------------------------
    def sample(self, key, n: int):
        """n physical draws (n, dim) float32, exact (inverse CDFs and truncated normals)."""
        sp, s = self.space, self.settings
        keys = iter(jax.random.split(key, sp.dim + 1))
        cols = {}
        for i in self._uniform:
            cols[i] = jax.random.uniform(next(keys), (n,), minval=self._lo[i], maxval=self._hi[i])
        if "log_zstar" in sp.names:
            j, m = sp.index("log_zstar"), cols[sp.index("log_mass")]
            mu = jnp.interp(m, GALLAZZI05[0], GALLAZZI05[1])
            sigma = s["zstar_sigma_factor"] * (jnp.interp(m, GALLAZZI05[0], GALLAZZI05[3]) - jnp.interp(m, GALLAZZI05[0], GALLAZZI05[2]))
            cols[j] = mu + sigma * jax.random.truncated_normal(next(keys), (self._lo[j] - mu) / sigma, (self._hi[j] - mu) / sigma, (n,))
        for i in self._sfr:
            cols[i] = s["sfr_scale"] * _truncated_t2(next(keys), self._lo[i] / s["sfr_scale"], self._hi[i] / s["sfr_scale"], n)
        for j, (mu, sigma) in self._truncnorm.items():
            cols[j] = mu + sigma * jax.random.truncated_normal(next(keys), (self._lo[j] - mu) / sigma, (self._hi[j] - mu) / sigma, (n,))
        if "redshift" in sp.names:
            j = sp.index("redshift")
            u = jax.random.uniform(next(keys), (n,))
            cols[j] = self._lo[j] + (self._hi[j] - self._lo[j]) * u if self._nz is None else _sample_piecewise_linear(u, *self._nz)
        theta = jnp.stack([cols[i] for i in range(sp.dim)], axis=-1).astype(jnp.float32)
        return jnp.clip(theta, sp.lower, sp.upper)

    @classmethod
    def from_artifact(cls, meta: dict, arrays: dict) -> "AnalyticPrior":
        settings = {k: v for k, v in meta["settings"].items() if k != "redshift"}
        nz = (arrays["nz_z"], arrays["nz_density"]) if meta["settings"].get("redshift") == "table" else None
        return cls(ParameterSpace.from_dict(meta["space"]), nz=nz, **settings)


def _t2_cdf(x):
    """CDF of the Student-t with nu = 2 (closed form)."""
    return 0.5 + x / (2.0 * jnp.sqrt(2.0 + x**2))


def _truncated_t2(key, lo: float, hi: float, n: int):
    """n Student-t(nu = 2) draws truncated to [lo, hi] (standard scale), exact inverse CDF:
    a = 2F - 1 = x / sqrt(2 + x^2)  =>  x = a sqrt(2 / (1 - a^2))."""
    u = jax.random.uniform(key, (n,), minval=_t2_cdf(lo), maxval=_t2_cdf(hi))
    a = 2.0 * u - 1.0
    return a * jnp.sqrt(2.0 / (1.0 - a**2))


def _sample_piecewise_linear(u, z, d):
    """Inverse CDF of the piecewise-linear density through (z, d) (normalised here) at u in [0, 1)."""
    w = np.diff(z)
    seg_mass = 0.5 * (d[:-1] + d[1:]) * w
    cdf = np.concatenate([[0.0], np.cumsum(seg_mass)]) / np.sum(seg_mass)
    dn = d / np.sum(seg_mass)
    k = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, len(w) - 1)
    r = u - cdf[k]  # probability still to cover inside segment k
    d0, slope = dn[:-1][k], ((dn[1:] - dn[:-1]) / w)[k]
    # solve d0 s + slope s^2 / 2 = r for s in [0, w] (stable root form; d0 = 0 and slope = 0 cannot both hold where r > 0)
    s = 2 * r / (d0 + jnp.sqrt(jnp.maximum(d0**2 + 2 * slope * r, 0.0)))
    s = jnp.where(r > 0, s, 0.0)
    return jnp.clip(z[:-1][k] + s, z[0], z[-1]).astype(jnp.float32)
