"""A batched affine-invariant ensemble sampler and its diagnostics.

The stretch move of Goodman & Weare (2010), as in emcee (Foreman-Mackey et al.
2013), optionally mixed with the differential-evolution move of ter Braak
(2006) (emcee's ``DEMove``; scale 2.38 / sqrt(2 d), and 1 one time in ten to
jump between modes) and with an independence Metropolis-Hastings move whose
proposal is a fixed per-galaxy Gaussian mixture (e.g. Laplace approximations
at the posterior's modes: the move carries walkers between separated modes with
the right weights, which no move built from the ensemble's own positions can),
written as pure ``init`` / ``step`` / ``run`` functions over arrays and
vectorised over galaxies AND walkers: every galaxy g has its own ensemble of
``n_walk`` walkers in ``d`` dimensions, and all ensembles move in one call.

The target is a function ``log_prob_fn(x)`` of positions ``x`` of shape
``(n_gal, k, d)`` (any ``k``) returning the log density ``(n_gal, k)``, or a
tuple ``(log_density, aux)`` where ``aux`` is a pytree of per-walker extras with
leading axes ``(n_gal, k)`` (e.g. the likelihood and prior terms) that the
sampler carries along and records with the chains. Row g of the output must
depend only on row g of the input.

Randomness is drawn per galaxy from ``keys`` of shape ``(n_gal,)``, so a galaxy's
chain does not depend on which other galaxies share its batch (padding a chunk
changes nothing for the real galaxies).

Diagnostics: the integrated autocorrelation time with Sokal's adaptive window
(as emcee's ``integrated_time``, ACF averaged over walkers) and the
rank-normalised split R-hat of Vehtari et al. (2021) across independent
ensembles. (R-hat over the walkers of ONE ensemble is a poor criterion: the
walkers are coupled, and a chain shorter than the many-tau a single walker
needs to cover the posterior flags a healthy ensemble.)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

__all__ = ["EnsembleState", "Trace", "Mixture", "init", "step", "run", "autocorr_time", "ensemble_rhat"]


class EnsembleState(NamedTuple):
    """Walker positions ``(n_gal, n_walk, d)``, their log density ``(n_gal, n_walk)`` and ``aux`` extras."""

    positions: jax.Array
    log_prob: jax.Array
    aux: Any = ()


class Trace(NamedTuple):
    """Thinned chains: ``positions`` (n_gal, n_walk, n_draw, d), ``log_prob`` (n_gal, n_walk, n_draw),
    ``aux`` (leaves (n_gal, n_walk, n_draw, ...)), ``acceptance_rate`` (n_gal, n_walk) over all steps run."""

    positions: jax.Array
    log_prob: jax.Array
    aux: Any
    acceptance_rate: jax.Array


class Mixture(NamedTuple):
    """A Gaussian mixture per galaxy, the independence move's proposal.

    ``mean`` (n_gal, S, d); component covariances ``evecs diag(sd^2) evecs^T``
    with ``evecs`` (n_gal, S, d, d) orthonormal columns and ``sd`` (n_gal, S, d);
    ``log_weight`` (n_gal, S), unnormalised, ``-inf`` for an unused component.
    """

    mean: jax.Array
    evecs: jax.Array
    sd: jax.Array
    log_weight: jax.Array

    def log_density(self, x):
        """Log density up to a constant shared by all points of a galaxy; ``x`` (n_gal, k, d) -> (n_gal, k)."""
        white = jnp.einsum("gsji,gksj->gksi", self.evecs, x[:, :, None, :] - self.mean[:, None]) / self.sd[:, None]
        log_comp = self.log_weight[:, None] - jnp.sum(jnp.log(self.sd), axis=-1)[:, None] - 0.5 * jnp.sum(white**2, axis=-1)
        return jax.nn.logsumexp(log_comp, axis=-1)

    def draw(self, u, noise):
        """Draws (n_gal, k, d) from uniforms ``u`` (n_gal, k) (the component) and standard normals ``noise`` (n_gal, k, d)."""
        p = jax.nn.softmax(self.log_weight, axis=-1)
        comp = jnp.sum(u[..., None] > jnp.cumsum(p, axis=-1)[:, None], axis=-1)
        last = self.mean.shape[1] - 1 - jnp.argmax((p > 0)[:, ::-1], axis=-1)  # rounding never picks an unused one
        comp = jnp.minimum(comp, last[:, None])
        take = lambda a: jnp.take_along_axis(a, comp.reshape(comp.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        return take(self.mean) + jnp.einsum("gkij,gkj->gki", take(self.evecs), take(self.sd) * noise)


def _evaluate(log_prob_fn: Callable, x):
    out = log_prob_fn(x)
    logp, aux = out if isinstance(out, tuple) else (out, ())
    # NaN densities (e.g. a model evaluated off its domain) are rejected like -inf
    return jnp.where(jnp.isnan(logp), -jnp.inf, logp), aux


def init(positions, log_prob_fn: Callable) -> EnsembleState:
    """The initial state: evaluate ``log_prob_fn`` at ``positions`` (n_gal, n_walk, d)."""
    positions = jnp.asarray(positions)
    if positions.ndim != 3:
        raise ValueError(f"positions must have shape (n_gal, n_walk, d), got {positions.shape}")
    n_walk, d = positions.shape[1:]
    if n_walk % 2 or n_walk < 2 * d:
        raise ValueError(f"the stretch move needs an even number of walkers >= 2 d = {2 * d}; got {n_walk}")
    logp, aux = _evaluate(log_prob_fn, positions)
    return EnsembleState(positions, logp, aux)


class _Moves(NamedTuple):
    """Random numbers of one step for one galaxy; leading axis 2 = which half of the walkers moves."""

    z: jax.Array  # (2, h) stretch factors
    j: jax.Array  # (2, h) partner index in the complementary half
    l: jax.Array  # (2, h) second partner (differential evolution), != j
    log_u: jax.Array  # (2, h) log uniforms for the accept step
    comp: jax.Array  # (2, h) uniforms choosing the mixture component (independence move)
    use_de: jax.Array  # (2,) bool: this half makes a differential-evolution move
    use_ind: jax.Array  # (2,) bool: this half makes an independence move
    gamma: jax.Array  # (2,) DE scale (gamma0, or 1 for a mode jump)
    noise: jax.Array  # (2, h, d) standard normal: DE jitter or the independence draw


def _draw_moves(key, n_half: int, d: int, a: float, de_prob: float, ind_prob: float) -> _Moves:
    """One galaxy's random numbers for one step (flat draws: multi-dimensional threefry draws take XLA:CPU ~10x
    longer to compile)."""
    k_u, k_n = jax.random.split(key)
    u = jax.random.uniform(k_u, (5 * 2 * n_half + 6,))
    v = u[: 10 * n_half].reshape(5, 2, n_half)
    # inverse CDF of g(z) ∝ 1/sqrt(z) on [1/a, a]: z = ((a - 1) u + 1)^2 / a  (Goodman & Weare 2010, eq. 9)
    z = ((a - 1.0) * v[0] + 1.0) ** 2 / a
    j = jnp.minimum(jnp.floor(v[1] * n_half).astype(jnp.int32), n_half - 1)
    dl = jnp.minimum(jnp.floor(v[2] * (n_half - 1)).astype(jnp.int32), n_half - 2)
    l = (j + 1 + dl) % n_half
    w = u[10 * n_half :].reshape(3, 2)
    gamma0 = 2.38 / jnp.sqrt(2.0 * d)  # ter Braak (2006); emcee's DEMove default
    gamma = jnp.where(w[1] < 0.1, 1.0, gamma0)  # gamma = 1 one time in ten: jumps between modes (ter Braak 2006)
    noise = jax.random.normal(k_n, (2 * n_half * d,)).reshape(2, n_half, d)
    use_ind = w[2] < ind_prob
    return _Moves(z, j, l, jnp.log(v[3]), v[4], ~use_ind & (w[0] < de_prob), use_ind, gamma, noise)


def _tree_where(cond, a, b):
    """Select per walker between two pytrees with leaves (n_gal, k, ...); ``cond`` (n_gal, k)."""

    def sel(x, y):
        c = cond.reshape(cond.shape + (1,) * (x.ndim - cond.ndim))
        return jnp.where(c, x, y)

    return jax.tree.map(sel, a, b)


def _half_update(active: EnsembleState, partners, log_prob_fn, mv: _Moves, mixture: Mixture | None):
    """Move the ``active`` half against the complementary half's positions ``partners``.

    ``mv`` fields here have the half axis removed: z, j, l, log_u, comp (n_gal, h); use_de, use_ind,
    gamma (n_gal,); noise (n_gal, h, d). ``mixture``: the independence proposal (None: no such move).
    """
    d = active.positions.shape[-1]
    x_j = jnp.take_along_axis(partners, mv.j[..., None], axis=1)
    x_l = jnp.take_along_axis(partners, mv.l[..., None], axis=1)
    # stretch move: Y = X_j + z (X_k - X_j), accepted with min(1, z^(d-1) p(Y) / p(X_k))
    stretch = x_j + mv.z[..., None] * (active.positions - x_j)
    # differential evolution: Y = X_k + gamma (X_j - X_l) + 1e-5 jitter, symmetric, accepted with min(1, p(Y) / p(X_k))
    de = active.positions + mv.gamma[:, None, None] * (x_j - x_l) + 1e-5 * mv.noise
    use_de = mv.use_de[:, None]
    proposal = jnp.where(use_de[..., None], de, stretch)
    log_factor = jnp.where(use_de, 0.0, (d - 1) * jnp.log(mv.z))  # the z^(d-1) Jacobian keeps detailed balance
    if mixture is not None:
        # independence move: Y ~ q, accepted with min(1, p(Y) q(X_k) / (p(X_k) q(Y)))
        use_ind = mv.use_ind[:, None]
        ind = mixture.draw(mv.comp, mv.noise)
        proposal = jnp.where(use_ind[..., None], ind, proposal)
        log_q_ratio = mixture.log_density(active.positions) - mixture.log_density(proposal)
        log_factor = jnp.where(use_ind, log_q_ratio, log_factor)
    logp_new, aux_new = _evaluate(log_prob_fn, proposal)
    log_ratio = log_factor + logp_new - active.log_prob
    accept = mv.log_u < log_ratio
    new = EnsembleState(
        jnp.where(accept[..., None], proposal, active.positions),
        jnp.where(accept, logp_new, active.log_prob),
        _tree_where(accept, aux_new, active.aux),
    )
    return new, accept


def _split(state: EnsembleState, lo: int, hi: int) -> EnsembleState:
    return jax.tree.map(lambda x: x[:, lo:hi], state)


def step(keys, state: EnsembleState, log_prob_fn: Callable, a: float = 2.0, de_prob: float = 0.0,
         mixture: Mixture | None = None, ind_prob: float = 0.0):
    """One ensemble step: the first half of the walkers moves against the second, then the second
    against the updated first. Each half-update (per galaxy) is, with probability ``ind_prob``, an
    independence move with proposal ``mixture``; otherwise, with probability ``de_prob``, a
    differential-evolution move; otherwise a stretch move (scale ``a``). ``keys`` (n_gal,) PRNG keys.
    Returns ``(new_state, accepted (n_gal, n_walk))``."""
    n_walk, d = state.positions.shape[1:]
    h = n_walk // 2
    if mixture is None:
        ind_prob = 0.0
    mv = jax.vmap(lambda k: _draw_moves(k, h, d, a, de_prob, ind_prob))(keys)  # leaves (n_gal, 2, ...)
    half = lambda i: jax.tree.map(lambda x: x[:, i], mv)  # noqa: E731
    first, second = _split(state, 0, h), _split(state, h, n_walk)
    first, acc1 = _half_update(first, second.positions, log_prob_fn, half(0), mixture)
    second, acc2 = _half_update(second, first.positions, log_prob_fn, half(1), mixture)
    new = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), first, second)
    return new, jnp.concatenate([acc1, acc2], axis=1)


def run(keys, state: EnsembleState, log_prob_fn: Callable, n_steps: int, thin: int = 1, a: float = 2.0, de_prob: float = 0.0,
        mixture: Mixture | None = None, ind_prob: float = 0.0):
    """Run ``n_steps`` steps of :func:`step`, keeping every ``thin``-th state. Returns ``(final_state, Trace)``.

    ``n_steps`` must be a multiple of ``thin``; ``n_steps // thin`` draws are kept
    (``n_steps = 0`` just returns the state and an empty trace). Step ``t``
    draws its randomness from ``fold_in(keys[g], t)``. Jit the caller: the loops
    are ``lax.scan``.
    """
    if thin < 1 or n_steps < 0:
        raise ValueError(f"run: need thin >= 1 and n_steps >= 0, got thin={thin}, n_steps={n_steps}")
    if n_steps % thin:
        raise ValueError(f"n_steps={n_steps} is not a multiple of thin={thin}")
    n_draws = n_steps // thin
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    def one(carry, t):
        st, n_acc = carry
        st, acc = step(fold(keys, t), st, log_prob_fn, a, de_prob, mixture, ind_prob)
        return (st, n_acc + acc), None

    def block(carry, b):
        carry, _ = jax.lax.scan(one, carry, b * thin + jnp.arange(thin))
        st = carry[0]
        return carry, (st.positions, st.log_prob, st.aux)

    n_acc0 = jnp.zeros(state.log_prob.shape, jnp.int32)
    (final, n_acc), (pos, logp, aux) = jax.lax.scan(block, (state, n_acc0), jnp.arange(n_draws))
    # scan stacks draws first: (n_draw, n_gal, n_walk, ...) -> (n_gal, n_walk, n_draw, ...)
    to_gwn = lambda x: jnp.moveaxis(x, 0, 2)  # noqa: E731
    rate = n_acc / max(n_steps, 1)
    return final, Trace(to_gwn(pos), to_gwn(logp), jax.tree.map(to_gwn, aux), rate)


@jax.jit
def autocorr_time(chains, c: float = 5.0):
    """Integrated autocorrelation time per parameter, in units of stored draws.

    ``chains`` (..., n_walk, n_draw, d) -> (..., d). The normalised ACF of each
    walker is averaged over walkers, summed as ``tau(M) = 1 + 2 sum_{t=1}^{M} rho(t)``
    and cut at Sokal's window, the smallest ``M >= c tau(M)`` (Sokal 1997;
    emcee's ``integrated_time``). A walker that never moves counts as fully
    correlated. Estimates are only trustworthy when ``n_draw`` exceeds ~50 tau.
    """
    x = jnp.asarray(chains, jnp.float32)
    n = x.shape[-2]
    x = x - jnp.mean(x, axis=-2, keepdims=True)
    n_fft = 1 << (2 * n - 1).bit_length()
    fx = jnp.fft.rfft(x, n=n_fft, axis=-2)
    acov = jnp.fft.irfft(fx * jnp.conj(fx), n=n_fft, axis=-2)[..., :n, :]
    var0 = acov[..., :1, :]
    rho = jnp.where(var0 > 0, acov / jnp.where(var0 > 0, var0, 1.0), 1.0)
    rho = jnp.mean(rho, axis=-3)  # average over walkers: (..., n_draw, d)
    taus = 2.0 * jnp.cumsum(rho, axis=-2) - 1.0
    lags = jnp.arange(n, dtype=jnp.float32)[:, None]
    ok = lags >= c * taus
    window = jnp.where(jnp.any(ok, axis=-2), jnp.argmax(ok, axis=-2), n - 1)
    return jnp.take_along_axis(taus, window[..., None, :], axis=-2)[..., 0, :]


def _rank_normal(x, axis_size):
    """Rank-normalise over the flattened leading-draw axis -2 of ``x`` (..., S, d): Phi^-1((r - 3/8) / (S + 1/4))."""
    r = jnp.argsort(jnp.argsort(x, axis=-2), axis=-2).astype(jnp.float32) + 1.0
    return ndtri((r - 0.375) / (axis_size + 0.25))


@jax.jit
def ensemble_rhat(chains):
    """Rank-normalised split R-hat across independent ensembles (Vehtari et al. 2021), per parameter.

    ``chains`` (..., n_ens, n_walk, n_draw, d) -> (..., d). Each ensemble's
    draws are split into a first and a second half in time; each half, pooled
    over its walkers, is one chain of the classic R-hat (Gelman et al. 2013,
    BDA3 eq. 11.4), so ``2 n_ens`` chains are compared: the ensembles must agree
    with each other (they start independently) and with themselves over time.
    The draws are rank-normalised (invariant to monotonic transforms, robust to
    heavy tails) and the larger of the bulk R-hat and the R-hat of the folded
    draws ``|x - median|`` (which catches differing spreads) is returned. Values
    near 1 mean agreement; > 1.05 flags e.g. ensembles stranded in different
    redshift modes or still drifting. With one ensemble only the time split is left.
    """
    x = jnp.asarray(chains, jnp.float32)
    n_ens, n_walk, n_draw, d = x.shape[-4:]
    n = n_draw // 2
    if n < 2:
        raise ValueError(f"ensemble R-hat needs at least 4 draws per walker, got {n_draw}")
    halves = jnp.stack([x[..., :n, :], x[..., n_draw - n :, :]], axis=-4)  # (..., 2, n_ens, n_walk, n, d)
    lead = x.shape[:-4]
    m, size = 2 * n_ens, n_walk * n
    pooled = halves.reshape(lead + (m * size, d))
    bulk = _rank_normal(pooled, m * size)
    folded = _rank_normal(jnp.abs(pooled - jnp.median(pooled, axis=-2, keepdims=True)), m * size)
    return jnp.maximum(_rhat(bulk.reshape(lead + (m, size, d))), _rhat(folded.reshape(lead + (m, size, d))))


def _rhat(x):
    """Classic R-hat of ``m`` chains (..., m, n, d) -> (..., d); ``inf`` when chains never vary but differ."""
    n = x.shape[-2]
    means = jnp.mean(x, axis=-2)
    within = jnp.mean(jnp.var(x, axis=-2, ddof=1), axis=-2)
    between = n * jnp.var(means, axis=-2, ddof=1)
    var_plus = (n - 1) / n * within + between / n
    return jnp.where(within > 0, jnp.sqrt(var_plus / jnp.where(within > 0, within, 1.0)), jnp.where(between > 0, jnp.inf, 1.0))
