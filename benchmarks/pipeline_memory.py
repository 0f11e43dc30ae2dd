"""Out-of-core check: peak memory of the client and of each worker versus catalogue size.

    python benchmarks/pipeline_memory.py [--sizes 10000 100000] [--chunk 1000] [--workers 2] [--threads 1]

For each size, in fresh processes: make a mock catalogue (toy emulator of
tests/toymodel.py, analytic prior, photerr noise) and ingest it; then run
``popflow.pipeline.fit_catalog`` on a LocalCluster and report the peak resident
memory (``ru_maxrss``) of the client process and of every worker process, the
store size and the throughput. Memory that does not grow with the number of
galaxies is what "out of core" means here. Sampler settings are deliberately
tiny (the sampler's cost is not what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _settings():
    from popflow.fit import FitSettings

    return FitSettings(n_walkers=28, n_burn=8, burn_stages=4, n_draws=4, thin=1, init="top", n_init=64)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make(n: int, chunk: int, work: Path) -> None:
    from popflow.catalog import ingest
    from popflow.mock import simulate_catalog
    from popflow.priors import AnalyticPrior
    from tests.toymodel import ToyEmulator

    simulate_catalog(1, n, emulator=ToyEmulator(), prior=AnalyticPrior()).to_parquet(work / "mock.parquet")
    ingest(work / "mock.parquet", "lsst", work / "cat.zarr", chunk_size=chunk, progress=False, overwrite=True)


def fit(chunk: int, workers: int, threads: int, work: Path) -> dict:
    from distributed import Client

    from popflow.pipeline import fit_catalog, local_cluster
    from popflow.priors import AnalyticPrior

    with local_cluster(workers, threads) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        stats = fit_catalog(work / "cat.zarr", work / "post.zarr", emulator="tests.toymodel:ToyEmulator",
                            prior=AnalyticPrior(), settings=_settings(), chunk_size=chunk, client=client,
                            progress=False, log=lambda *a: None)
        wall = time.perf_counter() - t0
        workers_mib = sorted(client.run(_peak_rss_mib).values())
    size = sum(f.stat().st_size for f in (work / "post.zarr").rglob("*") if f.is_file())
    return {"n": stats["n_galaxies"], "chunks": stats["n_chunks"], "seconds": wall, "client_mib": _peak_rss_mib(),
            "workers_mib": workers_mib, "store_mib": size / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--step", choices=["make", "fit"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.step == "make":
        make(a.n, a.chunk, Path(a.work))
        return 0
    if a.step == "fit":
        print(json.dumps(fit(a.chunk, a.workers, a.threads, Path(a.work))))
        return 0

    root = Path(a.work or tempfile.mkdtemp(prefix="popflow-memory-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache")}
    print(f"settings {_settings().to_dict()}; chunks of {a.chunk}; {a.workers} worker(s) x {a.threads} XLA thread(s)")
    print(f"{'galaxies':>9} {'chunks':>6} {'wall s':>7} {'gal/s':>7} {'client MiB':>10} {'worker MiB (each)':>22} {'store MiB':>9}")
    for n in a.sizes:
        work = root / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        common = [sys.executable, __file__, "--work", str(work), "--chunk", str(a.chunk), "--workers", str(a.workers),
                  "--threads", str(a.threads)]
        subprocess.run(common + ["--step", "make", "--n", str(n)], env=env, check=True)
        out = subprocess.run(common + ["--step", "fit"], env=env, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        workers = ", ".join(f"{m:.0f}" for m in r["workers_mib"])
        print(f"{r['n']:>9} {r['chunks']:>6} {r['seconds']:>7.1f} {r['n'] / r['seconds']:>7.1f} {r['client_mib']:>10.0f} "
              f"{workers:>22} {r['store_mib']:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
