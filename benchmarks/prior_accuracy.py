"""Where a diffusion prior's exact-ODE log-density error comes from, on a GMM target (issue 3).

    python benchmarks/prior_accuracy.py [--target gmm16d] [--n 500]
    python benchmarks/prior_accuracy.py --sde-compare [--dim 2] [--steps 3000]
    python benchmarks/prior_accuracy.py --train-compare [--variants base,uniform] [--steps 10000] [--n 500]

The target's noised marginals are Gaussian mixtures, so its exact score is known in
closed form (``GaussianMixture.noised_log_prob``). Plugging that score into the same
ODE code (``popflow.priors.diffusion.ode_log_prob``) separates the error terms:

- truncation: log p_eps(z) - log p_0(z), the ODE starts at t = eps, not 0;
- prior at T: the ODE ends on N(0, v(1)) instead of the true marginal at t = 1;
- integrator: exact-score ODE log-density vs the true log p_eps, per solver;
- network: the trained prior's log-density vs the exact-score one, per solver,
  the error when the network replaces the exact score only above (or below) a time t_c,
  and the score error E|s_net - s|^2 in bins of t.
All in nats, mean |.| over ``--n`` fresh target draws (latent coordinates).

``--sde-compare`` measures VP against sub-VP on the ``--dim`` GMM target: the exact-score
integrator error per solver (adaptive steps taken), and the error of a network trained
for ``--steps`` on the same draws under each SDE.

``--train-compare`` trains the 16-D target's network under each training variant in ``TRAIN_VARIANTS``
(same 400k draws, seed 0, batch 2048, ``--steps``) and prints the network error (net vs the exact score through
the same Heun-16 rho-2 ODE) and the total error against the exact log-density on ``--n`` fresh draws.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from popflow.priors import load_prior
from popflow.priors.diffusion import ode_log_prob
from popflow.priors.gmm import gmm_target

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = [dict(solver="heun", n_steps=16, rho=1.0), dict(solver="heun", n_steps=8, rho=2.0), dict(solver="heun", n_steps=16, rho=2.0),
           dict(solver="heun", n_steps=32, rho=2.0), dict(solver="rk4", n_steps=8, rho=2.0), dict(solver="tsit5", rtol=1e-5, atol=1e-6)]


def exact_score(gmm_white, sde):
    """score(z (dim,), t ()) -> (dim,) of the whitened target's noised marginal."""
    return jax.grad(lambda z, t: gmm_white.noised_log_prob(z, sde.alpha(t), sde.std(t)))


# training variants of --train-compare: keyword arguments of train_diffusion_prior ("beta_max" builds the SDE)
TRAIN_VARIANTS = {
    "likelihood": dict(t_sampling="likelihood", beta_max=20.0),
    "uniform": dict(t_sampling="uniform", beta_max=20.0),
    "likelihood-b10": dict(t_sampling="likelihood", beta_max=10.0),
    "uniform-b10": dict(t_sampling="uniform", beta_max=10.0),
}


def compare_training(names: list[str], steps: int, n: int):
    """Network and total mean |log p error| (nats) of the 16-D target's prior under each training variant."""
    from popflow.priors.diffusion import SDE, train_diffusion_prior
    from train_priors import gmm_space

    dim = 16
    gmm = gmm_target(dim, seed=dim)
    train = np.asarray(gmm.sample(jax.random.key(0), 400_000))  # the draws of benchmarks/train_priors.py gmm16d
    x = np.asarray(gmm.sample(jax.random.key(99), n))
    truth = np.asarray(gmm.log_prob(x))
    print(f"16-D GMM, 400k draws, {steps} steps, batch 2048, seed 0; mean |log p error| on {n} fresh draws, Heun-16 rho 2")
    print(f"{'variant':16s} {'network':>8s} {'total':>8s} {'signed':>8s} {'exact-score ODE':>16s} {'train s':>8s}")
    for name in names:
        kw = dict(TRAIN_VARIANTS[name])
        sde = SDE(beta_max=kw.pop("beta_max"))
        t0 = time.perf_counter()
        prior = train_diffusion_prior(train, gmm_space(dim), latent=True, sde=sde, steps=steps, batch_size=2048, progress=False,
                                      solver=dict(solver="heun", n_steps=16, rho=2.0), **kw)
        secs = time.perf_counter() - t0
        score = exact_score(gmm.affine(prior.whiten, prior.shift), sde)
        le = np.asarray(jax.jit(lambda zz: ode_log_prob(score, sde, zz, **prior.solver))(prior.to_white(x))) + prior.log_det_whiten
        ln = np.asarray(jax.jit(prior.log_prob_latent)(x))
        print(f"{name:16s} {np.mean(np.abs(ln - le)):8.4f} {np.mean(np.abs(ln - truth)):8.4f} {np.mean(ln - truth):+8.4f} "
              f"{np.mean(np.abs(le - truth)):16.4f} {secs:8.0f}", flush=True)


