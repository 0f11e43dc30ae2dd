"""Cost and accuracy of the priors' log-densities on one batch (issue 3).

    python benchmarks/prior_cost.py [--n 2048] [--prior analytic-diffusion] [--flow analytic-flow]
    python benchmarks/prior_cost.py --batches 512 2048 8192 32768   # flow/analytic only, by batch size

Prints log_prob evaluations per second for the analytic prior, the diffusion prior
(exact probability-flow ODE: fixed-step Heun/RK4 on the uniform (rho = 1) and default rho = 2 grids,
and adaptive Tsit5/Dopri5) and the
distilled flow on the same batch of AnalyticPrior draws, the ratios to the analytic
prior, the fixed-vs-adaptive agreement (nats), the error of each against the
analytic density (the shipped priors were trained on AnalyticPrior draws), and the
same ratios when each prior is paired with a stand-in emulator MLP (14 -> 4x256 -> 10,
the MCMC's other per-step cost).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from popflow.priors import AnalyticPrior, load_prior
from popflow.priors.base import clip_to_latent


def rate(fn, x, min_cpu_s: float = 0.5) -> float:
    """Evaluations per CPU-second (process time of all threads), after one compile call.

    CPU time, not wall time: on a shared, loaded machine wall time measures the neighbours; the work a
    call does is what the ratios compare. Calls repeat until ``min_cpu_s`` of CPU time has accumulated.
    """
    jax.block_until_ready(fn(x))
    calls, t0 = 0, time.process_time()
    while calls < 2 or time.process_time() - t0 < min_cpu_s:
        jax.block_until_ready(fn(x))
        calls += 1
    return calls * x.shape[0] / (time.process_time() - t0)


def stand_in_emulator(key, dim: int = 14, width: int = 256, depth: int = 4, n_bands: int = 10):
    keys = jax.random.split(key, depth + 1)
    sizes = [dim] + [width] * depth + [n_bands]
    ws = [jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def f(x):
        for w in ws[:-1]:
            x = jnp.tanh(x @ w)
        return x @ ws[-1]

    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="batch size (default 2048)")
    ap.add_argument("--n-adaptive", type=int, default=256, help="batch for the adaptive solvers (default 256)")
    ap.add_argument("--prior", default="analytic-diffusion")
    ap.add_argument("--flow", default="analytic-flow")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="only the analytic prior and the flow, at each of these batch sizes")
    args = ap.parse_args()
    analytic = AnalyticPrior()
    if args.batches:
        flow = load_prior(args.flow)
        print(f"{'batch':>6s} {'analytic evals/cpu-s':>21s} {'flow evals/cpu-s':>17s} {'flow x analytic':>16s}")
        for n in args.batches:
            x = analytic.sample(jax.random.key(0), n)
            ra, rf = rate(jax.jit(analytic.log_prob), x, 1.0), rate(jax.jit(flow.log_prob), x, 1.0)
            print(f"{n:6d} {ra:21.3g} {rf:17.3g} {ra / rf:16.2f}")
        return
    diffusion = load_prior(args.prior)
    flow = load_prior(args.flow)
    theta = analytic.sample(jax.random.key(0), args.n)
    truth = np.asarray(analytic.log_prob(theta))
    emu = stand_in_emulator(jax.random.key(1))
    print(f"batch: {args.n} AnalyticPrior draws; backend {jax.default_backend()}, {jax.device_count()} device(s)")

    rows = []

    def add(name, prior, x, true):
        f = jax.jit(prior.log_prob)
        g = jax.jit(lambda t: prior.log_prob(t) + jnp.sum(emu(t), -1))
        lp = np.asarray(f(x))
        rows.append((name, rate(f, x), rate(g, x), lp, true))

    add("analytic", analytic, theta, truth)
    ref_prior = diffusion.with_solver(solver="tsit5", rtol=1e-6, atol=1e-7)
    xa, ta = theta[: args.n_adaptive], truth[: args.n_adaptive]
    ref = np.asarray(jax.jit(ref_prior.log_prob)(xa))
    for solver, n, rho in [("heun", 8, 2.0), ("heun", 16, 1.0), ("heun", 16, 2.0), ("heun", 32, 2.0), ("rk4", 8, 2.0)]:
        add(f"diffusion {solver}-{n} rho={rho:g}", diffusion.with_solver(solver=solver, n_steps=n, rho=rho), theta, truth)
    for solver, rtol in [("tsit5", 1e-3), ("tsit5", 1e-5), ("dopri5", 1e-3)]:
        add(f"diffusion {solver} rtol={rtol:g}", diffusion.with_solver(solver=solver, rtol=rtol, atol=rtol / 10), xa, ta)
    add("distilled flow", flow, theta, truth)

    base, base_emu = rows[0][1], rows[0][2]
    print(f"\n{'prior':28s} {'evals/cpu-s':>11s} {'x analytic':>10s} {'w/ emu x':>9s} {'|d| vs tsit5-1e-6':>18s} {'|err| vs analytic':>18s}")
    for name, r, r_emu, lp, true in rows:
        n = min(len(lp), args.n_adaptive)
        agree = "" if name in ("analytic", "distilled flow") else f"{np.mean(np.abs(lp[:n] - ref[:n])):.2e}"
        err = np.mean(np.abs(lp - true))
        print(f"{name:28s} {r:11.3g} {base / r:10.1f} {base_emu / r_emu:9.1f} {agree:>18s} {err:18.3f}")
    print(f"\nrates per CPU-second (all threads), robust to a loaded shared machine; stored solver {diffusion.solver}")
    print(f"reference: {diffusion.kind} {diffusion.id} with diffrax tsit5 rtol 1e-6 on {len(xa)} points; "
          f"its |err| vs analytic: {np.mean(np.abs(ref - ta)):.3f} nats")
    steps = diffusion.with_solver(solver="tsit5", rtol=1e-3, atol=1e-4).n_steps_taken(diffusion.to_white(
        clip_to_latent(diffusion.space, xa)))
    print(f"tsit5 rtol 1e-3: mean {steps.mean():.1f} steps per point (6 evaluations each), max {steps.max()}")
    print(f"flow fidelity to its teacher (model.json): {flow.info.get('fidelity')}")


if __name__ == "__main__":
    main()
