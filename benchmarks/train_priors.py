"""Train the shipped diffusion priors (test targets and the demo population prior) and record their accuracy.

    python benchmarks/train_priors.py gmm2d      # -> tests/data/priors/gmm2d/
    python benchmarks/train_priors.py gmm16d     # -> tests/data/priors/gmm16d/
    python benchmarks/train_priors.py analytic   # -> popflow/models/priors/analytic-diffusion/
    python benchmarks/train_priors.py distill    # analytic-diffusion -> popflow/models/priors/analytic-flow/

Checkpoints are written into the output folder while training (safe to run in the
background); the measured log-density errors are added to model.json at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from popflow.params import DEFAULT_SPACE, Parameter, ParameterSpace
from popflow.priors import distill, load_prior
from popflow.priors.analytic import AnalyticPrior
from popflow.priors.diffusion import SDE, train_diffusion_prior
from popflow.priors.gmm import gmm_target

ROOT = Path(__file__).resolve().parents[1]


def gmm_space(dim: int) -> ParameterSpace:
    """The unit box whose probit latent space carries the GMM targets."""
    return ParameterSpace(tuple(Parameter(f"x{i}", 0.0, 1.0, "", f"GMM test coordinate {i}") for i in range(dim)))


def log_prob_errors(prior, x, true) -> dict:
    out = {}
    s = prior.solver
    for name, sv in {f"{s['solver']}-{s['n_steps']} rho={s['rho']:g}": {}, "tsit5": dict(solver="tsit5", rtol=1e-5, atol=1e-6)}.items():
        lp = np.asarray(jax.jit(prior.with_solver(**sv).log_prob_latent)(x))
        out[name] = {"mean_abs_error": float(np.mean(np.abs(lp - true))), "mean_error": float(np.mean(lp - true)), "n": int(len(x))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["gmm2d", "gmm16d", "analytic", "distill"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--n-steps", type=int, default=16, help="fixed-step Heun steps stored as the default solver")
    ap.add_argument("--rho", type=float, default=2.0, help="fixed-step grid exponent stored with the solver")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--sde", choices=["vp", "subvp"], default="vp")
    ap.add_argument("--beta-max", type=float, default=10.0, help="SDE beta(t = 1) (20 before 2026-12-02)")
    ap.add_argument("--t-sampling", choices=["uniform", "likelihood"], default="uniform",
                    help="diffusion-time sampling of the DSM loss (likelihood before 2026-12-02)")
    ap.add_argument("--n-samples", type=int, default=400_000, help="GMM targets: training draws")
    ap.add_argument("--out", default=None, help="output folder (default: the shipped location)")
    ap.add_argument("--init", default=None, help="fine-tune this diffusion prior folder instead of starting from scratch")
    ap.add_argument("--evaluate", action="store_true",
                    help="do not train: set the solver (--n-steps, --rho) of the saved prior, measure it and record its accuracy")
    args = ap.parse_args()
    key = jax.random.key(0)
    solver = dict(solver="heun", n_steps=args.n_steps, rho=args.rho)
    init = load_prior(args.init).with_solver(**solver) if args.init else None
    train_kw = dict(learning_rate=args.lr, solver=solver, init=init, depth=args.depth, sde=SDE(args.sde, beta_max=args.beta_max),
                    t_sampling=args.t_sampling)
    if args.target == "distill":
        teacher = load_prior("analytic-diffusion")
        out = ROOT / "popflow" / "models" / "priors" / "analytic-flow"
        flow = distill(teacher, key, n_samples=200_000, steps=args.steps or 4000)
        print("training:", flow.info["training"])
        print("fidelity:", flow.info["fidelity"])
        print("saved", out, "id", flow.save(out))
        return
    if args.target.startswith("gmm"):
        dim = 2 if args.target == "gmm2d" else 16
        gmm, space = gmm_target(dim, seed=dim), gmm_space(dim)
        x = np.asarray(gmm.sample(key, args.n_samples))
        out = Path(args.out) if args.out else ROOT / "tests" / "data" / "priors" / args.target
        steps = args.steps or (10_000 if dim == 2 else 15_000)
        t0 = time.time()
        prior = load_prior(out).with_solver(**solver) if args.evaluate else train_diffusion_prior(
            x, space, latent=True, steps=steps, width=args.width, batch_size=args.batch_size or (1024 if dim == 2 else 8192), out=out,
            checkpoint_every=500, source=f"popflow.priors.gmm.gmm_target({dim}, seed={dim}) latent draws", **train_kw)
        print(f"{'loaded' if args.evaluate else 'trained'} {args.target} in {time.time() - t0:.0f} s: {prior.info['training']}")
        xt = np.asarray(gmm.sample(jax.random.key(99), 2000))
        prior.info["accuracy"] = {"against": "exact GMM log-density on 2000 fresh GMM draws", **log_prob_errors(prior, xt, np.asarray(gmm.log_prob(xt)))}
    else:
        analytic = AnalyticPrior()
        theta = np.asarray(analytic.sample(key, 1_000_000))
        out = Path(args.out) if args.out else ROOT / "popflow" / "models" / "priors" / "analytic-diffusion"
        steps = args.steps or 30_000
        t0 = time.time()
        prior = load_prior(out).with_solver(**solver) if args.evaluate else train_diffusion_prior(theta, DEFAULT_SPACE, steps=steps, width=args.width, batch_size=args.batch_size or 2048, out=out,
                                      source=f"1e6 draws of AnalyticPrior() (id {analytic.id}, Prospector-alpha-like baseline), seed 0; "
                                             "a sanity target with known density: no fitted population exists yet", **train_kw)
        print(f"{'loaded' if args.evaluate else 'trained'} analytic-diffusion in {time.time() - t0:.0f} s: {prior.info['training']}")
        tt = analytic.sample(jax.random.key(99), 2000)
        from popflow.priors.base import clip_to_latent

        phi = np.asarray(clip_to_latent(DEFAULT_SPACE, tt))
        true = np.asarray(analytic.log_prob_latent(phi))
        prior.info["accuracy"] = {"against": f"AnalyticPrior {analytic.id} latent log-density on 2000 fresh draws",
                                  **log_prob_errors(prior, phi, true)}
    print("accuracy:", prior.info["accuracy"])
    print("saved", out, "id", prior.save(out))


if __name__ == "__main__":
    main()
