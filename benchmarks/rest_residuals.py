"""Model-data residuals at the spectroscopic redshift, binned in rest-frame wavelength.

For the galaxies ``photoz_real.py`` calibrated on (and a disjoint set of training galaxies), the SED parameters are
fitted at z_spec under the calibrated data model (:func:`popflow.calibrate.fit_fixed_z`, every parameter but the
redshift free), and the residuals data - model (mag, S/N >= 5 detections) are binned in the rest-frame wavelength
each band samples, lambda_eff / (1 + z_spec). Zero points are constant in the observed frame, so what is left
here is structure in the rest frame: the SPS model's (and the emulator's) mismatch with real SEDs, which no
zero point can absorb. Structure that repeats on the second, disjoint set is real.

    python benchmarks/rest_residuals.py --dataset zcosmos --work /tmp/popflow-bench   # after photoz_real.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photoz_real import DATASETS, SHARED, arrays, load_split  # noqa: E402

from popflow.calibrate import NMAD_SCALE, fit_fixed_z, free_all, prior_median  # noqa: E402
from popflow.datamodel import DataModel  # noqa: E402
from popflow.filters import load_filter  # noqa: E402
from popflow.pipeline import load_model  # noqa: E402
from popflow.priors import AnalyticPrior  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=list(DATASETS), default="zcosmos")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/popflow-bench"))
    ap.add_argument("--datamodel", type=Path, default=None, help="default: the work folder's 6-iteration calibration")
    ap.add_argument("--n", type=int, default=300, help="galaxies per set (the first set: photoz_real's calibration rows)")
    ap.add_argument("--bins", type=int, default=24, help="log-spaced rest-wavelength bins over 900 A - 2.5 micron")
    args = ap.parse_args(argv)

    train, _, _ = load_split(args.dataset, args.data, args.work, 0)
    emu = load_model(DATASETS[args.dataset]["emulator"], "emulator").select(list(train.attrs["filters"]))
    path = args.datamodel or sorted((args.work / args.dataset).glob(f"datamodel_*_{args.n}_0_it6.json"))[0]
    dm = DataModel.from_dict(json.loads(Path(path).read_text()))
    f, e, m, z = arrays(train)
    calib = np.sort(np.random.default_rng(0).choice(len(z), args.n, replace=False))  # photoz_real's rows (seed 0)
    other = np.sort(np.random.default_rng(5).choice(np.setdiff1d(np.arange(len(z)), calib), args.n, replace=False))
    search = [str(args.data / "zcosmos_bright" / "filters")]
    lam = np.array([load_filter(x, search_path=search).effective_wavelength for x in train.attrs["filters"]])
    prior = AnalyticPrior(space=emu.space)
    reference = prior_median(jax.random.key(1), prior)
    edges = np.linspace(np.log10(900.0), np.log10(25000.0), args.bins + 1)
    print(f"{args.dataset}: data model {path}; residual data - model [mag] at z_spec by rest-frame wavelength\n")
    print("| rest wavelength [A] | calibration set: n | median | NMAD | other set: n | median | NMAD |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for rows in (calib, other):
        robust = DataModel(dm.zero_points, dm.error_floor, 4.0)  # the Student-t fit calibrate uses
        _, model, _, _ = fit_fixed_z(jax.random.key(0), f[rows], e[rows], m[rows], z[rows], emulator=emu, prior=prior,
                                     datamodel=robust, reference=reference, groups=free_all(emu.space), fit_zero_points=False)
        mu = np.asarray(dm.zero_points) * model
        good = m[rows] & (f[rows] > 5 * e[rows]) & (mu > 0)
        res = -2.5 * np.log10(np.where(good, f[rows], 1.0) / np.where(good, mu, 1.0))
        log_rest = np.log10(lam[None, :] / (1.0 + z[rows][:, None]))
        cells = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            s = good & (log_rest >= lo) & (log_rest < hi)
            r = res[s]
            cells.append((int(s.sum()), float(np.median(r)) if r.size else np.nan,
                          float(NMAD_SCALE * np.median(np.abs(r - np.median(r)))) if r.size else np.nan))
        table.append(cells)
    for (lo, hi), a, b in zip(zip(edges[:-1], edges[1:]), *table):
        if min(a[0], b[0]) >= 15:
            print(f"| {10**lo:.0f}-{10**hi:.0f} | {a[0]} | {a[1]:+.3f} | {a[2]:.3f} | {b[0]} | {b[1]:+.3f} | {b[2]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
