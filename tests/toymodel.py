"""A toy forward model and a uniform prior with popflow's interfaces, for tests that must not depend on a trained network.

:class:`ToyEmulator` implements the Emulator protocol (``space``, ``bands``,
``filters``, ``id``, ``error_floor``, ``magnitudes``, ``in_domain``, ``select``)
with an analytic, smooth function of all 14 parameters of DEFAULT_SPACE. Its
redshift signal is a Balmer/4000 A break and a Lyman break moving through the
bands with (1 + z), plus dust reddening, an SFH-dependent UV slope, metallicity
and emission-line terms, a toy luminosity distance and the exact mass scaling
``m(log_mass + 1) = m - 2.5``. It is not a galaxy model, just a smooth
likelihood surface with the right kind of structure (colour-redshift
degeneracies, prior-dominated directions).

:class:`UniformPrior` is uniform on the parameter box with the Prior interface.

Import as ``from tests.toymodel import ToyEmulator, UniformPrior`` (run pytest
from the repository root) or use the ``toy_emulator`` fixture of conftest.py.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from popflow.params import DEFAULT_SPACE, ParameterSpace

__all__ = ["ToyEmulator", "UniformPrior", "LSST_BANDS", "simulate_photometry", "typical_theta"]

# name, filter identifier (speclite), effective wavelength [Angstrom]
LSST_BANDS = (
    ("u", "lsst_baseline_u", 3670.0),
    ("g", "lsst_baseline_g", 4830.0),
    ("r", "lsst_baseline_r", 6220.0),
    ("i", "lsst_baseline_i", 7560.0),
    ("z", "lsst_baseline_z", 8700.0),
    ("y", "lsst_baseline_y", 9750.0),
)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


class ToyEmulator:
    """Analytic toy photometry: theta (..., 14) physical -> AB magnitudes (..., n_bands)."""

    def __init__(self, bands=LSST_BANDS, space: ParameterSpace = DEFAULT_SPACE, error_floor: float = 0.01):
        self.space = space
        self._table = tuple((str(b), str(f), float(w)) for b, f, w in bands)
        self.bands = tuple(b for b, _, _ in self._table)
        self.filters = tuple(f for _, f, _ in self._table)
        self._wave = np.array([w for _, _, w in self._table], np.float32)
        self.error_floor = np.full(len(self.bands), error_floor, np.float32)
        blob = json.dumps({"toy": 1, "bands": self._table, "space": space.to_dict(), "floor": float(error_floor)}, sort_keys=True)
        self.id = "toy-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
        self._floor = float(error_floor)

    def magnitudes(self, theta):
        """Apparent AB magnitudes, (..., dim) -> (..., n_bands) float32; pure jax."""
        theta = jnp.asarray(theta, jnp.float32)
        p = {n: theta[..., self.space.index(n), None] for n in self.space.names}
        z = p["redshift"]
        lam = jnp.asarray(self._wave) / (1.0 + z)  # rest-frame wavelength of each band, (..., n_bands)
        x = jnp.log(lam / 5500.0)
        sfr_recent = (p["logsfr_ratio_1"] + p["logsfr_ratio_2"]) / 2.0
        sfr_old = (p["logsfr_ratio_4"] + p["logsfr_ratio_5"] + p["logsfr_ratio_6"]) / 3.0
        age_signal = jnp.tanh(sfr_old - p["logsfr_ratio_3"] / 2.0)  # > 0: old population dominates
        balmer = (0.9 + 0.5 * age_signal + 0.15 * p["log_zstar"]) * _sigmoid((4000.0 - lam) / 250.0)
        lyman = 3.0 * _sigmoid((1216.0 - lam) / 80.0)
        # attenuation A = 1.086 tau (lambda / 5500)^n, n ~ -0.5 (Calzetti-like A_1500 / A_V ~ 2), steeper for dust_index < 0
        dust = 1.086 * p["dust2"] * (1.0 + 0.3 * p["dust1_fraction"]) * jnp.exp((-0.5 + 0.5 * p["dust_index"]) * x)
        uv_slope = -0.4 * jnp.tanh(sfr_recent) * jnp.minimum(x, 0.0)
        metal = 0.1 * p["log_zstar"] * x
        lines = -(0.15 * (p["log_u"] + 4.0) / 3.0) * jnp.exp(-0.5 * ((lam - 5007.0) / 400.0) ** 2) - 0.1 * (
            p["log_zgas"] + 2.0
        ) / 2.5 * jnp.exp(-0.5 * ((lam - 6563.0) / 400.0) ** 2)
        dist = 5.0 * jnp.log10((z + 0.02) * (1.0 + 0.6 * z))  # toy luminosity distance (arbitrary units)
        m = 23.0 + dist - 2.5 * (p["log_mass"] - 10.0) + balmer + lyman + dust + uv_slope + metal + lines
        return m.astype(jnp.float32)

    def in_domain(self, theta):
        """The whole parameter box, (..., dim) -> (...) bool."""
        return self.space.in_bounds(theta)

    def select(self, filters) -> "ToyEmulator":
        """A toy emulator restricted to / reordered as ``filters`` (identifiers or band names)."""
        filters = [filters] if isinstance(filters, str) else list(filters)
        rows = []
        for f in filters:
            hit = [r for r in self._table if f in (r[0], r[1])]
            if not hit:
                raise KeyError(f"toy emulator does not cover filter {f!r}; it covers: {', '.join(self.filters)}")
            rows.append(hit[0])
        return ToyEmulator(tuple(rows), self.space, self._floor)

    def __repr__(self) -> str:
        return f"ToyEmulator(id={self.id!r}, bands={self.bands})"


class UniformPrior:
    """Uniform density on the parameter box (physical); standard normal in the probit latent space."""

    def __init__(self, space: ParameterSpace = DEFAULT_SPACE):
        self.space = space
        self.id = "uniform-" + space.id

    def log_prob(self, theta):
        """(..., dim) -> (...): -log(volume) inside the box, -inf outside."""
        theta = jnp.asarray(theta, jnp.float32)
        return jnp.where(self.space.in_bounds(theta), -jnp.float32(self.space.log_volume), -jnp.inf)

    def log_prob_latent(self, phi):
        """(..., dim) -> (...): the uniform box is a standard normal in the latent space."""
        return jnp.sum(norm.logpdf(jnp.asarray(phi, jnp.float32)), axis=-1)

    def sample(self, key, n: int):
        """n physical draws, (n, dim)."""
        u = jax.random.uniform(key, (n * self.space.dim,)).reshape(n, self.space.dim)
        return jnp.asarray(self.space.lower + (self.space.upper - self.space.lower) * u)


def typical_theta(n: int, seed: int = 0, space: ParameterSpace = DEFAULT_SPACE):
    """n plausible galaxies (n, dim): log_mass 9.5-11.5, redshift 0.1-3, dust2 0-1, other parameters in the middle
    half of their range (probit latent ~ N(0, 0.5^2)); NumPy generator ``seed``."""
    rng = np.random.default_rng(seed)
    theta = np.asarray(space.from_latent(0.5 * rng.normal(size=(n, space.dim))), np.float32).copy()
    theta[:, space.index("log_mass")] = rng.uniform(9.5, 11.5, n)
    theta[:, space.index("redshift")] = rng.uniform(0.1, 3.0, n)
    theta[:, space.index("dust2")] = rng.uniform(0.0, 1.0, n)
    return theta


def simulate_photometry(emulator, theta, snr, seed: int = 0):
    """Noisy fluxes for true ``theta`` (n, dim): returns ``(flux, flux_err, mask)`` (n, n_band) float32 nJy.

    Errors are ``flux / snr`` of the noiseless flux in every band (``snr`` scalar or (n_band,)),
    with Gaussian noise drawn from NumPy's generator ``seed``.
    """
    rng = np.random.default_rng(seed)
    true = 10.0 ** (-0.4 * (np.asarray(emulator.magnitudes(theta), np.float64) - 31.4))
    err = np.abs(true) / np.asarray(snr, np.float64)
    flux = true + err * rng.normal(size=true.shape)
    return flux.astype(np.float32), err.astype(np.float32), np.ones(true.shape, bool)
