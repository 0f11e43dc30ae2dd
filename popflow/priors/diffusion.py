"""Score-based diffusion prior with an exact log-density (Song et al. 2021).

The prior lives in the probit latent space of a :class:`~popflow.params.ParameterSpace`,
after whitening the training samples (``z = W (phi - shift)``, mean 0 and covariance I).

Score model. With whitened data the Gaussian part of the score of the noised
marginal is exactly ``-z / v(t)`` (``v = alpha^2 + std^2``; ``v = 1`` for the VP SDE),
so the network only learns the non-Gaussian remainder (a "Gaussian skip"):

    s(z, t) = -z / v(t) - r(z, t),      r: MLP on [z, Fourier features of t]

A Gaussian target has ``r = 0`` and an identity probability-flow map.

SDEs (SCIENCE.md): VP ``dz = -beta/2 z dt + sqrt(beta) dW`` and sub-VP
(``g^2 = beta (1 - alpha^4)``), ``beta(t) = beta_min + t (beta_max - beta_min)``,
t in [eps, 1]; defaults 0.1, 10, 1e-3 (pop-cosmos uses beta_max = 20, the default before 2026-12-02: every
artifact stores its SDE). Trained by denoising score matching (eps-prediction loss), with t drawn uniformly (the
default: weighting lambda(t) = std^2) or from the likelihood-weighting importance density ``q(t) ∝ g^2 / std^2``
(lambda = g^2, which makes the loss a bound on the KL of the reverse SDE: Song, Durkan, Murray & Ermon 2021,
"Maximum likelihood training of score-based diffusion models", NeurIPS). For the probability-flow ODE log-density
uniform t and beta_max = 10 measured better than likelihood weighting and beta_max = 20 on the 16-D test mixture
(BENCHMARKS.md, issue 3): the ODE's error is dominated by t > 0.1, where g^2 is large and which uniform t samples
more often; the smaller beta_max shortens the nearly Gaussian end of the path (the t = 1 marginal is still
N(0, 1) to 6e-4 nats on average there) over which network errors are integrated with weight g^2 / 2.

Log-density: probability-flow ODE ``dz/dt = F = f z - g^2 s / 2`` integrated from
t = eps to 1 jointly with the EXACT divergence (trace of the d x d Jacobian by
forward-mode AD), ``log p(z_eps) = log N(z_1; 0, v(1)) + ∫ div F dt``. Solvers: fixed-step
Heun or RK4 on a grid ``t_k = eps + (1 - eps) (k / N)^rho`` (pure ``lax.scan``; rho = 2 crowds
the steps near eps, where the score changes fastest: with the exact score of the 16-D test mixture
Heun-16's error falls from 0.17 nats at rho = 1 to 0.03 at rho = 2), or adaptive diffrax Tsit5 / Dopri5. Everything is deterministic, jit-able and batched.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from popflow.artifacts import flatten_tree
from popflow.params import ParameterSpace
from popflow.priors.base import LatentPrior, clip_to_latent, whitening_from_samples

__all__ = ["SDE", "ScoreNet", "DiffusionPrior", "train_diffusion_prior", "ode_log_prob", "FIXED_SOLVERS", "ADAPTIVE_SOLVERS"]

FIXED_SOLVERS = ("heun", "rk4")
ADAPTIVE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}


# --------------------------------------------------------------------------- SDE
@dataclasses.dataclass(frozen=True)
class SDE:
    """Linear-beta VP or sub-VP SDE on t in [eps, 1] (Song et al. 2021)."""

    kind: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 10.0  # 20 before 2026-12-02 (pop-cosmos); artifacts store theirs
    eps: float = 1e-3

    def __post_init__(self):
        if self.kind not in ("vp", "subvp"):
            raise ValueError(f"SDE kind must be 'vp' or 'subvp', got {self.kind!r}")

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        """B(t) = ∫_0^t beta."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        """Mean scale of z_t | z_0."""
        return jnp.exp(-0.5 * self.int_beta(t))

    def std(self, t):
        """Standard deviation of z_t | z_0."""
        var_vp = -jnp.expm1(-self.int_beta(t))
        return jnp.sqrt(var_vp) if self.kind == "vp" else var_vp

    def var_total(self, t):
        """v(t) = alpha^2 + std^2: the variance of z_t for whitened data."""
        return self.alpha(t) ** 2 + self.std(t) ** 2

    def g2(self, t):
        """Squared diffusion coefficient g(t)^2."""
        b = self.beta(t)
        return b if self.kind == "vp" else b * -jnp.expm1(-2.0 * self.int_beta(t))

    def sample_t_likelihood(self, u):
        """Inverse CDF of q(t) ∝ g^2 / std^2 on [eps, 1] at u in [0, 1] (VP; used for both kinds).

        For the VP SDE beta / std^2 = d/dt log(exp(B(t)) - 1), so the CDF is linear in that quantity.
        """
        c0, c1 = (jnp.log(jnp.expm1(self.int_beta(jnp.float32(s)))) for s in (self.eps, 1.0))
        b = jnp.logaddexp(0.0, c0 + u * (c1 - c0))  # B(t) = log(1 + exp(c))
        a = 0.5 * (self.beta_max - self.beta_min)
        return (-self.beta_min + jnp.sqrt(self.beta_min**2 + 4 * a * b)) / (2 * a)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- network
class ScoreNet(nnx.Module):
    """Remainder network r(z, t): MLP (SiLU) on [z, sin/cos(2 pi f t)], zero-initialised output.

    z (..., dim), t (...) -> (..., dim). ``freq`` are fixed Gaussian Fourier frequencies.
    """

    def __init__(self, dim: int, *, width: int = 128, depth: int = 3, n_freq: int = 16, freq_scale: float = 4.0, rngs: nnx.Rngs):
        self.freq = nnx.Variable(jax.random.normal(rngs.params(), (n_freq,)) * freq_scale)
        sizes = [dim + 2 * n_freq] + [width] * depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, z, t):
        arg = 2 * jnp.pi * jnp.asarray(t)[..., None] * self.freq[...]
        h = jnp.concatenate([z, jnp.sin(arg), jnp.cos(arg)], axis=-1)
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return self.out(h)


def _split(net: ScoreNet):
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    return graphdef, params, rest


def _pure(state) -> dict:
    return flatten_tree(jax.tree.map(np.asarray, nnx.to_pure_dict(state)))


def _fill(state, flat: dict, prefix: str):
    """Copy arrays ``flat[prefix + key]`` into a template state; error names a missing key."""
    pure = nnx.to_pure_dict(state)

    def rec(node, path):
        if isinstance(node, dict):
            return {k: rec(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        key = prefix + path
        if key not in flat:
            raise KeyError(f"weights.npz: missing array {key!r}")
        if flat[key].shape != node.shape:
            raise ValueError(f"weights.npz: {key!r} has shape {flat[key].shape}, the architecture needs {node.shape}")
        return jnp.asarray(flat[key])

    nnx.replace_by_pure_dict(state, rec(pure, ""))
    return state


# --------------------------------------------------------------------------- ODE pieces
def _drift_fn(score, sde: SDE):
    """F(z, t) = f(z, t) - g(t)^2 score(z, t) / 2 of the probability-flow ODE for ONE point z (dim,) and scalar t."""

    def drift(z, t):
        return -0.5 * sde.beta(t) * z - 0.5 * sde.g2(t) * score(z, t)

    return drift


def _drift_and_div(drift):
    """(z (dim,), t) -> (F (dim,), div F ()) with the exact Jacobian trace (dim forward-mode passes)."""

    def one(z, t):
        jac, f = jax.jacfwd(lambda x: (drift(x, t),) * 2, has_aux=True)(z)
        return f, jnp.trace(jac)

    return one


def time_grid(sde: SDE, n_steps: int, rho: float):
    """Fixed-step grid from eps to 1: t_k = eps + (1 - eps) (k / N)^rho, shape (N + 1,)."""
    s = jnp.linspace(0.0, 1.0, n_steps + 1) ** rho
    return (sde.eps + (1.0 - sde.eps) * s).astype(jnp.float32)


def _fixed_step(fn, y, t0, t1, method: str):
    """One Heun or RK4 step of dy/dt = fn(y, t) for a pytree y."""
    h = t1 - t0
    add = lambda a, b, c: jax.tree.map(lambda x, k: x + c * k, a, b)  # noqa: E731
    k1 = fn(y, t0)
    if method == "heun":
        k2 = fn(add(y, k1, h), t1)
        return jax.tree.map(lambda x, a, b: x + 0.5 * h * (a + b), y, k1, k2)
    k2 = fn(add(y, k1, 0.5 * h), t0 + 0.5 * h)
    k3 = fn(add(y, k2, 0.5 * h), t0 + 0.5 * h)
    k4 = fn(add(y, k3, h), t1)
    return jax.tree.map(lambda x, a, b, c, d: x + h / 6 * (a + 2 * b + 2 * c + d), y, k1, k2, k3, k4)


def _integrate_fixed(fn, y0, grid, method: str):
    def step(y, tt):
        return _fixed_step(fn, y, tt[0], tt[1], method), None

    return jax.lax.scan(step, y0, jnp.stack([grid[:-1], grid[1:]], axis=-1))[0]


def _adaptive_solve(drift, sde: SDE, z0, solver: str, rtol: float, atol: float):
    """diffrax solve of (z, log-det) from eps to 1 for ONE point z0 (dim,)."""
    fd = _drift_and_div(drift)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: fd(y[0], t)), ADAPTIVE_SOLVERS[solver](), t0=sde.eps, t1=1.0, dt0=None,
        y0=(z0, jnp.float32(0.0)), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=4096,
    )


def ode_log_prob(score, sde: SDE, z, *, solver: str = "heun", n_steps: int = 16, rho: float = 2.0, rtol: float = 1e-4,
                 atol: float = 1e-5):
    """log p(z) of the density whose noised scores are ``score``, by the probability-flow ODE with exact divergence.

    ``score(z (dim,), t ()) -> (dim,)``; z (..., dim) float32 -> (...). ``log p(z) = log N(z_1; 0, v(1)) + ∫_eps^1 div F dt``:
    the input is taken as the state at t = eps. Fixed-step ``heun``/``rk4`` on :func:`time_grid` (``n_steps``, ``rho``)
    or adaptive diffrax ``tsit5``/``dopri5`` (``rtol``, ``atol``). Used by :class:`DiffusionPrior` with its network and by
    the benchmarks with a target's exact score, which isolates the integrator's error from the network's.
    """
    z = jnp.asarray(z, jnp.float32)
    batch, d = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, d)
    drift = _drift_fn(score, sde)
    if solver in FIXED_SOLVERS:
        fd = jax.vmap(_drift_and_div(drift), in_axes=(0, None))
        y0 = (flat, jnp.zeros(flat.shape[0], jnp.float32))
        zT, delta = _integrate_fixed(lambda y, t: fd(y[0], t), y0, time_grid(sde, n_steps, rho), solver)
    elif solver in ADAPTIVE_SOLVERS:
        sol = jax.vmap(lambda x: _adaptive_solve(drift, sde, x, solver, rtol, atol))(flat)
        zT, delta = sol.ys[0][:, 0], sol.ys[1][:, 0]
    else:
        raise ValueError(f"unknown ODE solver {solver!r}; choose from {FIXED_SOLVERS + tuple(ADAPTIVE_SOLVERS)}")
    vT = sde.var_total(1.0)
    log_pT = -0.5 * jnp.sum(zT**2, -1) / vT - 0.5 * d * jnp.log(2 * jnp.pi * vT)
    return (log_pT + delta).reshape(batch)


# --------------------------------------------------------------------------- the prior
class DiffusionPrior(LatentPrior):
    """Score-based diffusion prior over the latent space of ``space`` (see module docstring).

    ``solver`` ('heun', 'rk4', 'tsit5', 'dopri5'), ``n_steps`` and ``rho`` (fixed-step grid) and
    ``rtol``/``atol`` (adaptive) select how :meth:`log_prob_latent` integrates the ODE;
    :meth:`with_solver` returns a copy with other settings. ``log_prob`` / ``log_prob_latent``
    are pure jax functions of their input: wrap them in ``jax.jit`` (the fit kernel does).
    """

    kind = "diffusion"

    def __init__(self, space: ParameterSpace, net: ScoreNet, sde: SDE, shift, whiten, *, net_config: dict,
                 solver: str = "heun", n_steps: int = 16, rho: float = 2.0, rtol: float = 1e-4, atol: float = 1e-5,
                 info: dict | None = None):
        if solver not in FIXED_SOLVERS and solver not in ADAPTIVE_SOLVERS:
            raise ValueError(f"unknown ODE solver {solver!r}; choose from {FIXED_SOLVERS + tuple(ADAPTIVE_SOLVERS)}")
        self.space, self.sde, self.net_config = space, sde, dict(net_config)
        self._init_whitening(shift, whiten)
        self._graphdef, self._params, self._rest = _split(net)
        self.solver = dict(solver=solver, n_steps=int(n_steps), rho=float(rho), rtol=float(rtol), atol=float(atol))
        self.info = dict(info or {})  # provenance ("training") and measured accuracy ("accuracy"), stored in model.json
        self._arrays = {
            "shift": self.shift,
            "whiten": self.whiten,
            **{f"params/{k}": v for k, v in _pure(self._params).items()},
            **{f"const/{k}": v for k, v in _pure(self._rest).items()},
        }

    @property
    def _meta(self) -> dict:
        return {"kind": self.kind, "space": self.space.to_dict(), "sde": self.sde.to_dict(), "network": self.net_config,
                "solver": self.solver, **self.info}

    @property
    def net(self) -> ScoreNet:
        return nnx.merge(self._graphdef, self._params, self._rest)

    def with_solver(self, **changes) -> "DiffusionPrior":
        """A copy sharing the weights, with other ODE solver settings (solver, n_steps, rho, rtol, atol)."""
        unknown = set(changes) - set(self.solver)
        if unknown:
            raise TypeError(f"with_solver: unknown settings {sorted(unknown)}; known: {sorted(self.solver)}")
        return DiffusionPrior(self.space, self.net, self.sde, self.shift, self.whiten, net_config=self.net_config,
                              **{**self.solver, **changes}, info=self.info)

    # --- density in whitened coordinates -------------------------------------------------------
    def _score(self):
        """score(z (dim,), t ()) -> (dim,) of the noised whitened marginal: Gaussian skip minus the network remainder."""
        graphdef, params, rest, sde = self._graphdef, self._params, self._rest, self.sde

        def score(z, t):
            return -z / sde.var_total(t) - nnx.merge(graphdef, params, rest)(z, t)

        return score

    def _log_prob_white(self, z):
        return ode_log_prob(self._score(), self.sde, z, **self.solver)

    def init_log_prob_latent(self, phi):
        """The Gaussian of the whitening (the training samples' mean and covariance), the part of the score the
        network does not learn: starting the fit would otherwise integrate the ODE for every candidate and
        differentiate it twice."""
        z = self.to_white(phi)
        return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * np.log(2.0 * np.pi) + self.log_det_whiten

    def n_steps_taken(self, z) -> np.ndarray:
        """Steps the adaptive solver takes per point (diagnostic); z (n, dim) whitened -> (n,) int."""
        s = self.solver
        drift = _drift_fn(self._score(), self.sde)
        one = lambda z0: _adaptive_solve(drift, self.sde, z0, s["solver"], s["rtol"], s["atol"]).stats["num_steps"]  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(z, jnp.float32)))

    # --- sampling ----------------------------------------------------------------------------
    def _sample_white(self, key, n: int, method: str = "ode", n_steps: int | None = None):
        sde, d = self.sde, self.space.dim
        zT = jax.random.normal(key, (n, d)) * jnp.sqrt(sde.var_total(1.0))
        if method == "ode":
            drift = jax.vmap(_drift_fn(self._score(), sde), in_axes=(0, None))
            grid = time_grid(sde, n_steps or 2 * self.solver["n_steps"], self.solver["rho"])[::-1]
            return _integrate_fixed(drift, zT, grid, "heun")
        if method == "sde":
            net = self.net
            grid = jnp.linspace(1.0, sde.eps, (n_steps or 1000) + 1)

            def step(z, inp):
                (t0, t1), k = inp
                h = t0 - t1  # positive
                score = -z / sde.var_total(t0) - net(z, jnp.full(z.shape[:-1], t0))
                mean = z + h * (0.5 * sde.beta(t0) * z + sde.g2(t0) * score)
                return mean + jnp.sqrt(sde.g2(t0) * h) * jax.random.normal(k, z.shape), None

            keys = jax.random.split(jax.random.fold_in(key, 1), grid.shape[0] - 1)
            return jax.lax.scan(step, zT, (jnp.stack([grid[:-1], grid[1:]], -1), keys))[0]
        raise ValueError(f"sampling method must be 'ode' or 'sde', got {method!r}")

    def sample(self, key, n: int, method: str = "ode", n_steps: int | None = None):
        """n physical draws (n, dim): probability-flow ODE (Heun, default 2 x n_steps) or reverse SDE (Euler-Maruyama, default 1000 steps)."""
        return self.space.from_latent(self.from_white(self._sample_white(key, n, method, n_steps)))

    def sample_latent(self, key, n: int, method: str = "ode", n_steps: int | None = None):
        """n latent draws phi (n, dim)."""
        return self.from_white(self._sample_white(key, n, method, n_steps))

    # --- artifacts ----------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, meta: dict, arrays: dict) -> "DiffusionPrior":
        space = ParameterSpace.from_dict(meta["space"])
        net = ScoreNet(space.dim, **meta["network"], rngs=nnx.Rngs(0))
        graphdef, params, rest = _split(net)
        params = _fill(params, arrays, "params/")
        rest = _fill(rest, arrays, "const/")
        info = {k: v for k, v in meta.items() if k not in ("kind", "space", "sde", "network", "solver")}
        return cls(space, nnx.merge(graphdef, params, rest), SDE(**meta["sde"]), arrays["shift"], arrays["whiten"],
                   net_config=meta["network"], **meta["solver"], info=info)


# --------------------------------------------------------------------------- training
def dsm_loss(graphdef, params, rest, sde: SDE, z0, key, t_sampling: str):
    """Denoising score matching (eps-prediction form), mean over the batch z0 (B, dim) whitened."""
    kt, ke = jax.random.split(key)
    b = z0.shape[0]
    # stratified u in [0, 1): lower variance than iid for the same batch
    u = (jnp.arange(b) + jax.random.uniform(kt, (b,))) / b
    t = sde.sample_t_likelihood(u) if t_sampling == "likelihood" else sde.eps + (1.0 - sde.eps) * u
    eps = jax.random.normal(ke, z0.shape)
    std = sde.std(t)[:, None]
    zt = sde.alpha(t)[:, None] * z0 + std * eps
    net = nnx.merge(graphdef, params, rest)
    eps_hat = std * (zt / sde.var_total(t)[:, None] + net(zt, t))
    return jnp.mean(jnp.sum((eps_hat - eps) ** 2, -1))


def train_diffusion_prior(
    samples,
    space: ParameterSpace,
    *,
    latent: bool = False,
    sde: SDE = SDE(),
    width: int = 128,
    depth: int = 3,
    n_freq: int = 16,
    freq_scale: float = 4.0,
    steps: int = 20_000,
    batch_size: int = 1024,
    learning_rate: float = 2e-3,
    ema_decay: float = 0.999,
    t_sampling: str = "uniform",
    val_fraction: float = 0.05,
    seed: int = 0,
    steps_per_call: int = 100,
    out=None,
    checkpoint_every: int = 2000,
    progress: bool = True,
    source: str = "",
    solver: dict | None = None,
    init: DiffusionPrior | None = None,
) -> DiffusionPrior:
    """Train a diffusion prior on samples (n, dim): physical theta (default) or latent phi (``latent=True``).

    Adam with warm-up + cosine decay, global-norm clipping at 1, EMA weights (returned).
    ``t_sampling``: 'uniform' (DSM weighting std(t)^2, the default) or 'likelihood' (weighting g(t)^2 by importance
    sampling t; Song et al. 2021): see the module docstring for why uniform is the default. The probability-flow
    log-density's error is limited by the DSM gradient noise: a larger ``batch_size`` at the same number of draws
    seen is the cheapest improvement (8192 for the 16-D test target, BENCHMARKS.md).
    The held-out loss (the same DSM loss on ``val_fraction`` of the samples, fixed noise)
    is reported in the progress bar and stored in model.json with the training settings.
    With ``out``, the EMA model is saved there every ``checkpoint_every`` steps and at the end.
    ``init``: continue from this prior's weights, whitening, SDE and architecture (fine-tuning; its id is recorded).
    """
    x = np.asarray(samples, np.float32)
    if x.ndim != 2 or x.shape[1] != space.dim:
        raise ValueError(f"training samples must have shape (n, {space.dim}) for parameters {', '.join(space.names)}; got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"training samples contain {np.sum(~np.isfinite(x))} non-finite values")
    phi = x if latent else np.asarray(clip_to_latent(space, space.check(x, "training samples")))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(phi))
    n_val = max(256, int(val_fraction * len(phi)))
    if len(phi) < 4 * n_val:
        raise ValueError(f"only {len(phi)} training samples: need at least {4 * n_val} (train + held-out)")
    val, train = phi[perm[:n_val]], phi[perm[n_val:]]
    if init is None:
        shift, whiten = whitening_from_samples(train)
        net_config = dict(width=width, depth=depth, n_freq=n_freq, freq_scale=freq_scale)
        net = ScoreNet(space.dim, **net_config, rngs=nnx.Rngs(seed))
    else:
        if init.space != space:
            raise ValueError(f"init prior {init.id} is over parameters {', '.join(init.space.names)}, not {', '.join(space.names)}")
        shift, whiten, net_config, net, sde = init.shift, init.whiten, init.net_config, init.net, init.sde
    to_white = lambda a: ((a - shift) @ whiten.T).astype(np.float32)  # noqa: E731
    z_train, z_val = jnp.asarray(to_white(train)), jnp.asarray(to_white(val))
    graphdef, params, rest = _split(net)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(1000, steps // 10), steps, learning_rate * 1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = tx.init(params)
    ema = params

    def loss_fn(p, z0, key):
        return dsm_loss(graphdef, p, rest, sde, z0, key, t_sampling)

    @jax.jit
    def run_chunk(carry, key):
        def one(carry, k):
            p, o, e = carry
            ki, kl = jax.random.split(k)
            z0 = z_train[jax.random.randint(ki, (batch_size,), 0, z_train.shape[0])]
            loss, g = jax.value_and_grad(loss_fn)(p, z0, kl)
            upd, o = tx.update(g, o, p)
            p = optax.apply_updates(p, upd)
            n = o[1][0].count.astype(jnp.float32)  # Adam's step counter: EMA warm-up (decay <= (1 + n) / (10 + n))
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            e = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, p)
            return (p, o, e), loss

        carry, losses = jax.lax.scan(one, carry, jax.random.split(key, steps_per_call))
        return carry, jnp.mean(losses)

    val_keys = jax.random.split(jax.random.key(seed + 1), 8)

    @jax.jit
    def val_loss(p):
        return jnp.mean(jax.vmap(lambda k: loss_fn(p, z_val, k))(val_keys))

    def make_prior(e, done, train_loss, vl, seconds):
        info = {"training": {
            "source": source, "n_samples": int(len(phi)), "n_train": int(len(train)), "n_val": int(n_val),
            "latent_input": bool(latent), "steps": int(done), "batch_size": batch_size, "learning_rate": learning_rate,
            "ema_decay": ema_decay, "t_sampling": t_sampling, "seed": seed, "train_loss": float(train_loss),
            "val_loss_initial": float(val0), "val_loss": float(vl), "seconds": round(seconds, 1),
            **({"init": {"id": init.id, "training": init.info.get("training")}} if init is not None else {}),
        }}
        return DiffusionPrior(space, nnx.merge(graphdef, e, rest), sde, shift, whiten, net_config=net_config,
                              **(solver or {}), info=info)

    val0 = float(val_loss(params))
    carry, key = (params, opt_state, ema), jax.random.key(seed)
    n_calls = math.ceil(steps / steps_per_call)
    t_start, train_loss, vl = time.perf_counter(), float("nan"), val0
    bar = tqdm(range(n_calls), desc="diffusion prior", unit="chunk", disable=not progress)
    for i in bar:
        key, sub = jax.random.split(key)
        carry, loss = run_chunk(carry, sub)
        train_loss = float(loss)
        done = (i + 1) * steps_per_call
        if (i + 1) % max(1, 500 // steps_per_call) == 0 or i == n_calls - 1:
            vl = float(val_loss(carry[2]))
        bar.set_postfix(step=done, train=f"{train_loss:.4f}", heldout=f"{vl:.4f}")
        if out is not None and (done % checkpoint_every < steps_per_call or i == n_calls - 1):
            make_prior(carry[2], done, train_loss, vl, time.perf_counter() - t_start).save(Path(out))
    return make_prior(carry[2], n_calls * steps_per_call, train_loss, float(val_loss(carry[2])), time.perf_counter() - t_start)
