"""Peer photo-z estimators from LSST DESC RAIL, run on popflow catalogue arrays.

- BPZ (``pz-rail-bpz``; Benitez 2000): template fitting with the 31 COSMOS templates of
  Ilbert et al. (2009), RAIL's full workflow: BPZlitePreEstimator (best types and zero-point
  offsets at z_spec on the training part) -> BPZliteInformer (Bayesian prior p(z, T | m)
  fitted to the training part) -> BPZliteEstimator.
- kNN (``pz-rail-sklearn``): KNearNeighInformer / Estimator, colours + reference magnitude.
- FlexZBoost (``pz-rail-flexzboost``; Izbicki & Lee 2017): conditional density estimation
  with xgboost regressions on a cosine basis.

Every runner takes magnitudes built from the catalogue's fluxes by :func:`catalog_to_mags`
(so the peers see exactly the galaxies popflow sees) and returns a dict with ``z_point``
(n,), ``z_grid`` (n_z,), ``pz`` (n, n_z) and timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

Z_GRID = np.linspace(0.0, 3.0, 301)  # RAIL's default grid (zmin 0, zmax 3, 301 points); runners take z_grid=
NONDETECT = 99.0
UNOBSERVED = -99.0
COSMOS_NT = [10, 5, 16]  # broad types of COSMOS_seds.list (ellipticals, spirals, starbursts), as in COSMOS31_HDFN_prior.pkl


def catalog_to_mags(flux, flux_err, mask):
    """nJy fluxes -> AB magnitudes and errors in RAIL's conventions.

    Detected (usable, flux > 0): m = 31.4 - 2.5 log10 f, sigma_m = 1.0857 s / f.
    Usable but flux <= 0: non-detection, m = 99 and error = the 1-sigma limit 31.4 - 2.5 log10 s.
    Masked: unobserved, m = -99, error -99. Returns (mag, mag_err) float64 (n, n_band).
    """
    f = np.asarray(flux, np.float64)
    s = np.asarray(flux_err, np.float64)
    m = np.asarray(mask, bool)
    det = m & (f > 0) & (s > 0)
    nondet = m & ~det & (s > 0)
    mag = np.full(f.shape, UNOBSERVED)
    err = np.full(f.shape, UNOBSERVED)
    mag[det] = 31.4 - 2.5 * np.log10(f[det])
    err[det] = 1.0857 * s[det] / f[det]
    mag[nondet] = NONDETECT
    err[nondet] = 31.4 - 2.5 * np.log10(s[nondet])
    return mag, err


def _table(bands, mag, err, z=None):
    d = {f"mag_{b}": mag[:, i].copy() for i, b in enumerate(bands)}
    d.update({f"mag_err_{b}": err[:, i].copy() for i, b in enumerate(bands)})
    if z is not None:
        d["redshift"] = np.asarray(z, np.float64).copy()
    return d


def _limits(bands, mag):
    """Per-band 'limiting magnitude' for RAIL's non-detection replacement: the faintest detection."""
    return {f"mag_{b}": float(np.max(np.where(np.abs(mag[:, i]) < 90, mag[:, i], -np.inf))) for i, b in enumerate(bands)}


def _ml_table(bands, mag, err, limits, z=None):
    """kNN / FlexZBoost inputs: unobserved and non-detected bands both at the band's limit."""
    mag = mag.copy()
    for i, b in enumerate(bands):
        bad = np.abs(mag[:, i]) > 90
        mag[bad, i] = limits[f"mag_{b}"]
    err = np.where(np.abs(err) > 90, 1.0, err)
    return _table(bands, mag, err, z)


def _common(bands, ref_band, limits, z_grid):
    return dict(hdf5_groupname="", bands=[f"mag_{b}" for b in bands], err_bands=[f"mag_err_{b}" for b in bands],
                ref_band=f"mag_{ref_band}", mag_limits=limits, nondetect_val=NONDETECT, output_mode="return",
                zmin=float(z_grid[0]), zmax=float(z_grid[-1]), nzbins=z_grid.size)


def _ensemble_pz(ens, z_grid):
    """qp ensemble -> (n, n_z) density on z_grid, tiny negative interpolation values clipped."""
    return np.clip(np.asarray(ens.pdf(z_grid), np.float64), 0.0, None)


def _run_trained(informer_cls, estimator_cls, name, bands, ref_band, train, test, workdir, z_grid):
    """Train a RAIL machine-learning estimator on ``train`` = (mag, err, z), apply it to ``test`` = (mag, err)."""
    limits = _limits(bands, train[0])
    cfg = _common(bands, ref_band, limits, z_grid)
    t0 = time.perf_counter()
    inf = informer_cls.make_stage(name=f"{name}_inform", model=str(Path(workdir) / f"{name}.pkl"), **cfg)
    inf.inform(_ml_table(bands, *train[:2], limits, train[2]))
    t1 = time.perf_counter()
    est = estimator_cls.make_stage(name=f"{name}_estimate", model=inf.get_handle("model"), **cfg)
    ens = est.estimate(_ml_table(bands, *test, limits)).data
    t2 = time.perf_counter()
    pz = _ensemble_pz(ens, z_grid)
    return ens, pz, {"z_grid": z_grid, "pz": pz, "train_s": t1 - t0, "s_per_galaxy": (t2 - t1) / len(pz)}