def label(sv: dict) -> str:
    return f"{sv['solver']}-{sv['n_steps']} rho={sv['rho']:g}" if "n_steps" in sv else f"{sv['solver']} rtol={sv['rtol']:g}"


def compare_sdes(dim: int, n: int, steps: int):
    """VP vs sub-VP on the ``dim``-D GMM target: exact-score integrator error and trained-network error (nats)."""
    from popflow.priors.base import whitening_from_samples
    from popflow.priors.diffusion import SDE, _adaptive_solve, _drift_fn, train_diffusion_prior
    from train_priors import gmm_space

    gmm = gmm_target(dim, seed=dim)
    x = np.asarray(gmm.sample(jax.random.key(99), n))
    truth = np.asarray(gmm.log_prob(x))
    train = np.asarray(gmm.sample(jax.random.key(0), 400_000))
    shift, whiten = whitening_from_samples(train)
    white = gmm.affine(whiten, shift)
    z = jnp.asarray((x - shift) @ whiten.T, jnp.float32)
    ld = float(np.sum(np.log(np.diag(whiten))))
    fixed = [dict(solver="heun", n_steps=8, rho=2.0), dict(solver="heun", n_steps=16, rho=2.0), dict(solver="rk4", n_steps=8, rho=2.0)]
    print(f"{dim}-D GMM, {n} draws; exact score: mean |log p error| per solver; network: {steps} DSM steps, width 128, same draws")
    print(f"{'SDE':6s} " + " ".join(f"{label(sv):>15s}" for sv in fixed) + f" {'tsit5 1e-5':>10s} {'steps':>6s} | {'net heun-16':>11s} {'net tsit5':>9s} {'train s':>8s}")
    for kind in ("vp", "subvp"):
        sde = SDE(kind)
        score = exact_score(white, sde)
        errs = [np.mean(np.abs(np.asarray(jax.jit(lambda zz, sv=sv: ode_log_prob(score, sde, zz, **sv))(z)) + ld - truth)) for sv in fixed]
        ad = np.asarray(jax.jit(lambda zz: ode_log_prob(score, sde, zz, solver="tsit5", rtol=1e-5, atol=1e-6))(z)) + ld
        nsteps = jax.jit(jax.vmap(lambda z0: _adaptive_solve(_drift_fn(score, sde), sde, z0, "tsit5", 1e-5, 1e-6).stats["num_steps"]))(z)
        t0 = time.perf_counter()
        prior = train_diffusion_prior(train, gmm_space(dim), latent=True, sde=sde, steps=steps, batch_size=1024, progress=False)
        secs = time.perf_counter() - t0
        net = [np.mean(np.abs(np.asarray(jax.jit(prior.with_solver(**sv).log_prob_latent)(x)) - truth))
               for sv in (dict(solver="heun", n_steps=16), dict(solver="tsit5", rtol=1e-5, atol=1e-6))]
        print(f"{kind:6s} " + " ".join(f"{e:15.4f}" for e in errs) + f" {np.mean(np.abs(ad - truth)):10.4f} {float(np.mean(nsteps)):6.1f} | "
              f"{net[0]:11.4f} {net[1]:9.4f} {secs:8.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sde-compare", action="store_true")
    ap.add_argument("--steps", type=int, default=3000, help="--sde-compare / --train-compare: training steps per run")
    ap.add_argument("--train-compare", action="store_true")
    ap.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help=f"--train-compare: comma-separated, from {', '.join(TRAIN_VARIANTS)}")
    ap.add_argument("--target", default="gmm16d", help="a folder under tests/data/priors (gmm2d, gmm16d) or a prior folder")
    ap.add_argument("--dim", type=int, default=None, help="GMM dimension (default: the prior's)")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    if args.sde_compare:
        return compare_sdes(args.dim or 2, args.n, args.steps)
    if args.train_compare:
        return compare_training(args.variants.split(","), args.steps, args.n)
    path = ROOT / "tests" / "data" / "priors" / args.target
    prior = load_prior(path if path.is_dir() else args.target)
    dim = args.dim or prior.space.dim
    gmm = gmm_target(dim, seed=dim)
    sde = prior.sde
    x = np.asarray(gmm.sample(jax.random.key(99), args.n))
    truth = np.asarray(gmm.log_prob(x))
    z = prior.to_white(x)
    gw = gmm.affine(prior.whiten, prior.shift)
    ld = prior.log_det_whiten
    print(f"{args.target}: {prior.kind} {prior.id}, {sde.kind} SDE eps={sde.eps}; {args.n} draws; backend {jax.default_backend()}")

    p_eps = np.asarray(gw.noised_log_prob(z, sde.alpha(sde.eps), sde.std(sde.eps))) + ld
    print(f"truncation   |log p_eps - log p_0|         mean {np.mean(np.abs(p_eps - truth)):.4f}  (signed {np.mean(p_eps - truth):+.4f})")
    # prior-at-T: the exact marginal at t = 1 vs N(0, v(1)), on draws of the t = 1 marginal
    z1 = sde.alpha(1.0) * z + sde.std(1.0) * jax.random.normal(jax.random.key(1), z.shape)
    v1 = sde.var_total(1.0)
    gauss = -0.5 * jnp.sum(z1**2, -1) / v1 - 0.5 * dim * jnp.log(2 * jnp.pi * v1)
    print(f"prior at T   |log p_1 - log N(0, v(1))|     mean {np.mean(np.abs(np.asarray(gw.noised_log_prob(z1, sde.alpha(1.0), sde.std(1.0)) - gauss))):.4f}")

    score = exact_score(gw, sde)
    net_score = prior._score()
    print(f"\n{'solver':20s} {'exact score vs p_eps':>21s} {'exact vs p_0':>13s} {'net vs exact-score':>19s} {'net vs p_0':>11s} {'(signed)':>9s} {'s/pt':>8s}")
    for sv in SOLVERS:
        f_exact = jax.jit(lambda zz, sv=sv: ode_log_prob(score, sde, zz, **{**prior.solver, **sv}))
        f_net = jax.jit(lambda zz, sv=sv: ode_log_prob(net_score, sde, zz, **{**prior.solver, **sv}))
        le = np.asarray(f_exact(z)) + ld
        jax.block_until_ready(f_net(z[:2]))
        t0 = time.perf_counter()
        ln = np.asarray(f_net(z)) + ld
        dt = (time.perf_counter() - t0) / args.n
        print(f"{label(sv):20s} {np.mean(np.abs(le - p_eps)):21.4f} {np.mean(np.abs(le - truth)):13.4f} "
              f"{np.mean(np.abs(ln - le)):19.4f} {np.mean(np.abs(ln - truth)):11.4f} {np.mean(ln - truth):+9.4f} {dt:8.1e}")

    # where the network's error enters: the exact score below t_c, the network above (and the reverse)
    grid = dict(solver="heun", n_steps=64, rho=2.0)
    print(f"\n{'t_c':>6s} {'exact < t_c, net above':>23s} {'net < t_c, exact above':>23s}   (mean |log p error|, heun-64 rho 2)")
    for tc in (0.01, 0.03, 0.1, 0.3):
        out = []
        for lo, hi in ((score, net_score), (net_score, score)):
            mixed = lambda zz, t, lo=lo, hi=hi, tc=tc: jnp.where(t < tc, lo(zz, t), hi(zz, t))  # noqa: E731
            out.append(np.mean(np.abs(np.asarray(jax.jit(lambda zz, f=mixed: ode_log_prob(f, sde, zz, **grid))(z)) + ld - truth)))
        print(f"{tc:6.2f} {out[0]:23.4f} {out[1]:23.4f}")

    # score error by t: E |s_net - s|^2 / d and the g^2-weighted integrand of the likelihood bound
    edges = np.array([sde.eps, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    net_b, ex_b = jax.vmap(net_score, in_axes=(0, None)), jax.vmap(score, in_axes=(0, None))
    print(f"\n{'t bin':16s} {'E|ds|^2/d':>10s} {'E|s|^2/d':>9s} {'g^2 E|ds|^2 dt':>15s}")
    key = jax.random.key(2)
    for a, b in zip(edges[:-1], edges[1:]):
        ts = np.geomspace(a, b, 6)[1:-1] if a > 0 else np.linspace(a, b, 4)
        errs, mags = [], []
        for t in ts:
            key, k = jax.random.split(key)
            zt = sde.alpha(t) * z + sde.std(t) * jax.random.normal(k, z.shape)
            s_ex = ex_b(zt, jnp.float32(t))
            errs.append(float(jnp.mean(jnp.sum((net_b(zt, jnp.float32(t)) - s_ex) ** 2, -1))))
            mags.append(float(jnp.mean(jnp.sum(s_ex**2, -1))))
        g2 = float(sde.g2(np.sqrt(a * b)))
        print(f"[{a:.3f}, {b:.3f})   {np.mean(errs) / dim:10.4f} {np.mean(mags) / dim:9.3f} {0.5 * g2 * np.mean(errs) * (b - a):15.4f}")


if __name__ == "__main__":
    main()
