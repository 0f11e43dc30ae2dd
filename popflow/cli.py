"""The ``popflow`` command.

Each sub-command's options are declared here; the work is done by one
``_cmd_<name>`` handler that calls the library (imports are lazy so that
``popflow --help`` is instant).
"""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from popflow.demo import run_demo

    return run_demo(workdir=args.workdir, workers=args.workers, threads=args.threads, n_galaxies=args.n_galaxies)


def _cmd_ingest(args) -> int:
    from popflow.catalog import ingest

    ingest(args.table, bands=args.bands, out=args.out, id_column=args.id_column, chunk_size=args.chunk_size,
           overwrite=args.overwrite, filter_path=args.filter_path, extra_columns=args.extra)
    return 0


def _cmd_info(args) -> int:
    from popflow.catalog import describe_store

    print(describe_store(args.store))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popflow", description=__doc__.splitlines()[0])
    from popflow import __version__

    parser.add_argument("--version", action="version", version=f"popflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole job on the shipped catalogue")
    p.add_argument("--workdir", default="popflow-demo", help="where the stores are written (default: ./popflow-demo)")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: all cores)")
    p.add_argument("--n-galaxies", type=int, default=None, help="fit only the first N galaxies")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ingest", help="turn a survey table into a chunked Zarr catalogue")
    p.add_argument("table", help="FITS, CSV, HDF5 or Parquet table")
    p.add_argument("--bands", required=True, help="a shipped band set name (e.g. lsst, zcosmos_bright) or a YAML file")
    p.add_argument("--out", required=True, help="output catalogue store (.zarr)")
    p.add_argument("--id-column", default=None, help="column with unique galaxy ids (default: the band set's, else row number)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="galaxies per Zarr chunk (default: 10000)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=COLUMN",
                   help="also store a column: z_spec=zspec, field=tract, ra=RA, dec=DEC (repeatable)")
    p.add_argument("--filter-path", action="append", default=[], help="folder searched for filter curve files (repeatable; also $POPFLOW_FILTER_PATH)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("info", help="describe a catalogue or posterior store")
    p.add_argument("store")
    p.set_defaults(func=_cmd_info)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("popflow: interrupted; completed work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
