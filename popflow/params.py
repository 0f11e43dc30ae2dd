"""The parameter space: names, bounds, units and the latent transform.

This module is the single source of truth for what a point ``theta`` means.
Every other module takes a :class:`ParameterSpace` instead of hard-coding
names or bounds.

Sampling happens in an unbounded latent space (pop-cosmos, Alsing et al.
2024): ``theta_i = lo_i + (hi_i - lo_i) * Phi(phi_i)`` with ``Phi`` the
standard normal CDF.

pop-cosmos has 16 parameters; popflow keeps the 14 its offline SPS engine
(bagpipes) can express and drops the two AGN parameters (torus fraction and
optical depth), which have no counterpart there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri
from jax.scipy.stats import norm

__all__ = ["Parameter", "ParameterSpace", "DEFAULT_SPACE", "N_SFR_RATIOS"]

N_SFR_RATIOS = 6  # a 7-bin continuity SFH has 6 log SFR ratios


@dataclass(frozen=True)
class Parameter:
    """One SPS parameter: name, bounds (inclusive box), unit and a description."""

    name: str
    lower: float
    upper: float
    unit: str
    description: str

    def __post_init__(self):
        if not self.lower < self.upper:
            raise ValueError(f"parameter {self.name!r}: lower bound {self.lower} must be below upper {self.upper}")


@dataclass(frozen=True)
class ParameterSpace:
    """An ordered box of parameters with a probit latent transform.

    Arrays of points have shape ``(..., dim)`` with the last axis ordered as
    :attr:`names`. All transforms are pure ``jax.numpy`` functions (jit- and
    vmap-able) and accept NumPy or JAX arrays.
    """

    parameters: tuple[Parameter, ...]
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    # --- description -------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def dim(self) -> int:
        return len(self.parameters)

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds, shape (dim,), float32."""
        return np.array([p.lower for p in self.parameters], dtype=np.float32)

    @property
    def upper(self) -> np.ndarray:
        """Upper bounds, shape (dim,), float32."""
        return np.array([p.upper for p in self.parameters], dtype=np.float32)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(p.unit for p in self.parameters)

    def index(self, name: str) -> int:
        """Position of parameter ``name`` on the last axis."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown parameter {name!r}; known: {', '.join(self.names)}") from None

    def __getitem__(self, name: str) -> Parameter:
        return self.parameters[self.index(name)]

    def __len__(self) -> int:
        return self.dim

    # --- checks ------------------------------------------------------------
    def in_bounds(self, theta):
        """Boolean mask, shape ``theta.shape[:-1]``: every coordinate inside the box."""
        theta = jnp.asarray(theta)
        return jnp.all((theta >= self.lower) & (theta <= self.upper), axis=-1)

    def check(self, theta, what: str = "theta") -> np.ndarray:
        """Return ``theta`` as float32 NumPy, raising a ValueError naming the first offending parameter."""
        theta = np.asarray(theta, dtype=np.float32)
        if theta.shape[-1] != self.dim:
            raise ValueError(f"{what}: last axis has {theta.shape[-1]} entries, expected {self.dim} ({', '.join(self.names)})")
        bad = ~np.isfinite(theta) | (theta < self.lower) | (theta > self.upper)
        if bad.any():
            row, col = np.argwhere(bad.reshape(-1, self.dim))[0]
            p = self.parameters[col]
            raise ValueError(
                f"{what}: {p.name} = {theta.reshape(-1, self.dim)[row, col]} at row {row} is outside [{p.lower}, {p.upper}]"
            )
        return theta

    # --- latent transform --------------------------------------------------
    def from_latent(self, phi):
        """Physical ``theta = lo + (hi - lo) * Phi(phi)``; shape (..., dim) -> (..., dim)."""
        phi = jnp.asarray(phi)
        # clip: float32 rounding of lo + (hi - lo) * 1.0 can land a hair outside the box
        return jnp.clip(self.lower + (self.upper - self.lower) * ndtr(phi), self.lower, self.upper)

    def to_latent(self, theta):
        """Inverse of :meth:`from_latent`; points on the boundary map to +-inf."""
        theta = jnp.asarray(theta)
        u = (theta - self.lower) / (self.upper - self.lower)
        return ndtri(u)

    def log_jacobian(self, phi):
        """``log |d theta / d phi|`` summed over parameters; shape (..., dim) -> (...).

        A density in latent space is ``log p_phi(phi) = log p_theta(theta) + log_jacobian(phi)``.
        """
        phi = jnp.asarray(phi)
        return jnp.sum(jnp.log(self.upper - self.lower) + norm.logpdf(phi), axis=-1)

    @property
    def log_volume(self) -> float:
        """log of the box volume (the normaliser of a uniform density on it)."""
        return float(np.sum(np.log(self.upper.astype(np.float64) - self.lower.astype(np.float64))))

    # --- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        return {"parameters": [p.__dict__.copy() for p in self.parameters]}

    @classmethod
    def from_dict(cls, d: dict) -> "ParameterSpace":
        return cls(tuple(Parameter(**p) for p in d["parameters"]))

    @property
    def id(self) -> str:
        """sha256 of the canonical JSON description (first 16 hex digits)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def subset(self, names) -> "ParameterSpace":
        """A new space with only ``names`` (in that order)."""
        return ParameterSpace(tuple(self[n] for n in names))


def _pop_cosmos_space() -> ParameterSpace:
    sfr = tuple(
        Parameter(
            f"logsfr_ratio_{i}",
            -5.0,
            5.0,
            "dex",
            f"log10 SFR(bin {i}) / SFR(bin {i + 1}) of the 7-bin continuity SFH (bin 1 youngest)",
        )
        for i in range(1, N_SFR_RATIOS + 1)
    )
    return ParameterSpace(
        (
            Parameter("log_mass", 7.0, 13.0, "log10 Msun", "stellar mass formed"),
            Parameter("log_zstar", -1.98, 0.19, "log10 Zsun", "stellar metallicity"),
            *sfr,
            Parameter("dust2", 0.0, 4.0, "", "diffuse dust optical depth at 5500 A"),
            Parameter("dust_index", -1.0, 0.4, "", "attenuation slope offset from Calzetti"),
            Parameter("dust1_fraction", 0.0, 2.0, "", "birth-cloud / diffuse optical depth"),
            Parameter("log_zgas", -2.0, 0.5, "log10 Zsun", "gas-phase metallicity"),
            Parameter("log_u", -4.0, -1.0, "", "log10 ionisation parameter"),
            Parameter("redshift", 0.0, 6.0, "", "redshift"),
        )
    )


DEFAULT_SPACE: ParameterSpace = _pop_cosmos_space()
"""The 14-parameter pop-cosmos-like space of DESIGN.md (AGN parameters left out)."""
