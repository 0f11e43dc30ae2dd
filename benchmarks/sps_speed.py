"""Speed of the bagpipes simulator (popflow.sps): models per second in one process.

    python benchmarks/sps_speed.py [--n 500] [--filter-path ../shared/data/zcosmos_bright/filters]

Prints the build time, the CPU time per model (process time, robust to other
load on the machine) and the wall-clock throughput, for the union of the
shipped band sets (or the band sets without file-based curves if the filter
path is not given). Throughput with W worker processes is about W times the
single-process figure when W cores are free.
"""

import argparse
import time

import numpy as np

from popflow.sps.bagpipes_model import Z_MIN, BagpipesSimulator
from popflow.sps.generate import BAND_SETS
from popflow.sps.proposal import draw


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--filter-path", action="append", default=[])
    args = ap.parse_args()
    sets = list(BAND_SETS) if args.filter_path else [b for b in BAND_SETS if b != "zcosmos_bright"]
    filters = list(dict.fromkeys(f for b in sets for f in BAND_SETS[b]))
    t0 = time.perf_counter()
    sim = BagpipesSimulator(filters, search_path=args.filter_path)
    build = time.perf_counter() - t0
    theta = draw(np.random.default_rng(0), args.n, "wide", z_min=Z_MIN)
    sim.magnitudes(theta[:5])  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    sim.magnitudes(theta)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"band sets: {', '.join(sets)} ({len(filters)} filters); {args.n} models from the wide proposal")
    print(f"simulator build: {build:.1f} s")
    print(f"CPU time per model: {1e3 * cpu / args.n:.2f} ms  ->  {args.n / cpu:.0f} models/s per free core")
    print(f"wall-clock throughput (this process, current machine load): {args.n / wall:.0f} models/s")


if __name__ == "__main__":
    main()
