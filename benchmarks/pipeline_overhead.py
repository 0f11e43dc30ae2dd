"""Pipeline overhead: `fit_catalog` on a LocalCluster versus the same chunks fitted in one plain process.

    python benchmarks/pipeline_overhead.py [--n 10000] [--chunk 1000] [--workers 1] [--threads 2]
                                           [--walkers 32] [--burn 200] [--draws 16] [--thin 4] [--repeats 2]

Makes a mock catalogue (toy emulator of tests/toymodel.py, analytic prior, photerr
LSST noise), ingests it, warms a private JAX compilation cache with one chunk, then
runs (each in a fresh process with the same XLA/BLAS thread limits, ``worker_env``):

- baseline: a loop over the catalogue chunks calling ``popflow.fit.fit_chunk``
  with the pipeline's per-chunk keys (read from Zarr, no writing, no Dask);
- pipeline: ``popflow.pipeline.fit_catalog`` (cluster start, tasks, Zarr writes,
  summaries, markers).

Each is timed two ways: the whole process from launch to exit (Python start,
imports, loading the compiled kernel, the fit, shutdown: what a user waits for)
and the work inside it (baseline: the chunk loop; pipeline: the ``fit_catalog``
call, cluster start included). Prints galaxies per second, the overhead
(pipeline / baseline - 1) both ways, and checks that the pipeline's draws equal
the baseline's. ``--repeats 2`` runs baseline, pipeline, pipeline, baseline (ABBA)
and averages, which cancels a linear drift of the load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _settings(a):
    from popflow.fit import FitSettings

    return FitSettings(n_walkers=a.walkers, n_burn=a.burn, burn_stages=a.burn_stages, n_draws=a.draws, thin=a.thin,
                       init=a.init, n_init=a.n_init)


def make_catalog(a, work: Path) -> Path:
    from popflow.catalog import ingest
    from popflow.mock import simulate_catalog
    from popflow.priors import AnalyticPrior
    from tests.toymodel import ToyEmulator

    df = simulate_catalog(a.seed, a.n, emulator=ToyEmulator(), prior=AnalyticPrior())
    df.to_parquet(work / "mock.parquet")
    return ingest(work / "mock.parquet", "lsst", work / "cat.zarr", chunk_size=a.chunk, progress=False, overwrite=True)


def baseline(a, catalog: str, max_chunks: int | None) -> dict:
    """Fit the chunks in this process, as the pipeline's tasks would (same keys, same padding)."""
    import jax
    import numpy as np

    from popflow.catalog import open_catalog
    from popflow.datamodel import DataModel
    from popflow.fit import fit_chunk
    from popflow.priors import AnalyticPrior
    from tests.toymodel import ToyEmulator

    t0 = time.perf_counter()
    cat = open_catalog(catalog)
    n = cat.sizes["galaxy"]
    emu, prior = ToyEmulator().select(tuple(cat.attrs["filters"])), AnalyticPrior()
    dm, s = DataModel.from_emulator(emu), _settings(a)
    chunks = range(-(-n // a.chunk))[:max_chunks]
    first = None
    for i in chunks:
        part = cat.isel(galaxy=slice(i * a.chunk, (i + 1) * a.chunk))
        res = fit_chunk(jax.random.fold_in(jax.random.PRNGKey(a.seed), i), part["flux"].values, part["flux_err"].values,
                        part["mask"].values, emulator=emu, prior=prior, datamodel=dm, settings=s, pad_to=a.chunk)
        if first is None:
            first = res["samples"][..., -1]
    return {"seconds": time.perf_counter() - t0, "n": min(n, len(chunks) * a.chunk),
            "z_chunk0": np.asarray(first).tolist()}


def pipeline(a, catalog: str, out: str) -> dict:
    from popflow.pipeline import fit_catalog, open_posterior
    from popflow.priors import AnalyticPrior

    t0 = time.perf_counter()
    stats = fit_catalog(catalog, out, emulator="tests.toymodel:ToyEmulator", prior=AnalyticPrior(), settings=_settings(a),
                        seed=a.seed, chunk_size=a.chunk, workers=a.workers, threads=a.threads, progress=False,
                        log=lambda *x: None)
    wall = time.perf_counter() - t0
    z0 = open_posterior(out)["posterior"]["redshift"].isel(galaxy=slice(0, a.chunk)).values
    return {"seconds": wall, "task_seconds": stats["seconds"], "n": stats["n_galaxies"], "z_chunk0": z0.tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="XLA threads per worker (and baseline)")
    ap.add_argument("--walkers", type=int, default=32)
    ap.add_argument("--burn", type=int, default=200)
    ap.add_argument("--burn-stages", type=int, default=4)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--thin", type=int, default=4)
    ap.add_argument("--init", default="top", help="walker initialisation (default top: the cheaper one, so that 1e4 "
                    "galaxies fit in minutes on 2 cores; the overhead is relative to whatever the fit costs)")
    ap.add_argument("--n-init", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, choices=[1, 2], default=1,
                    help="2: baseline, pipeline, pipeline, baseline, averaged (cancels a linear drift of the load)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--mode", choices=["baseline", "warm", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--catalog", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.mode:  # a child process: one measurement, JSON on the last line
        import numpy as np

        if a.mode == "pipeline":
            r = pipeline(a, a.catalog, str(Path(a.work) / "post.zarr"))
        else:
            r = baseline(a, a.catalog, 1 if a.mode == "warm" else None)
        r["z_chunk0"] = np.nan_to_num(np.asarray(r["z_chunk0"]), nan=-1).tolist()
        print(json.dumps(r))
        return 0

    from popflow.pipeline import worker_env

    work = Path(a.work or tempfile.mkdtemp(prefix="popflow-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    cat = make_catalog(a, work)
    env = {**os.environ, **worker_env(a.threads), "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache"),
           "PYTHONPATH": str(REPO)}
    base_args = [sys.executable, __file__, "--catalog", str(cat), "--work", str(work), "--n", str(a.n),
                 "--chunk", str(a.chunk), "--workers", str(a.workers), "--threads", str(a.threads),
                 "--walkers", str(a.walkers), "--burn", str(a.burn), "--burn-stages", str(a.burn_stages),
                 "--draws", str(a.draws), "--thin", str(a.thin), "--init", a.init, "--n-init", str(a.n_init), "--seed", str(a.seed)]

    def child(mode):
        if mode == "pipeline":
            shutil.rmtree(work / "post.zarr", ignore_errors=True)
        t0 = time.perf_counter()
        out = subprocess.run(base_args + ["--mode", mode], env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["process_seconds"] = time.perf_counter() - t0
        print(f"  {mode}: process {r['process_seconds']:.1f} s, inside {r['seconds']:.1f} s", flush=True)
        return r

    print(f"catalogue: {a.n} mock galaxies (toy emulator, analytic prior), chunks of {a.chunk}; "
          f"settings {_settings(a).to_dict()}")
    print(f"threads: {a.workers} worker(s) x {a.threads} XLA thread(s); baseline 1 process x {a.threads}")
    child("warm")  # compile once into the private cache: every run below loads the kernel from it
    order = ["baseline", "pipeline"] + (["pipeline", "baseline"] if a.repeats == 2 else [])
    runs = {"baseline": [], "pipeline": []}
    for mode in order:
        runs[mode].append(child(mode))
    mean = {m: {k: sum(r[k] for r in rs) / len(rs) for k in ("seconds", "process_seconds")} for m, rs in runs.items()}
    b, p = mean["baseline"], mean["pipeline"]
    n = runs["baseline"][0]["n"]
    same = runs["baseline"][0]["z_chunk0"] == runs["pipeline"][0]["z_chunk0"]
    print(f"{'':48s} {'process':>9s} {'gal/s':>7s} {'inside':>9s} {'gal/s':>7s}")
    print(f"{'baseline (fit_chunk loop, no Dask, no writes)':48s} {b['process_seconds']:8.1f}s "
          f"{n / b['process_seconds']:7.1f} {b['seconds']:8.1f}s {n / b['seconds']:7.1f}")
    print(f"{'pipeline (fit_catalog: cluster, tasks, writes)':48s} {p['process_seconds']:8.1f}s "
          f"{n / p['process_seconds']:7.1f} {p['seconds']:8.1f}s {n / p['seconds']:7.1f}")
    print(f"overhead: {100 * (p['process_seconds'] / b['process_seconds'] - 1):+.1f} % (whole processes); "
          f"{100 * (p['seconds'] / b['seconds'] - 1):+.1f} % (fit_catalog call vs chunk loop)")
    print(f"first chunk's redshift draws identical in both: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
