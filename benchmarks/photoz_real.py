"""Photo-z accuracy on real catalogues: popflow side by side with RAIL's BPZ, kNN and FlexZBoost.

For each data set (``../shared/data``; see its README):

- zcosmos: zCOSMOS-bright public CSV, 10 bands; secure redshifts only (cc in 3.x, 4.x, 13.x,
  14.x, 23.x, 24.x; zpec > 0.01), split 50/50 into training and test with a seeded permutation;
- sdss: SDSS MGS, the files' own SDSS_MGS.train / SDSS_MGS.test split (ugriz);
- dc2: RAIL cosmoDC2 test files, training_9816 / validation_9816 (LSST ugrizy).

Catalogues are ingested with popflow's band sets. The test subset (``--n-test``, seeded) is drawn
from test galaxies with at least 3 usable bands, and every method is scored on exactly those
galaxies (fluxes turned back into magnitudes for the peers). The peers train on the whole
training part (their metrics are cached per data set and test subset in ``--work``). popflow,
with the data set's shipped emulator, runs in two variants:

- "as shipped": unit zero points, the emulator's measured error floor, AnalyticPrior (uniform z);
- "calibrated": ``popflow.calibrate.calibrate`` on ``--n-calib`` training galaxies (zero points
  and floors at z_spec; with ``--rest-frame`` also a rest-frame correction of the model SEDs), and the AnalyticPrior with an n(z) fitted to the training redshifts
  (:func:`popflow.calibrate.nz_from_redshifts`; the peers train on the same redshifts);
- "population": the calibrated data model and a population prior learned from the training part
  (:func:`population_prior`: popflow's fits of ``--n-pop`` training galaxies under the calibrated
  variant's prior, a diffusion prior trained on their pooled draws, and its distilled flow, the
  diffusion prior's fast path, in the fit);
- "specz_population": the same, but the training galaxies are fitted at their spectroscopic
  redshifts (``fit_catalog(known_redshift="z_spec")``), so the prior learns the joint distribution
  of redshift and SED parameters of the population from the same spectroscopic sample the
  machine-learning peers train on (pop-cosmos learns it from deep many-band photometry instead).

The per-band diagnostics (data errors, emulator error, zero points, floors) are printed with
each table. Timings per galaxy are wall-clock on this machine; popflow's include the JIT compile.

    python benchmarks/photoz_real.py --datasets zcosmos sdss dc2 --work /tmp/popflow-bench \
        --n-test 400 --popflow [--markdown out.md] [--json out.json]

Prints one markdown section per data set (and writes them to ``--markdown``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from popflow import metrics  # noqa: E402
from popflow.datamodel import LOG_FLOOR_PER_MAG  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SECURE_CLASSES = (3, 4, 13, 14, 23, 24)
MIN_BANDS = 3  # test galaxies need this many usable bands (a few zCOSMOS rows have none)

DATASETS = {
    "zcosmos": dict(emulator="zcosmos_bright", bandset="zcosmos_bright", ref_band="i", files=("zcosmos_bright/zcosmos_bright_public.csv",), z_grid=(0.0, 2.0, 401),
                    filter_path="zcosmos_bright/filters"),
    "sdss": dict(emulator="sdss", bandset="sdss_mgs", ref_band="r", files=("sdss_mgs/SDSS_MGS.train", "sdss_mgs/SDSS_MGS.test"),
                 z_grid=(0.0, 0.6, 601)),  # dz = 0.001: the MGS scatter is below RAIL's default 0.01 grid step
    "dc2": dict(emulator="lsst", bandset="rail_dc2", ref_band="i", files=("rail_dc2/test_dc2_training_9816.hdf5", "rail_dc2/test_dc2_validation_9816.hdf5"), z_grid=(0.0, 3.0, 301)),
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
    """Train the peers on ``train``, score them on ``test``; cached per test subset in work/name."""
    from popflow.filters import load_filter

    cfg = DATASETS[name]
    bands = list(train.attrs["bands"])
    ftr, etr, mtr, ztr = arrays(train)
    fte, ete, mte, zte = arrays(test)
    ids = np.asarray(test["galaxy_id"].values)
    cache = work / name / f"peers_{hashlib.sha256(ids.tobytes() + str(train.sizes['galaxy']).encode()).hexdigest()[:12]}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    tr = (*peers.catalog_to_mags(ftr, etr, mtr), ztr)
    te = peers.catalog_to_mags(fte, ete, mte)
    out = {}
    wd = work / name
    zg = np.linspace(*cfg["z_grid"][:2], cfg["z_grid"][2])
    if "bpz" in methods and not any(k.startswith("BPZ") for k in done):
        names = [f"pf_{name}_{b}" for b in bands]
        flts = {n: load_filter(f, search_path=filter_path) for n, f in zip(names, train.attrs["filters"])}
        data_dir = peers.bpz_data_dir(work, flts)  # one folder for all data sets: desc_bpz reads BPZDATAPATH once
        mmin = 12.0 if name == "sdss" else 16.0
        for label, res in peers.run_bpz(bands, cfg["ref_band"], names, tr, te, wd, data_dir, mmin=mmin, z_grid=zg).items():
            out[f"BPZ (RAIL, COSMOS templates, {label})"] = res
    if "knn" in methods and "kNN (RAIL sklearn)" not in done:
        out["kNN (RAIL sklearn)"] = peers.run_knn(bands, cfg["ref_band"], tr, te, wd, z_grid=zg)
    if "fzb" in methods and "FlexZBoost (RAIL)" not in done:
        out["FlexZBoost (RAIL)"] = peers.run_flexzboost(bands, cfg["ref_band"], tr, te, wd, z_grid=zg)
    done |= {k: evaluate(v, zte) | ({"zp_offsets_mag": v["zp_offsets_mag"]} if "zp_offsets_mag" in v else {}) for k, v in out.items()}
    cache.write_text(json.dumps(done, indent=1, default=float))
    return {k: v for k, v in done.items() if (k.startswith("BPZ") and "bpz" in methods) or (k.startswith("kNN") and "knn" in methods)
            or (k.startswith("Flex") and "fzb" in methods)}


VARIANTS = ("shipped", "calibrated", "population", "specz_population")
Z_BANDWIDTH = 0.01  # (1 + z): kernel width given to the known redshifts of a spectroscopic population prior


def population_prior(name, train, wd: Path, datamodel, base_prior, settings: dict, seed: int, n_pop: int,
                     known_redshift: bool = False, em_steps: int = 1, log=print):
    """A population prior learned from ``n_pop`` training galaxies; returns (flow prior, seconds to build).

    The galaxies are fitted by popflow under ``base_prior``; their pooled posterior draws are one EM step from
    ``base_prior`` toward the population's distribution (the mean of the posteriors is the EM update of a free-form
    population density). With ``known_redshift`` they are fitted at their spectroscopic redshifts, and each draw's
    redshift gets a Gaussian kernel of ``Z_BANDWIDTH (1 + z)`` (:func:`popflow.priors.samples.smooth_redshift`).
    A diffusion prior is trained on them and distilled into a flow, the diffusion prior's fast
    path. ``em_steps`` > 1 takes further EM steps without refitting: each galaxy's draws are importance-resampled
    to its posterior under the last flow (:func:`popflow.reweight.resample_draws`), pooled, and a new
    diffusion prior and flow are trained on them; the pooled posteriors of the first step are the population
    convolved with their own width, so each step sharpens them toward the population. Every stage is cached in
    ``wd`` (the fit resumes), so a rerun costs nothing.
    """
    import jax

    from popflow.fit import FitSettings
    from popflow.pipeline import fit_catalog, open_posterior
    from popflow.priors import distill, load_prior, train_diffusion_prior
    from popflow.priors.samples import read_samples, smooth_redshift
    from popflow.reweight import PriorEvaluator, log_importance_weights, resample_draws

    kind = "specz_population" if known_redshift else "population"
    base_tag = wd / f"{kind}_{n_pop}_{seed}_{hashlib.sha256(json.dumps(datamodel.to_dict()).encode()).hexdigest()[:8]}"
    rows = np.sort(np.random.default_rng(seed + 2).choice(train.sizes["galaxy"], min(n_pop, train.sizes["galaxy"]), replace=False))
    catalog, fits = Path(f"{base_tag}_catalog.zarr"), Path(f"{base_tag}_fits.zarr")
    seconds, flow = 0.0, None
    for step in range(1, em_steps + 1):
        tag = base_tag if step == 1 else Path(f"{base_tag}_em{step}")
        flow_dir, diffusion_dir, record = Path(f"{tag}_flow"), Path(f"{tag}_diffusion"), Path(f"{tag}.json")
        if (flow_dir / "model.json").exists() and record.exists():
            flow, seconds = load_prior(flow_dir), json.loads(record.read_text())["seconds"]
            continue
        t0 = time.perf_counter()
        if step == 1:
            if not catalog.exists():
                train.isel(galaxy=rows).drop_encoding().chunk({"galaxy": 1000}).to_zarr(catalog, consolidated=False)
            fit_catalog(catalog, fits, emulator=DATASETS[name]["emulator"], prior=base_prior, datamodel=datamodel,
                        settings=FitSettings(**settings), seed=seed, workers=1, chunk_size=500, known_redshift="z_spec" if known_redshift else None,
                        progress=False, log=log)
            theta = read_samples(fits, base_prior.space)
        else:  # the draws were made under base_prior, whose density at them the store keeps
            tree = open_posterior(fits)
            draws = np.stack([tree["posterior"][n].values for n in base_prior.space.names], axis=-1)  # (G, chain, draw, dim)
            log_w = log_importance_weights(PriorEvaluator(flow)(draws), tree["sample_stats"]["log_prior"].values)
            theta = resample_draws(draws.reshape(draws.shape[0], -1, draws.shape[-1]), log_w.reshape(draws.shape[0], -1),
                                   seed=seed + 10 + step)
        if known_redshift:
            theta = smooth_redshift(theta, base_prior.space, Z_BANDWIDTH, seed=seed + 3 + 100 * (step - 1))
        log(f"population prior, EM step {step}: {len(theta)} pooled draws of {rows.size} training galaxies; training the diffusion prior")
        teacher = train_diffusion_prior(theta, base_prior.space, batch_size=2048, seed=seed, out=diffusion_dir, progress=False,
                                        source=f"pooled popflow posterior draws of {rows.size} {name} training galaxies"
                                               + (" at their spectroscopic redshifts" if known_redshift else "")
                                               + (f", EM step {step}" if step > 1 else ""))
        teacher.save(diffusion_dir)
        flow = distill(teacher, jax.random.key(seed), progress=False)
        flow.save(flow_dir)
        seconds += time.perf_counter() - t0
        record.write_text(json.dumps({"seconds": seconds, "n_galaxies": int(rows.size), "n_draws": int(len(theta)), "em_step": step,
                                      "diffusion": teacher.info, "flow": flow.info}, indent=1, default=float))
    return flow, seconds


def run_popflow(name, train, test, work, n_calib, seed, settings, variants=VARIANTS, n_pop=1000, calib_iterations=None,
                rest_frame=False, filter_path=None, emulator_floor=True, em_steps=1, floor_scale=1.0, student_t=None, tune_floors=0,
                log=print):
    """Fit the test subset in each variant (module docstring); returns (rows, diagnostics).

    ``tune_floors``: that many training galaxies outside the calibration subset set the scale of the floors
    (:func:`popflow.calibrate.tune_floor_scale`, under the calibrated variant's prior and these settings). The
    scale calibrates the width of the redshift posteriors; the population priors' training fits keep the floors
    measured at z_spec (for "specz_population" the redshifts are known, so the scale matters little there), so a
    tuned run reuses their cached priors.
    ``floor_scale`` and ``student_t`` are probes of the calibrated data model: its floors times ``floor_scale``,
    and a Student-t likelihood with ``student_t`` degrees of freedom instead of the Gaussian.
    """
    import dataclasses

    import jax

    from popflow.calibrate import calibrate, nz_from_redshifts, save_datamodel, tune_floor_scale
    from popflow.datamodel import DataModel
    from popflow.filters import load_filter
    from popflow.fit import FitSettings
    from popflow.pipeline import fit_catalog, load_model
    from popflow.priors import AnalyticPrior

    emu = load_model(DATASETS[name]["emulator"], "emulator").select(list(train.attrs["filters"]))
    wd = work / name
    ids = np.asarray(test["galaxy_id"].values)
    test_store = wd / f"test_subset_{hashlib.sha256(ids.tobytes()).hexdigest()[:12]}.zarr"
    if not test_store.exists():
        test.chunk({"galaxy": 1000}).to_zarr(test_store, consolidated=False)
    ftr, etr, mtr, ztr = arrays(train)
    rows = np.sort(np.random.default_rng(seed).choice(train.sizes["galaxy"], min(n_calib, train.sizes["galaxy"]), replace=False))
    iters = ("" if calib_iterations is None else f"_it{calib_iterations}") + ("_rest" if rest_frame else "") \
        + ("" if emulator_floor else "_nofloor")
    dm_path = wd / f"datamodel_{DATASETS[name]['emulator']}_{rows.size}_{seed}{iters}.json"  # cached: calibration is the slow part of a rerun
    if dm_path.exists():
        saved = json.loads(dm_path.read_text())
        dm, report, t_cal = DataModel.from_dict(saved), saved["calibration"], saved["seconds"]
    else:
        t0 = time.perf_counter()
        lam = [load_filter(f, search_path=filter_path).effective_wavelength for f in train.attrs["filters"]] if rest_frame else None
        dm, report = calibrate(jax.random.PRNGKey(seed), ftr[rows], etr[rows], mtr[rows], ztr[rows], emulator=emu,
                               prior=AnalyticPrior(space=emu.space), n_iter=calib_iterations, rest_frame=rest_frame,
                               band_wavelength=lam, emulator_floor=emulator_floor, log=log)
        t_cal = time.perf_counter() - t0
        save_datamodel(dm_path, dm, {"filters": list(train.attrs["filters"]), "calibration": report, "seconds": t_cal})
    calibrated_prior = AnalyticPrior(space=emu.space, nz=nz_from_redshifts(ztr))
    dm_at_zspec = dm  # the population priors' training fits keep the floors measured at z_spec (see the docstring)
    tuned = ""
    if tune_floors:  # floor scale from free-redshift fits of other training galaxies (popflow.calibrate.tune_floor_scale)
        tune_path = dm_path.with_name(dm_path.stem + f"_tuned{tune_floors}.json")
        if tune_path.exists():
            saved = json.loads(tune_path.read_text())
            dm, tune_report = DataModel.from_dict(saved), saved["tuning"]
        else:
            rest = np.setdiff1d(np.arange(train.sizes["galaxy"]), rows)
            rest = rest[mtr[rest].sum(axis=1) >= MIN_BANDS]
            trows = np.sort(np.random.default_rng(seed + 5).choice(rest, min(tune_floors, rest.size), replace=False))
            t0 = time.perf_counter()
            dm, tune_report = tune_floor_scale(jax.random.PRNGKey(seed + 5), ftr[trows], etr[trows], mtr[trows], ztr[trows],
                                               emulator=emu, prior=calibrated_prior, datamodel=dm, settings=FitSettings(**settings),
                                               emulator_floor=emulator_floor, log=log)
            tune_report["seconds"] = time.perf_counter() - t0
            save_datamodel(tune_path, dm, {"filters": list(train.attrs["filters"]), "calibration": report, "tuning": tune_report})
        t_cal += tune_report["seconds"]
        tuned = f"_tuned{tune_floors}"
        log(f"floor scale {tune_report['floor_scale']:.3f} from {tune_report['n_galaxies']} training galaxies")
    probe = tuned
    if floor_scale != 1.0 or student_t is not None:
        dm = dataclasses.replace(dm, error_floor=tuple(floor_scale * np.asarray(dm.error_floor)),
                                 student_t_nu=dm.student_t_nu if student_t is None else student_t)
        probe += (f"_floorx{floor_scale:g}" if floor_scale != 1.0 else "") + (f"_t{student_t:g}" if student_t is not None else "")
    em, em_tag = (f", {em_steps} EM steps", f"_em{em_steps}") if em_steps > 1 else ("", "")
    runs = {
        "shipped": lambda: ("as shipped: unit zero points, emulator floor, uniform z", DataModel.from_emulator(emu),
                            AnalyticPrior(space=emu.space), 0.0),
        "calibrated": lambda: ("calibrated zero points + floors" + ("" if emulator_floor else " (no emulator minimum)")
                               + (" + rest-frame correction" if rest_frame else "")
                               + (f", floors x {tune_report['floor_scale']:.2f} tuned on {tune_report['n_galaxies']} training fits" if tune_floors else "")
                               + (f", floors x {floor_scale:g}" if floor_scale != 1.0 else "")
                               + (f", Student-t nu {student_t:g}" if student_t is not None else "")
                               + ", training n(z)", dm, calibrated_prior, t_cal),
        "population": lambda: (f"calibrated + population prior from {n_pop} training fits{em}", dm,
                               *population_prior(name, train, wd, dm_at_zspec, calibrated_prior, settings, seed, n_pop,
                                                 em_steps=em_steps, log=log)),
        "specz_population": lambda: (f"calibrated + population prior from {n_pop} training fits at z_spec{em}", dm,
                                     *population_prior(name, train, wd, dm_at_zspec, calibrated_prior, settings, seed, n_pop,
                                                       known_redshift=True, em_steps=em_steps, log=log)),
    }
    out = {}
    for v in variants:
        i = VARIANTS.index(v)
        label, datamodel, prior, t_train = runs[v]()
        post = wd / f"posterior_{i}{iters}{probe}{em_tag if 'population' in v else ''}.zarr"
        r = fit_catalog(test_store, post, emulator=DATASETS[name]["emulator"], prior=prior, datamodel=datamodel, settings=FitSettings(**settings),
                        seed=seed, workers=1, overwrite=True, progress=False, log=log)
        m = metrics.evaluate_posterior(post, catalog=test_store, out_dir=wd / f"plots_{i}")
        m.pop("plots", None)
        m["s_per_galaxy"] = r["seconds"] / max(r["n_galaxies"], 1)
        m["train_s"] = t_train
        out[f"popflow ({label})"] = m
    fte, ete, mte, _ = arrays(test)
    det = mte & (fte > 0)
    diag = {"bands": list(train.attrs["bands"]),
            "data_err_mag": np.nanmedian(np.where(det, 1.0857 * ete / np.where(det, fte, 1.0), np.nan), axis=0).tolist(),
            "emulator_err_mag": np.asarray(emu.error_floor, np.float64).tolist(),
            "zero_point_mag": report["zero_point_mag"],
            "floor_mag": (np.asarray(dm.error_floor) / LOG_FLOOR_PER_MAG).tolist(),
            "residual_nmad_no_floor": report["residual_nmad_no_floor"],
            "n_calib": int(rows.size)}
    return out, diag


def by_redshift(posterior, catalog, edges) -> str:
    """Markdown rows of popflow's point metrics in z_spec bins (median of the redshift draws)."""
    import xarray as xr

    from popflow.catalog import open_catalog

    z = xr.open_datatree(posterior, engine="zarr", consolidated=False)["posterior"]["redshift"]
    draws = np.asarray(z.values, np.float64).reshape(z.sizes["galaxy"], -1)
    zs = np.asarray(open_catalog(catalog)["z_spec"].values, np.float64)
    zp = np.median(draws, axis=1)
    out = "| z_spec bin | n | sigma_NMAD | bias | outliers >0.15 |\n|---|---|---|---|---|\n"
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (zs >= lo) & (zs < hi)
        if sel.sum() >= 5:
            m = metrics.photoz_metrics(zp[sel], zs[sel])
            out += f"| {lo:g}-{hi:g} | {int(m['n'])} | {m['sigma_nmad']:.4f} | {m['bias']:+.4f} | {100 * m['outlier_frac']:.1f}% |\n"
    return out


def diagnostics_table(diag: dict) -> str:
    """Per band: median data error, emulator error (p68), calibrated zero point and floor, all in mag."""
    head = ("| band | " + " | ".join(diag["bands"]) + " |\n|---|" + "---|" * len(diag["bands"]) + "\n")
    rows = [("median data error [mag]", "data_err_mag", "{:.3f}"), ("emulator error (p68) [mag]", "emulator_err_mag", "{:.3f}"),
            ("zero point [mag] (model x 10^(-0.4 zp))", "zero_point_mag", "{:+.3f}"), ("error floor [mag]", "floor_mag", "{:.3f}"),
            ("residual NMAD / error, no floor", "residual_nmad_no_floor", "{:.1f}")]
    return head + "\n".join(f"| {label} | " + " | ".join(fmt.format(v) for v in diag[key]) + " |" for label, key, fmt in rows) + "\n"


def table(name: str, n_train: int, n_test: int, rows: dict, note: str = "") -> str:
    head = (f"### {name}: {n_train} training / {n_test} test galaxies\n\n{note}"
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
    ap.add_argument("--popflow", action="store_true", help="also run popflow (as shipped and calibrated)")
    ap.add_argument("--n-calib", type=int, default=400, help="training galaxies for popflow calibrate")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="popflow runs (module docstring)")
    ap.add_argument("--n-pop", type=int, default=1000, help="training galaxies fitted for the population prior")
    ap.add_argument("--pop-em-steps", type=int, default=1, help="EM steps of the population prior (population_prior)")
    ap.add_argument("--calib-iterations", type=int, default=None, help="calibrate's n_iter (default: its own, 2 for the median method)")
    ap.add_argument("--rest-frame", action="store_true", help="calibrate a rest-frame correction with the zero points")
    ap.add_argument("--no-emulator-floor", action="store_true", help="let the calibrated floors go below the emulator's")
    ap.add_argument("--tune-floors", type=int, default=0,
                    help="scale the calibrated floors on free-redshift fits of this many other training galaxies")
    ap.add_argument("--floor-scale", type=float, default=1.0, help="probe: multiply the calibrated floors by this")
    ap.add_argument("--student-t", type=float, default=None, help="probe: Student-t likelihood with these degrees of freedom")
    ap.add_argument("--walkers", type=int, default=32)
    ap.add_argument("--burn", type=int, default=400)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--thin", type=int, default=8)
    ap.add_argument("--init", default="top", help="FitSettings.init")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    filter_path = [str(args.data / "zcosmos_bright" / "filters")]
    settings = dict(n_walkers=args.walkers, n_burn=args.burn, burn_stages=2, n_draws=args.draws, thin=args.thin, init=args.init)
    tables, everything = [], {}
    for name in args.datasets:
        (args.work / name).mkdir(parents=True, exist_ok=True)
        train, test, _ = load_split(name, args.data, args.work, args.seed)
        ok = np.flatnonzero(np.asarray(test["mask"].values).sum(axis=1) >= MIN_BANDS)
        if args.n_test is not None and args.n_test < ok.size:
            ok = np.sort(np.random.default_rng(args.seed + 1).choice(ok, args.n_test, replace=False))
        test = test.isel(galaxy=ok)
        print(f"{name}: {train.sizes['galaxy']} training, {test.sizes['galaxy']} test galaxies", flush=True)
        rows = run_peers(name, train, test, args.work, args.peers, filter_path)
        note = ""
        if args.popflow:
            pf, diag = run_popflow(name, train, test, args.work, args.n_calib, args.seed, settings, args.variants, args.n_pop,
                                   args.calib_iterations, args.rest_frame, filter_path, not args.no_emulator_floor,
                                   args.pop_em_steps, args.floor_scale, args.student_t, args.tune_floors)
            rows |= pf
            note = (f"popflow: emulator `{DATASETS[name]['emulator']}`, AnalyticPrior, FitSettings({', '.join(f'{k}={v}' for k, v in settings.items())}), "
                    f"calibrated on {diag['n_calib']} training galaxies; point estimate = median of the redshift draws.\n\n")
            note += diagnostics_table(diag) + "\n"
            everything[f"{name}_diagnostics"] = diag
        everything[name] = rows
        tables.append(table(name, train.sizes["galaxy"], test.sizes["galaxy"], rows, note))
        print(tables[-1], flush=True)
        if args.markdown:
            args.markdown.write_text("\n".join(tables))
        if args.json:
            args.json.write_text(json.dumps(everything, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
