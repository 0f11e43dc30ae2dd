"""Peak memory of `popflow ingest` at 1e5 and 1e7 rows (streamed ingest: memory must not grow with rows).

Writes a synthetic LSST-like Parquet table (the shipped `lsst` band set: objectId and six
<band>_cModelFlux / <band>_cModelFluxErr columns, float32 nJy) in row groups of 1e5 rows,
then runs `popflow ingest` in a child process and reads that child's peak resident set size
from os.wait4 (ru_maxrss). Also reports the RSS of a process that only imports popflow
(the floor: Python, NumPy, JAX, xarray, zarr) and the in-memory size of the whole table.

Usage: python benchmarks/ingest_memory.py [--rows 100000 10000000] [--workdir /tmp/popflow-ingest-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BANDS = "ugrizy"


def write_table(path: Path, n_rows: int, seed: int = 0, group_rows: int = 100_000) -> int:
    """Write the synthetic table in row groups; returns its in-memory size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("objectId", pa.int64())] + [(f"{b}_cModelFlux{s}", pa.float32())
                                                     for b in BANDS for s in ("", "Err")])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n_rows, group_rows):
            m = min(group_rows, n_rows - start)
            cols = {"objectId": np.arange(start, start + m, dtype=np.int64) + 10**12}
            base = rng.lognormal(7.0, 1.5, m)
            for b in BANDS:
                err = rng.uniform(20.0, 200.0, m).astype(np.float32)
                cols[f"{b}_cModelFlux"] = (base * rng.lognormal(0, 0.3, m) + rng.normal(0, err)).astype(np.float32)
                cols[f"{b}_cModelFluxErr"] = err
            writer.write_table(pa.table(cols, schema=schema))
    return n_rows * (8 + 4 * 2 * len(BANDS))


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; return (peak RSS in MB, wall seconds, exit code) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024.0, time.perf_counter() - t0, os.waitstatus_to_exitcode(status)


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e7])
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--workdir", default="/tmp/popflow-ingest-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    floor, startup, _ = peak_rss_mb([sys.executable, "-c",
                                     "import popflow.cli, popflow.catalog, xarray, zarr, pyarrow, speclite.filters"])
    print(f"import-only floor: peak RSS {floor:.0f} MB, {startup:.1f} s (included in every wall time below)")
    print(f"{'rows':>10} {'table MB':>9} {'in-memory MB':>12} {'store MB':>9} {'wall s':>7} {'rows/s':>9} "
          f"{'peak RSS MB':>11}")
    for rows in (int(r) for r in args.rows):
        table, store = work / f"table_{rows}.parquet", work / f"catalog_{rows}.zarr"
        in_memory = write_table(table, rows)
        shutil.rmtree(store, ignore_errors=True)
        cmd = [sys.executable, "-m", "popflow", "ingest", str(table), "--bands", "lsst", "--out", str(store),
               "--chunk-size", str(args.chunk_size)]
        rss, wall, rc = peak_rss_mb(cmd)
        if rc != 0:
            raise SystemExit(f"popflow ingest failed with exit code {rc} at {rows} rows")
        print(f"{rows:>10} {table.stat().st_size / 2**20:>9.0f} {in_memory / 2**20:>12.0f} {du_mb(store):>9.0f} "
              f"{wall:>7.1f} {rows / wall:>9.0f} {rss:>11.0f}", flush=True)
        table.unlink()
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
