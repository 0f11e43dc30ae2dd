"""What every popflow prior shares: the interface, the id, and the latent <-> physical bookkeeping.

A prior is a normalised density over the parameter box of its
:class:`~popflow.params.ParameterSpace`. ``log_prob(theta)`` is in physical
coordinates; ``log_prob_latent(phi)`` is the density of the probit latent
``phi = to_latent(theta)``, the two related by the Jacobian of
``from_latent`` (``space.log_jacobian``).
"""

from __future__ import annotations

import abc

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from popflow import artifacts
from popflow.params import ParameterSpace

__all__ = ["Prior", "LatentPrior", "clip_to_latent"]

# u = (theta - lo) / (hi - lo) is kept in [U_TINY, 1 - U_TINY] before the probit, so that points on the box
# boundary map to |phi| <= 5.2 instead of infinity (float32 resolves 1 - 1e-7).
U_TINY = 1e-7


def clip_to_latent(space: ParameterSpace, theta):
    """Latent ``phi`` of physical ``theta`` (..., dim) with boundary points pulled just inside the box."""
    theta = jnp.asarray(theta, jnp.float32)
    u = (theta - space.lower) / (space.upper - space.lower)
    return ndtri(jnp.clip(u, U_TINY, 1.0 - U_TINY))


class Prior(abc.ABC):
    """Base class: subclasses set ``kind``, ``space`` and ``_meta``/``_arrays`` and implement the densities."""

    kind: str = ""
    space: ParameterSpace
    _meta: dict
    _arrays: dict

    @abc.abstractmethod
    def log_prob(self, theta):
        """Physical log-density normalised over the box; (..., dim) -> (...), -inf outside."""

    def log_prob_latent(self, phi):
        """Latent log-density: ``log_prob(from_latent(phi)) + space.log_jacobian(phi)``; (..., dim) -> (...)."""
        phi = jnp.asarray(phi, jnp.float32)
        return self.log_prob(self.space.from_latent(phi)) + self.space.log_jacobian(phi)

    def init_log_prob_latent(self, phi):
        """A cheap stand-in for :meth:`log_prob_latent`, (..., dim) -> (...), that the fit uses only to find its
        starting points (scoring thousands of candidates, Newton steps, Laplace Hessians); its sampler always uses
        the exact density, so the stand-in changes the cost, not the posterior. Default: the density itself."""
        return self.log_prob_latent(phi)

    @property
    def id(self) -> str:
        """Content id: the artifact id :meth:`save` would return (sha256 of model.json and weights)."""
        return artifacts._digest(artifacts._json_bytes(self._meta), artifacts._weights_bytes(self._arrays))

    def save(self, path) -> str:
        """Write the prior as an artifact folder (model.json + weights.npz); returns its id."""
        return artifacts.save_artifact(path, self._meta, self._arrays)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, dim={self.space.dim}, id={self.id})"


class LatentPrior(Prior, abc.ABC):
    """A prior defined by a density over the latent space, after an affine whitening.

    ``z = W (phi - shift)`` with ``W`` lower-triangular (inverse Cholesky factor of the
    training samples' covariance), so ``log p(phi) = log p_z(z) + sum(log diag W)``.
    Subclasses implement ``_log_prob_white(z)`` (..., dim) -> (...) and ``_sample_white(key, n)``.
    """

    def _init_whitening(self, shift, whiten):
        self.shift = np.asarray(shift, np.float32)
        self.whiten = np.asarray(whiten, np.float32)
        self.unwhiten = np.linalg.inv(self.whiten.astype(np.float64)).astype(np.float32)
        self.log_det_whiten = float(np.sum(np.log(np.diag(self.whiten.astype(np.float64)))))

    @abc.abstractmethod
    def _log_prob_white(self, z):
        """Log-density of whitened latent points, (..., dim) -> (...)."""

    @abc.abstractmethod
    def _sample_white(self, key, n: int):
        """n whitened latent draws, (n, dim)."""

    def to_white(self, phi):
        return (jnp.asarray(phi, jnp.float32) - self.shift) @ self.whiten.T

    def from_white(self, z):
        return z @ self.unwhiten.T + self.shift

    def log_prob_latent(self, phi):
        """Latent log-density, (..., dim) -> (...)."""
        return self._log_prob_white(self.to_white(phi)) + self.log_det_whiten

    def log_prob(self, theta):
        """Physical log-density normalised over the box; (..., dim) -> (...), -inf outside."""
        theta = jnp.asarray(theta, jnp.float32)
        phi = clip_to_latent(self.space, theta)
        lp = self.log_prob_latent(phi) - self.space.log_jacobian(phi)
        return jnp.where(self.space.in_bounds(theta), lp, -jnp.inf)

    def sample(self, key, n: int):
        """n physical draws, shape (n, dim) float32."""
        return self.space.from_latent(self.from_white(self._sample_white(key, n)))


def whitening_from_samples(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and lower-triangular whitening matrix W (dim, dim) with W cov W^T = I."""
    phi = np.asarray(phi, np.float64)
    shift = phi.mean(0)
    cov = np.atleast_2d(np.cov(phi, rowvar=False))
    return shift, np.linalg.inv(np.linalg.cholesky(cov))
