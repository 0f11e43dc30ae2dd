"""Gaussian mixtures with known densities: the correctness targets of the priors.

A diffusion or flow prior trained on samples of a :class:`GaussianMixture`
can be checked against its exact log-density. :func:`gmm_target` builds the
fixed 2-D and 16-D targets used by the tests and benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

__all__ = ["GaussianMixture", "gmm_target"]


class GaussianMixture:
    """A mixture of full-covariance Gaussians in R^dim.

    weights (k,), means (k, dim), covs (k, dim, dim); stored as float64 NumPy,
    evaluated in float32 JAX.
    """

    def __init__(self, weights, means, covs):
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.means = np.asarray(means, dtype=np.float64)
        self.covs = np.asarray(covs, dtype=np.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"mixture shapes disagree: weights {self.weights.shape}, means {self.means.shape}, covs {self.covs.shape}")
        self.chol = np.linalg.cholesky(self.covs)
        self._prec_chol = np.linalg.inv(self.chol)  # L^-1, (k, d, d)
        self._log_norm = np.log(self.weights) - np.sum(np.log(np.diagonal(self.chol, axis1=1, axis2=2)), -1) - 0.5 * d * np.log(2 * np.pi)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x):
        """Exact log-density; x (..., dim) -> (...)."""
        x = jnp.asarray(x, jnp.float32)
        diff = x[..., None, :] - self.means.astype(np.float32)  # (..., k, d)
        white = jnp.einsum("kij,...kj->...ki", self._prec_chol.astype(np.float32), diff)
        return logsumexp(self._log_norm.astype(np.float32) - 0.5 * jnp.sum(white**2, -1), axis=-1)

    def affine(self, matrix, shift) -> "GaussianMixture":
        """The mixture of ``matrix @ (x - shift)`` (e.g. a prior's whitening): matrix (dim, dim), shift (dim,)."""
        a, c = np.asarray(matrix, np.float64), np.asarray(shift, np.float64)
        return GaussianMixture(self.weights, (self.means - c) @ a.T, a @ self.covs @ a.T)

    def noised_log_prob(self, x, alpha, std):
        """Exact log-density of ``alpha X + std N(0, I)``, X from this mixture: the marginal of a linear diffusion SDE.

        x (dim,) or (..., dim); alpha, std scalars (jax-traceable). Component k becomes N(alpha mu_k,
        Q_k diag(alpha^2 lam_k + std^2) Q_k^T) with ``cov_k = Q_k diag(lam_k) Q_k^T``; ``jax.grad`` of this is the
        exact score that a diffusion model's network approximates.
        """
        lam, q = np.linalg.eigh(self.covs)  # (k, d), (k, d, d)
        x = jnp.asarray(x, jnp.float32)
        var = alpha**2 * lam.astype(np.float32) + std**2  # (k, d)
        proj = jnp.einsum("kji,...kj->...ki", q.astype(np.float32), x[..., None, :] - alpha * self.means.astype(np.float32))
        comp = -0.5 * jnp.sum(proj**2 / var + jnp.log(2 * jnp.pi * var), -1) + np.log(self.weights).astype(np.float32)
        return logsumexp(comp, axis=-1)

    def sample(self, key, n: int):
        """n draws, shape (n, dim) float32."""
        kc, kz = jax.random.split(key)
        comp = jax.random.choice(kc, len(self.weights), (n,), p=jnp.asarray(self.weights, jnp.float32))
        z = jax.random.normal(kz, (n, self.dim))
        return (self.means.astype(np.float32)[comp] + jnp.einsum("nij,nj->ni", self.chol.astype(np.float32)[comp], z)).astype(jnp.float32)


def gmm_target(dim: int, seed: int = 0, n_components: int = 3) -> GaussianMixture:
    """A fixed, well-conditioned but clearly non-Gaussian mixture in ``dim`` dimensions.

    Means spread over about +-1.5 with random covariances whose standard
    deviations lie in [0.25, 0.6], so the components overlap partly and the
    latent points stay inside |x| < ~3 (where the probit map of a parameter box
    keeps the physical density bounded).
    """
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1.5, 1.5, (n_components, dim))
    covs = []
    for _ in range(n_components):
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        sd = rng.uniform(0.25, 0.6, dim)
        covs.append((q * sd**2) @ q.T)
    weights = rng.uniform(0.5, 1.0, n_components)
    return GaussianMixture(weights, means, np.stack(covs))
