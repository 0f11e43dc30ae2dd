"""Photo-z accuracy on real catalogues: popflow side by side with RAIL's BPZ, kNN and FlexZBoost.

For each data set (``../shared/data``; see its README):

- zcosmos: zCOSMOS-bright public CSV, 10 bands; secure redshifts only (cc in 3.x, 4.x, 13.x,
  14.x, 23.x, 24.x; zpec > 0.01), split 50/50 into training and test with a seeded permutation;
- sdss: SDSS MGS, the files' own SDSS_MGS.train / SDSS_MGS.test split (ugriz);
- dc2: RAIL cosmoDC2 test files, training_9816 / validation_9816 (LSST ugrizy).

Catalogues are ingested with popflow's band sets, and every method sees the same galaxies
(fluxes turned back into magnitudes for the peers). The peers train on the training part;
popflow (``--emulator``) calibrates zero points and error floors on ``--n-calib`` training
galaxies, then fits ``--n-test`` test galaxies (the same subset for every method). Metrics
from :mod:`popflow.metrics`; timings per galaxy are wall-clock on this machine.

    python benchmarks/photoz_real.py --datasets dc2 sdss zcosmos --work /tmp/popflow-bench \
        [--n-test 2000] [--emulator NAME --prior analytic --prior DIFFUSION] [--markdown out.md]

Prints one markdown table per data set (and writes them to ``--markdown``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from popflow import metrics  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SECURE_CLASSES = (3, 4, 13, 14, 23, 24)

DATASETS = {
    "zcosmos": dict(bandset="zcosmos_bright", ref_band="i", files=("zcosmos_bright/zcosmos_bright_public.csv",), z_grid=(0.0, 2.0, 401),
                    filter_path="zcosmos_bright/filters"),
    "sdss": dict(bandset="sdss_mgs", ref_band="r", files=("sdss_mgs/SDSS_MGS.train", "sdss_mgs/SDSS_MGS.test"),
                 z_grid=(0.0, 0.6, 601)),  # dz = 0.001: the MGS scatter is below RAIL's default 0.01 grid step
    "dc2": dict(bandset="rail_dc2", ref_band="i", files=("rail_dc2/test_dc2_training_9816.hdf5", "rail_dc2/test_dc2_validation_9816.hdf5"), z_grid=(0.0, 3.0, 301)),
}


def load_split(name: str, data: Path, work: Path, seed: int):
    """Ingest the data set's files; returns (train catalogue Dataset, test Dataset, catalogue paths)."""
    from popflow.catalog import ingest, open_catalog

    cfg = DATASETS[name]
    stores = []
    for f in cfg["files"]:
        out = work / name / (Path(f).name.replace(".", "_") + ".zarr")  # SDSS_MGS.train / .test share a stem
        if not out.exists():
            fp = [str(data / cfg["filter_path"])] if "filter_path" in cfg else None
            ingest(data / f, bands=cfg["bandset"], out=out, filter_path=fp, progress=False)
        stores.append(out)
    if name == "zcosmos":
        ds = open_catalog(stores[0]).load()
        cc = np.asarray(ds["z_spec_class"].values, np.float64)
        z = np.asarray(ds["z_spec"].values, np.float64)
        secure = np.isin(np.floor(cc).astype(int), SECURE_CLASSES) & (z > 0.01)
        rows = np.flatnonzero(secure)
        perm = np.random.default_rng(seed).permutation(rows)
        half = perm.size // 2
        return ds.isel(galaxy=np.sort(perm[:half])), ds.isel(galaxy=np.sort(perm[half:])), stores
    return open_catalog(stores[0]).load(), open_catalog(stores[1]).load(), stores


def arrays(ds):
    return (np.asarray(ds["flux"].values), np.asarray(ds["flux_err"].values), np.asarray(ds["mask"].values),
            np.asarray(ds["z_spec"].values, np.float64))


def evaluate(res: dict, z_true: np.ndarray) -> dict:
    m = metrics.photoz_metrics(res["z_point"], z_true, z_grid=res["z_grid"], pz=res["pz"])
    m["s_per_galaxy"] = res["s_per_galaxy"]
    m["train_s"] = res.get("train_s", 0.0)
    return m


def run_peers(name, train, test, work, methods, filter_path):
    from popflow.filters import load_filter

    cfg = DATASETS[name]
    bands = list(train.attrs["bands"])
    ftr, etr, mtr, ztr = arrays(train)
    fte, ete, mte, zte = arrays(test)
    tr = (*peers.catalog_to_mags(ftr, etr, mtr), ztr)
    te = peers.catalog_to_mags(fte, ete, mte)
    out = {}
    wd = work / name
    zg = np.linspace(*cfg["z_grid"][:2], cfg["z_grid"][2])
    if "bpz" in methods:
        names = [f"pf_{name}_{b}" for b in bands]
        flts = {n: load_filter(f, search_path=filter_path) for n, f in zip(names, train.attrs["filters"])}
        data_dir = peers.bpz_data_dir(work, flts)  # one folder for all data sets: desc_bpz reads BPZDATAPATH once
        mmin = 12.0 if name == "sdss" else 16.0
        for label, res in peers.run_bpz(bands, cfg["ref_band"], names, tr, te, wd, data_dir, mmin=mmin, z_grid=zg).items():
            out[f"BPZ (RAIL, COSMOS templates, {label})"] = res
    if "knn" in methods:
        out["kNN (RAIL sklearn)"] = peers.run_knn(bands, cfg["ref_band"], tr, te, wd, z_grid=zg)
    if "fzb" in methods:
        out["FlexZBoost (RAIL)"] = peers.run_flexzboost(bands, cfg["ref_band"], tr, te, wd, z_grid=zg)
    return {k: evaluate(v, zte) | ({"zp_offsets_mag": v["zp_offsets_mag"]} if "zp_offsets_mag" in v else {}) for k, v in out.items()}