def run_knn(bands, ref_band, train, test, workdir, z_grid=Z_GRID):
    """RAIL kNN trained on ``train`` = (mag, err, z), applied to ``test`` = (mag, err); point estimate = its zmode."""
    from rail.estimation.algos.k_nearneigh import KNearNeighEstimator, KNearNeighInformer

    ens, _, out = _run_trained(KNearNeighInformer, KNearNeighEstimator, "knn", bands, ref_band, train, test, workdir, z_grid)
    return {"z_point": np.ravel(ens.ancil["zmode"]), **out}


def run_flexzboost(bands, ref_band, train, test, workdir, z_grid=Z_GRID):
    """RAIL FlexZBoost trained on ``train``; point estimate = mode of p(z)."""
    from rail.estimation.algos.flexzboost import FlexZBoostEstimator, FlexZBoostInformer

    _, pz, out = _run_trained(FlexZBoostInformer, FlexZBoostEstimator, "fzb", bands, ref_band, train, test, workdir, z_grid)
    return {"z_point": z_grid[np.argmax(pz, axis=1)], **out}


def bpz_data_dir(workdir, filters: dict[str, object]) -> Path:
    """A BPZ data folder (SED -> RAIL's templates, FILTER with ``filters`` {name: popflow Filter}, own AB cache).

    RAIL writes model-flux tables (AB/) next to the filters, so the folder lives in the work
    directory, not in the package or the repository. desc_bpz reads $BPZDATAPATH once at
    import, so one process uses one folder for every data set (filter names must differ).
    """
    from rail.utils.path_utils import RAILDIR

    root = Path(workdir) / "bpz_data"
    (root / "FILTER").mkdir(parents=True, exist_ok=True)
    (root / "AB").mkdir(exist_ok=True)
    sed = root / "SED"
    if not sed.exists():
        sed.symlink_to(Path(RAILDIR) / "rail/examples_data/estimation_data/data/SED")
    for name, flt in filters.items():
        path = root / "FILTER" / f"{name}.res"
        if not path.exists():
            np.savetxt(path, np.column_stack([flt.wavelength, flt.transmission]), fmt="%.6g")
    return root


def run_bpz(bands, ref_band, filter_names, train, test, workdir, data_dir, mmin=12.0, mmax=29.0, z_grid=Z_GRID):
    """RAIL BPZ (COSMOS templates): types and offsets at z_spec, prior fitted on ``train``, then estimate.

    Returns {"RAIL offsets": result, "no offsets": result} (estimates with and without the
    pre-estimator's zero-point offsets)."""
    import tables_io
    from rail.estimation.algos.bpz_lite import BPZliteEstimator, BPZliteInformer
    from rail.estimation.algos.bpz_preprocess import BPZlitePreEstimator

    os.environ["BPZDATAPATH"] = str(data_dir)
    cfg = _common(bands, ref_band, {f"mag_{b}": 28.0 for b in bands}, z_grid)
    cfg.update(bpz_ref_data_path=str(data_dir), filter_list=list(filter_names), spectra_file="COSMOS_seds.list",
               zp_errors=[0.1] * len(bands))  # RAIL's default 0.1 mag per band
    t0 = time.perf_counter()
    pre = BPZlitePreEstimator.make_stage(name="bpz_pre", nt_array=COSMOS_NT, zp_offsets=[0.0] * len(bands), **cfg)
    types = pre.estimate(_table(bands, *train)).data
    type_file = Path(workdir) / "bpz_types.hdf5"
    tables_io.write(types, str(type_file))
    inf = BPZliteInformer.make_stage(name="bpz_inform", nt_array=COSMOS_NT, type_file=str(type_file), output_hdfn=False,
                                     mmin=mmin, mmax=mmax, model=str(Path(workdir) / "bpz.pkl"), **cfg)
    inf.inform(_table(bands, *train))
    t_train = time.perf_counter() - t0
    offsets = np.asarray(types["offsets"]["zp_offsets"]).tolist()
    out = {}
    # RAIL's BPZlitePreEstimator offsets can be far off (0.5-0.8 mag on zCOSMOS: its template
    # renormalisation loop rescales the whole array per galaxy), so BPZ also runs without them
    for label, override in (("RAIL offsets", False), ("no offsets", True)):
        t1 = time.perf_counter()
        est = BPZliteEstimator.make_stage(name=f"bpz_estimate_{int(override)}", model=inf.get_handle("model"),
                                          override_file_offsets=override, zp_offsets=[0.0] * len(bands), **cfg)
        ens = est.estimate(_table(bands, *test)).data
        t2 = time.perf_counter()
        pz = _ensemble_pz(ens, z_grid)
        empty = pz.sum(axis=1) <= 0  # BPZ leaves p(z) all zero when no template fits
        pz[empty] = 1.0
        out[label] = {"z_point": np.ravel(ens.ancil["zmode"]), "z_grid": z_grid, "pz": pz, "train_s": t_train,
                      "s_per_galaxy": (t2 - t1) / len(pz), "zp_offsets_mag": offsets if not override else [0.0] * len(bands),
                      "n_no_fit": int(empty.sum())}
    return out
