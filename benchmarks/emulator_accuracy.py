"""Emulator accuracy per band and per redshift slice against held-out bagpipes models.

    python benchmarks/emulator_accuracy.py [--emulators lsst,sdss,cfhtls,hsc,zcosmos_bright]
        [--validation tests/data/emulator_validation/validation_prior.npz | STORE.zarr]
        [--plot benchmarks/emulator_accuracy_vs_z.png]

The default validation set is the committed one: bagpipes models drawn from
the analytic prior (``popflow sps simulate --proposal prior``), unit-mass
magnitudes of every shipped filter. ``--write-validation STORE`` first
refreshes that npz from a prior-drawn store. Prints, per emulator and band, the
median and 95th percentile of |dm| (mag) overall and per redshift slice, and
plots the running median and 95th percentile of |dm| versus z.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from popflow.emulator import Emulator
from popflow.emulator.train import accuracy_table, read_training_store, write_validation_npz

DEFAULT_VALIDATION = Path(__file__).resolve().parent.parent / "tests" / "data" / "emulator_validation" / "validation_prior.npz"


def load_validation(path):
    """(theta (n, dim), mags (n, n_filters), filters) from the committed npz or a training store."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["theta"], z["mag_unit"], [str(f) for f in z["filters"]]
    theta, mags, _, filters, _ = read_training_store(path)
    return theta, mags, filters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulators", default="lsst,sdss,cfhtls,hsc,zcosmos_bright")
    ap.add_argument("--validation", default=str(DEFAULT_VALIDATION))
    ap.add_argument("--write-validation", default=None, metavar="STORE", help="refresh the committed npz from STORE first")
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parent / "emulator_accuracy_vs_z.png"))
    args = ap.parse_args()
    if args.write_validation:
        write_validation_npz(args.write_validation, DEFAULT_VALIDATION)
        print(f"wrote {DEFAULT_VALIDATION} from {args.write_validation}")
    theta, mags, filters = load_validation(args.validation)
    print(f"validation: {args.validation}, {len(theta)} models")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.emulators.split(",")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), sharex=True, squeeze=False)
    z_all = theta[:, -1]
    edges = np.linspace(0, 6, 25)
    for ax, name in zip(axes[:, 0], names):
        emu = Emulator.load(name)
        cols = [filters.index(f) for f in emu.filters]
        acc = accuracy_table(emu, theta, mags[:, cols])
        print(f"\n## {name} ({emu.id}; {emu.meta['architecture']['design']} {emu.meta['architecture'].get('hidden', '')}), "
              f"{acc['n']} models")
        print("| band | median |dm| | p95 |dm| | " + " | ".join(f"z {s['z_lo']}-{s['z_hi']} med/p95" for s in acc["by_z"]) + " |")
        for i, b in enumerate(emu.bands):
            row = f"| {b} | {acc['median'][i]:.4f} | {acc['p95'][i]:.4f} | "
            row += " | ".join(f"{s['median'][i]:.3f}/{s['p95'][i]:.3f}" for s in acc["by_z"])
            print(row + " |")
        # running statistics versus z for the plot
        from popflow.emulator.train import cap_magnitudes

        import jax

        th = np.array(theta, np.float32)
        th[:, emu.space.index("log_mass")] = 0.0
        ok = z_all >= 1e-3
        pred = np.asarray(jax.jit(emu.magnitudes)(th[ok]))
        d = np.abs(cap_magnitudes(pred, z_all[ok]) - cap_magnitudes(mags[ok][:, cols], z_all[ok]))
        zc = 0.5 * (edges[1:] + edges[:-1])
        for i, b in enumerate(emu.bands):
            med = [np.median(d[(z_all[ok] >= lo) & (z_all[ok] < hi), i]) if np.any((z_all[ok] >= lo) & (z_all[ok] < hi)) else np.nan
                   for lo, hi in zip(edges[:-1], edges[1:])]
            p95 = [np.percentile(d[(z_all[ok] >= lo) & (z_all[ok] < hi), i], 95) if np.any((z_all[ok] >= lo) & (z_all[ok] < hi)) else np.nan
                   for lo, hi in zip(edges[:-1], edges[1:])]
            line, = ax.plot(zc, med, label=b)
            ax.plot(zc, p95, ls="--", color=line.get_color())
        ax.axhline(0.01, color="k", lw=0.5)
        ax.axhline(0.03, color="k", lw=0.5, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel("|dm| [mag]")
        ax.set_title(f"{name}: median (solid), 95th percentile (dashed)", fontsize=9)
        ax.legend(fontsize=6, ncol=5)
    axes[-1, 0].set_xlabel("redshift")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