def run_popflow(name, train, test, work, emulator, priors, n_calib, seed, settings, log=print):
    """Calibrate on training galaxies, fit the test subset under each prior, evaluate."""
    import jax

    from popflow.calibrate import calibrate, save_datamodel
    from popflow.fit import FitSettings
    from popflow.pipeline import fit_catalog, load_model
    from popflow.priors import AnalyticPrior

    emu = load_model(emulator, "emulator").select(list(train.attrs["filters"]))
    out = {}
    wd = work / name
    test_store = wd / f"test_subset_{test.sizes['galaxy']}.zarr"
    if not test_store.exists():
        test.chunk({"galaxy": 1000}).to_zarr(test_store, consolidated=False)
    for prior_spec in priors:
        prior = AnalyticPrior(space=emu.space) if prior_spec == "analytic" else load_model(prior_spec, "prior")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(train.sizes["galaxy"], min(n_calib, train.sizes["galaxy"]), replace=False))
        f, e, m, z = arrays(train.isel(galaxy=rows))
        t0 = time.perf_counter()
        dm, report = calibrate(jax.random.PRNGKey(seed), f, e, m, z, emulator=emu, prior=prior, log=log)
        t_cal = time.perf_counter() - t0
        save_datamodel(wd / f"datamodel_{prior_spec.replace('/', '_')}.json", dm, {"filters": list(train.attrs["filters"]), "calibration": report})
        post = wd / f"posterior_{prior_spec.replace('/', '_')}.zarr"
        r = fit_catalog(test_store, post, emulator=emu, prior=prior, datamodel=dm, settings=FitSettings(**settings),
                        seed=seed, workers=1, overwrite=True, progress=False, log=log)
        m = metrics.evaluate_posterior(post, catalog=test_store, out_dir=wd / f"plots_{prior_spec.replace('/', '_')}")
        m.pop("plots", None)
        m["s_per_galaxy"] = r["seconds"] / max(r["n_galaxies"], 1)
        m["train_s"] = t_cal
        m["zp_offsets_mag"] = report["zero_point_mag"]
        out[f"popflow ({prior_spec} prior)"] = m
    return out


def table(name: str, n_train: int, n_test: int, rows: dict) -> str:
    head = (f"### {name}: {n_train} training / {n_test} test galaxies\n\n"
            "| method | sigma_NMAD | bias | outliers >0.15 | RAIL outliers | PIT KS | CRPS | cov 68% | cov 95% | s/galaxy | training s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {k} | {m['sigma_nmad']:.4f} | {m['bias']:+.4f} | {100 * m['outlier_frac']:.2f}% | {100 * m['rail_outlier_frac']:.2f}% | "
             f"{m.get('pit_ks', float('nan')):.3f} | {m.get('crps', float('nan')):.4f} | {m.get('coverage_68', float('nan')):.3f} | "
             f"{m.get('coverage_95', float('nan')):.3f} | {m['s_per_galaxy']:.2e} | {m['train_s']:.0f} |" for k, m in rows.items()]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=Path("/tmp/popflow-bench"))
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--peers", nargs="*", choices=("bpz", "knn", "fzb"), default=["bpz", "knn", "fzb"])
    ap.add_argument("--n-test", type=int, default=None, help="seeded random subset of the test part (default: all)")
    ap.add_argument("--emulator", default=None, help="run popflow with this emulator (shipped name or folder)")
    ap.add_argument("--prior", action="append", default=None, help="'analytic' or a prior name/folder (repeatable)")
    ap.add_argument("--n-calib", type=int, default=1000, help="training galaxies for popflow calibrate")
    ap.add_argument("--walkers", type=int, default=32)
    ap.add_argument("--burn", type=int, default=400)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--thin", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    filter_path = [str(args.data / "zcosmos_bright" / "filters")]
    tables, everything = [], {}
    for name in args.datasets:
        (args.work / name).mkdir(parents=True, exist_ok=True)
        train, test, _ = load_split(name, args.data, args.work, args.seed)
        if args.n_test is not None and args.n_test < test.sizes["galaxy"]:
            rows = np.sort(np.random.default_rng(args.seed + 1).choice(test.sizes["galaxy"], args.n_test, replace=False))
            test = test.isel(galaxy=rows)
        print(f"{name}: {train.sizes['galaxy']} training, {test.sizes['galaxy']} test galaxies", flush=True)
        rows = run_peers(name, train, test, args.work, args.peers, filter_path)
        if args.emulator:
            settings = dict(n_walkers=args.walkers, n_burn=args.burn, n_draws=args.draws, thin=args.thin)
            rows |= run_popflow(name, train, test, args.work, args.emulator, args.prior or ["analytic"], args.n_calib, args.seed, settings)
        everything[name] = rows
        tables.append(table(name, train.sizes["galaxy"], test.sizes["galaxy"], rows))
        print(tables[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(tables))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
