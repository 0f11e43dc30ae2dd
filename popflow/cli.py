"""The ``popflow`` command.

Each sub-command's options are declared here; the work is done by one
``_cmd_<name>`` handler that calls the library (imports are lazy so that
``popflow --help`` is instant).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from popflow.demo import run_demo

    return run_demo(workdir=args.workdir, workers=args.workers, threads=args.threads, n_galaxies=args.n_galaxies)


def _cmd_ingest(args) -> int:
    from popflow.catalog import ingest

    try:
        out = ingest(args.table, bands=args.bands, out=args.out, id_column=args.id_column,
                     chunk_size=args.chunk_size, overwrite=args.overwrite, filter_path=args.filter_path,
                     extra_columns=args.extra)
    except (ValueError, OSError) as err:  # validation and file errors: the message names file, column, row
        print(f"popflow ingest: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (describe it with: popflow info {out})")
    return 0


def _cmd_sps_simulate(args) -> int:
    from popflow.sps.generate import simulate

    out = simulate(args.out, args.n, seed=args.seed, workers=args.workers, chunk_size=args.chunk_size,
                   proposal=args.proposal, uniform_fraction=args.uniform_fraction, z_max=args.z_max,
                   filters=args.filters.split(",") if args.filters else None,
                   band_sets=args.band_sets.split(",") if args.band_sets else None,
                   search_path=args.filter_path, validation_fraction=args.validation_fraction,
                   overwrite=args.overwrite, max_chunks=args.max_chunks, progress=not args.no_progress)
    print(f"popflow sps simulate: wrote {out}")
    return 0


def _cmd_emulator_train(args) -> int:
    from popflow.emulator.train import TrainConfig, train_from_store

    cfg = TrainConfig(design=args.design, hidden=tuple(int(h) for h in args.hidden.split(",")), target=args.target,
                      steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)
    command = (f"popflow emulator train {args.store} --bands {args.bands} --out {args.out}"
               + (f" --validation {args.validation}" if args.validation else "")
               + f" --design {args.design} --hidden {args.hidden} --target {args.target} --steps {args.steps}"
               f" --batch-size {args.batch_size} --learning-rate {args.learning_rate} --seed {args.seed}")
    train_from_store(args.store, args.bands.split(","), args.out, cfg, validation=args.validation, resume=args.resume,
                     max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes, command=command)
    return 0


def _cmd_sps_spectra(args) -> int:
    from popflow.sps.spectra import simulate_spectra

    out = simulate_spectra(args.out, args.n, seed=args.seed, chunk_size=args.chunk_size, proposal=args.proposal,
                           workers=args.workers, max_chunks=args.max_chunks, search_path=args.filter_path,
                           progress=not args.no_progress)
    print(f"popflow sps spectra: wrote {out}")
    return 0


def _cmd_emulator_train_spectral(args) -> int:
    from popflow.emulator.train_spectral import SpectralConfig, package_spectral, train_from_spectra

    cfg = SpectralConfig(n_pca=args.n_pca, steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed)
    command = (f"popflow emulator train-spectral {args.store} --out {args.out} --steps {args.steps} "
               f"--n-pca {args.n_pca} --batch-size {args.batch_size} --learning-rate {args.learning_rate} "
               f"--seed {args.seed} --finetune-steps {args.finetune_steps}"
               + (f" --validation {args.validation}" if args.validation else ""))
    finished = train_from_spectra(args.store, args.out, cfg, resume=args.resume, finetune_steps=args.finetune_steps,
                                  search_path=args.filter_path,
                                  max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes)
    if not finished:
        print("popflow emulator train-spectral: stopped at the time limit; continue with --resume")
        return 0
    package_spectral(args.out, args.store, Path(args.out) / "emulator", validation=args.validation,
                     search_path=args.filter_path, command=command)
    return 0


def _cmd_emulator_evaluate(args) -> int:
    from popflow.emulator import Emulator
    from popflow.emulator.train import describe_accuracy, set_prior_accuracy

    emu = Emulator.load(args.emulator)
    set_prior_accuracy(emu, args.validation)
    emu.meta.setdefault("training", {})["evaluate_command"] = (
        f"popflow emulator evaluate {args.emulator} --validation {args.validation}")
    print(describe_accuracy(emu))
    print(f"updated {args.emulator}: id {emu.save(args.emulator)}")
    return 0


def _cmd_emulator_select(args) -> int:
    from popflow.emulator import Emulator

    emu = Emulator.load(args.emulator)
    filters = emu.meta.get("band_sets", {}).get(args.bands)
    if filters is None:
        raise SystemExit(f"popflow emulator select: {args.emulator} has no band set {args.bands!r}; "
                         f"it has {', '.join(emu.meta.get('band_sets', {}))}")
    sub = emu.select(filters)
    from popflow.emulator.train import band_names

    sub.meta["bands"] = band_names(args.bands, list(filters))
    sub.bands = tuple(sub.meta["bands"])
    sub.meta["name"] = args.bands
    sub.meta["band_sets"] = {args.bands: list(filters)}
    sub.meta["reproduce"] = [c for c in (emu.meta.get("training", {}).get("data_command"),
                                         emu.meta.get("training", {}).get("command"),
                                         emu.meta.get("training", {}).get("evaluate_command")) if c] + [
                             f"popflow emulator select {args.emulator} --bands {args.bands} --out {args.out}"]
    print(f"wrote {args.bands} emulator {sub.save(args.out)} ({len(filters)} bands) to {args.out}")
    return 0


def _cmd_fit(args) -> int:
    from popflow.fit import FitSettings
    from popflow.pipeline import StoreLockedError, StoreMismatchError, fit_catalog

    given = {"n_walkers": args.walkers, "n_burn": args.burn, "n_draws": args.draws, "thin": args.thin,
             "init": args.init, "n_init": args.n_init}
    if args.refit_below_ess is not None:
        return _refit_below_ess(args)
    try:
        datamodel = None if args.datamodel is None else _load_datamodel_arg(args.datamodel, args.catalog)
        fit_catalog(args.catalog, args.out, emulator=args.emulator, prior=args.prior, datamodel=datamodel,
                    settings=FitSettings(**{k: v for k, v in given.items() if v is not None}), seed=args.seed,
                    chunk_size=args.chunk_size, limit=args.limit, scheduler=args.scheduler, workers=args.workers,
                    threads=args.threads, overwrite=args.overwrite, known_redshift=args.known_redshift,
                    progress=not args.no_progress)
    except (StoreLockedError, StoreMismatchError, FileNotFoundError, ValueError) as err:
        print(f"popflow fit: error: {err}", file=sys.stderr)
        return 2
    return 0


def _load_datamodel_arg(path, catalog):
    """``--datamodel``: a data-model JSON, or a folder holding ``datamodel.json``; checked against the catalogue's filters."""
    from pathlib import Path

    from popflow.calibrate import load_datamodel
    from popflow.catalog import open_catalog

    path = Path(path)
    if path.is_dir():
        path = path / "datamodel.json"
    if not path.is_file():
        raise FileNotFoundError(f"--datamodel: no data-model JSON at {path}")
    return load_datamodel(path, filters=list(open_catalog(catalog).attrs["filters"]))


def _refit_below_ess(args) -> int:
    """``popflow fit --refit-below-ess N --prior NEW``: reweight the existing store, re-fit only its low-ESS galaxies."""
    from popflow.pipeline import StoreLockedError, load_model
    from popflow.reweight import refit_low_ess

    if args.prior is None:
        print("popflow fit: error: --refit-below-ess needs --prior (the new prior to reweight and re-fit to)", file=sys.stderr)
        return 2
    try:
        r = refit_low_ess(args.out, args.catalog, load_model(args.prior, "prior"), args.refit_below_ess,
                          emulator=args.emulator, progress=not args.no_progress)
    except (StoreLockedError, ValueError, KeyError, FileNotFoundError) as err:
        print(f"popflow fit: error: {err}", file=sys.stderr)
        return 2
    print(f"popflow fit: re-fitted {r['n_refitted']} galaxies with ESS < {args.refit_below_ess} in {r['seconds']:.1f} s "
          f"(draws in {args.out}/refit/<prior_id>, marked in /weights/<prior_id>/refitted)")
    return 0


def _cmd_reweight(args) -> int:
    from popflow.pipeline import StoreLockedError, load_model
    from popflow.reweight import materialize_weights

    try:
        prior = load_model(args.prior, "prior")
        r = materialize_weights(args.posterior, prior, progress=not args.no_progress)
    except (StoreLockedError, ValueError, KeyError, FileNotFoundError) as err:
        print(f"popflow reweight: error: {err}", file=sys.stderr)
        return 2
    print(f"popflow reweight: {args.posterior}/{r['group']} complete ({r['n_chunks']} chunks, {r['chunks_done_now']} "
          f"computed now); median ESS {r['ess_median']:.1f}, k-hat <= 0.7 for {100 * r['frac_khat_ok']:.1f}% of galaxies; "
          f"open it with popflow.open_posterior({str(args.posterior)!r}, prior=...)")
    return 0


def _cmd_evaluate(args) -> int:
    import json

    from popflow.metrics import evaluate_posterior, format_metrics

    try:
        m = evaluate_posterior(args.posterior, truth=args.truth, catalog=args.catalog, prior=args.prior,
                               out_dir=args.plots, point=args.point, z_min=args.z_min)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"popflow evaluate: error: {err}", file=sys.stderr)
        return 2
    plots = m.pop("plots", [])
    print(f"popflow evaluate: {args.posterior} against {args.truth} ({args.point} of the redshift draws)")
    print(format_metrics(m))
    for path in plots:
        print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(m, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def _cmd_calibrate(args) -> int:
    from pathlib import Path

    from popflow.calibrate import calibrate_catalog, save_datamodel

    try:
        dm, meta = calibrate_catalog(args.catalog, emulator=args.emulator, prior=args.prior, z_var=args.truth,
                                     z_min=args.z_min, max_galaxies=args.max_galaxies, seed=args.seed, method=args.method,
                                     n_iter=args.iterations, emulator_floor=not args.no_emulator_floor,
                                     rest_frame=args.rest_frame, filter_path=args.filter_path or None,
                                     tune_floors=args.tune_floors)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"popflow calibrate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / "datamodel.json"
    save_datamodel(out, dm, meta)
    zp_mag = meta["calibration"]["zero_point_mag"]
    print("band  zero point [mag]  error floor")
    for b, z, f in zip(meta["bands"], zp_mag, dm.error_floor):
        print(f"{b:>4s}  {z:+16.4f}  {f:11.4f}")
    tuning = meta["calibration"].get("floor_tuning")
    if tuning is not None:
        print(f"floors scaled by {tuning['floor_scale']:.3f} on {tuning['n_galaxies']} galaxies"
              + ("" if tuning["bracketed"] else " (the 68% coverage was not reached: the last scale tried)"))
    print(f"wrote {out} (use it with: popflow fit ... --datamodel {out})")
    return 0


def _cmd_info(args) -> int:
    from popflow.catalog import describe_store

    try:
        print(describe_store(args.store))
    except (ValueError, OSError) as err:
        print(f"popflow info: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_prior_train(args) -> int:
    from popflow.params import DEFAULT_SPACE
    from popflow.priors import distill, train_diffusion_prior
    from popflow.priors.diffusion import SDE
    from popflow.priors.samples import read_samples, smooth_redshift

    theta = read_samples(args.samples, DEFAULT_SPACE, max_samples=args.max_samples, seed=args.seed)
    if args.redshift_bandwidth:
        theta = smooth_redshift(theta, DEFAULT_SPACE, args.redshift_bandwidth, seed=args.seed)
    print(f"popflow prior train: {len(theta)} samples from {args.samples}")
    prior = train_diffusion_prior(theta, DEFAULT_SPACE, sde=SDE(args.sde, beta_max=args.beta_max), width=args.width,
                                  depth=args.depth, steps=args.steps,
                                  batch_size=args.batch_size, learning_rate=args.learning_rate, t_sampling=args.t_sampling,
                                  seed=args.seed, out=args.out, source=f"{len(theta)} samples from {args.samples}",
                                  solver=dict(solver="heun", n_steps=args.n_steps))
    print(f"wrote diffusion prior {prior.save(args.out)} to {args.out} "
          f"(held-out loss {prior.info['training']['val_loss_initial']:.4f} -> {prior.info['training']['val_loss']:.4f})")
    if args.distill:
        import jax

        flow = distill(prior, jax.random.key(args.seed), n_samples=args.distill_samples, steps=args.distill_steps)
        print(f"wrote distilled flow prior {flow.save(args.distill)} to {args.distill} (fidelity {flow.info['fidelity']})")
    return 0


def _add_simulation_args(q) -> None:
    """The arguments every bagpipes store generator takes."""
    q.add_argument("--n", type=int, required=True, help="number of models")
    q.add_argument("--out", required=True, help="output store (.zarr); an existing one with the same settings is resumed")
    q.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    q.add_argument("--workers", type=int, default=1, help="worker processes (default: 1, in this process)")
    q.add_argument("--chunk-size", type=int, default=1000, help="models per chunk (default: 1000)")


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

    p = sub.add_parser("fit", help="fit a catalogue store into a posterior store (Dask, resumable)")
    p.add_argument("catalog", help="catalogue store written by `popflow ingest`")
    p.add_argument("--out", required=True, help="posterior store (.zarr); an existing one is resumed")
    p.add_argument("--emulator", default="lsst", help="shipped emulator name, artifact folder or module:factory (default: lsst)")
    p.add_argument("--prior", default=None, help="shipped prior name, artifact folder or module:factory (default: the analytic prior)")
    p.add_argument("--seed", type=int, default=0, help="chunk i is fitted with fold_in(PRNGKey(seed), i) (default: 0)")
    p.add_argument("--chunk-size", type=int, default=None, help="galaxies per task and store chunk (default: the catalogue's, capped near 256 MiB of draws)")
    p.add_argument("--limit", type=int, default=None, help="fit only the first N galaxies")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="use a running Dask scheduler (tcp://host:port) instead of a local cluster")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: 1; one per GPU when JAX sees GPUs)")
    p.add_argument("--threads", type=int, default=None, help="XLA/BLAS threads per local worker (default: cores / workers)")
    p.add_argument("--walkers", type=int, default=None, help="walkers (chains) per galaxy")
    p.add_argument("--burn", type=int, default=None, help="burn-in steps")
    p.add_argument("--draws", type=int, default=None, help="draws kept per walker")
    p.add_argument("--thin", type=int, default=None, help="steps between kept draws")
    p.add_argument("--datamodel", default=None, metavar="DIR_OR_JSON",
                   help="zero points and error floors from `popflow calibrate` (a JSON, or a folder with datamodel.json); "
                        "default: unit zero points and the emulator's error floor")
    p.add_argument("--init", default=None, help="walker initialisation: laplace or top (popflow.fit.INIT_STRATEGIES)")
    p.add_argument("--n-init", type=int, default=None, help="prior candidates for the initialisation")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store made with other inputs")
    p.add_argument("--known-redshift", default=None, metavar="VAR",
                   help="catalogue variable of known redshifts (e.g. z_spec): fit those galaxies at it (NaN: free)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--refit-below-ess", type=float, default=None, metavar="N",
                   help="with --prior NEW on an existing store fitted under another prior: reweight it to NEW and "
                        "re-fit only the galaxies whose ESS fell below N (recorded in /weights/<prior_id>/refitted)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("reweight", help="importance-reweight a posterior store to a new prior (writes /weights/<prior_id>)")
    p.add_argument("posterior", help="posterior store written by `popflow fit`")
    p.add_argument("--prior", required=True, help="the new prior: shipped name, artifact folder or module:factory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_reweight)

    p = sub.add_parser("evaluate", help="photo-z metrics and plots of a posterior store against known redshifts")
    p.add_argument("posterior", help="posterior store (.zarr) written by popflow fit")
    p.add_argument("--truth", default="z_spec", help="catalogue variable with the true redshift (default: z_spec)")
    p.add_argument("--catalog", default=None, help="catalogue store holding the truth (default: the one the posterior records)")
    p.add_argument("--prior", default=None, help="evaluate the posterior importance-reweighted to this prior (name or folder)")
    p.add_argument("--point", choices=("median", "mode"), default="median", help="point estimate from the draws (default: median)")
    p.add_argument("--z-min", type=float, default=None, help="leave out galaxies with truth <= this (e.g. 0.01 for stars)")
    p.add_argument("--plots", default=".", help="folder for zphot_zspec.png and pit.png (default: current folder)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit per-band zero points and error floors on a spectroscopic subset")
    p.add_argument("catalog", help="catalogue store (.zarr) with a spectroscopic redshift variable")
    p.add_argument("--emulator", required=True, help="emulator (shipped name or artifact folder)")
    p.add_argument("--prior", default=None, help="prior (default: the analytic prior)")
    p.add_argument("--out", required=True, help="data-model JSON to write (a folder or a name without suffix: DIR/datamodel.json)")
    p.add_argument("--truth", default="z_spec", help="catalogue variable with the spectroscopic redshift (default: z_spec)")
    p.add_argument("--z-min", type=float, default=0.01, help="use galaxies with redshift above this (default: 0.01)")
    p.add_argument("--max-galaxies", type=int, default=2000, help="seeded random subset size (default: 2000)")
    p.add_argument("--method", choices=("median", "joint"), default="median",
                   help="median: all parameters free at z_spec, zero points from the median residual per band (default); "
                        "joint: zero points fitted jointly with a few SED directions")
    p.add_argument("--iterations", type=int, default=None, help="fit / floor iterations (default: 2 for median, 3 for joint)")
    p.add_argument("--no-emulator-floor", action="store_true", help="let the error floors go below the emulator's measured floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rest-frame", action="store_true",
                   help="also calibrate a rest-frame correction of the model SEDs (residuals at z_spec by rest wavelength)")
    p.add_argument("--filter-path", action="append", default=[],
                   help="folder searched for filter curve files, for --rest-frame (repeatable; also $POPFLOW_FILTER_PATH)")
    p.add_argument("--tune-floors", type=int, default=0, metavar="N",
                   help="set N other spectroscopic galaxies aside and scale the floors so that their free-redshift fits' "
                        "68%% intervals hold 68%% of their redshifts (fits under --prior: give the one you will fit with)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("info", help="describe a catalogue or posterior store")
    p.add_argument("store")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("sps", help="the offline SPS simulator (needs popflow[sps])")
    sps_sub = p.add_subparsers(dest="sps_command", required=True, metavar="SPS_COMMAND")
    q = sps_sub.add_parser("simulate", help="generate (or resume) a bagpipes training set in a Zarr store")
    _add_simulation_args(q)
    q.add_argument("--proposal", choices=("wide", "prior", "uniform"), default="wide",
                   help="wide: widened analytic prior + uniform fraction (training); prior: the analytic prior "
                        "(validation); uniform: the box (default: wide)")
    q.add_argument("--uniform-fraction", type=float, default=0.2, help="uniform share of the wide proposal (default: 0.2)")
    q.add_argument("--z-max", type=float, default=6.0, help="largest redshift (default: 6)")
    q.add_argument("--band-sets", default=None, help="comma-separated band sets (default: all shipped: lsst,sdss,cfhtls,hsc,zcosmos_bright)")
    q.add_argument("--filters", default=None, help="comma-separated filter identifiers (instead of --band-sets)")
    q.add_argument("--filter-path", action="append", default=[], help="folder searched for filter curve files (repeatable; also $POPFLOW_FILTER_PATH)")
    q.add_argument("--validation-fraction", type=float, default=0.05, help="share of models flagged is_validation (default: 0.05)")
    q.add_argument("--max-chunks", type=int, default=None, help="stop after this many new chunks (re-run to continue)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing store")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_sps_simulate)
    q = sps_sub.add_parser("spectra", help="generate (or resume) rest-frame bagpipes spectra for the spectral emulator")
    _add_simulation_args(q)
    q.add_argument("--proposal", choices=("wide", "prior", "uniform"), default="wide", help="as for simulate (default: wide)")
    q.add_argument("--filter-path", action="append", default=[], help="folder searched for filter curve files (repeatable; also $POPFLOW_FILTER_PATH)")
    q.add_argument("--max-chunks", type=int, default=None, help="stop after this many new chunks (re-run to continue)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_sps_spectra)

    p = sub.add_parser("emulator", help="train and package SPS emulators")
    em_sub = p.add_subparsers(dest="emulator_command", required=True, metavar="ACTION")
    q = em_sub.add_parser("train", help="train (or resume) an emulator on a training store; writes an artifact folder")
    q.add_argument("store", help="training store written by `popflow sps simulate`")
    q.add_argument("--bands", required=True, help="band set(s) of the store, comma-separated, or 'all' (their union)")
    q.add_argument("--out", required=True, help="output folder (artifact, checkpoint.npz, train.log)")
    q.add_argument("--validation", default=None, help="prior-drawn validation store (accuracy and error floor)")
    q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    q.add_argument("--design", default="per_band", choices=["per_band", "trunk"], help="one MLP per band, or a shared trunk")
    q.add_argument("--hidden", default="128,128,128,128", help="hidden layer widths (default: 128,128,128,128)")
    q.add_argument("--target", default="m_minus_dm", choices=["m_minus_dm", "m"], help="what the network predicts")
    q.add_argument("--steps", type=int, default=100_000, help="Adam steps (default: 100000)")
    q.add_argument("--batch-size", type=int, default=1024)
    q.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long; resume later")
    q.set_defaults(func=_cmd_emulator_train)
    q = em_sub.add_parser("train-spectral", help="train (or resume) the spectral emulator on a `popflow sps spectra` "
                          "store; when done, writes the artifact (every filter of the store) to OUT/emulator")
    q.add_argument("store", help="spectra store written by `popflow sps spectra`")
    q.add_argument("--out", required=True, help="run folder (checkpoint.npz, train.log, the artifact in emulator/)")
    q.add_argument("--validation", default=None, help="prior-drawn validation set (accuracy and error floor)")
    q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    q.add_argument("--steps", type=int, default=100_000, help="Adam steps (default: 100000)")
    q.add_argument("--n-pca", type=int, default=96, help="continuum PCA components (default: 96)")
    q.add_argument("--batch-size", type=int, default=1024)
    q.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--filter-path", action="append", default=[], help="folder searched for filter curve files (also $POPFLOW_FILTER_PATH)")
    q.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long; resume later")
    q.add_argument("--finetune-steps", type=int, default=10_000,
                   help="then fine-tune on the store's magnitudes through the photometry (default: 10000; 0: skip)")
    q.set_defaults(func=_cmd_emulator_train_spectral)
    q = em_sub.add_parser("evaluate", help="measure an emulator folder on a prior-drawn validation set; updates its "
                          "accuracy and error floor in place")
    q.add_argument("emulator", help="emulator artifact folder")
    q.add_argument("--validation", required=True, help="validation npz (tests/data/emulator_validation) or store")
    q.set_defaults(func=_cmd_emulator_evaluate)
    q = em_sub.add_parser("select", help="package one band set of a multi-band-set emulator as its own artifact")
    q.add_argument("emulator", help="emulator folder or shipped name")
    q.add_argument("--bands", required=True, help="band set name recorded in the emulator (e.g. lsst)")
    q.add_argument("--out", required=True, help="output artifact folder")
    q.set_defaults(func=_cmd_emulator_select)

    p = sub.add_parser("prior", help="train population priors")
    pr_sub = p.add_subparsers(dest="prior_command", required=True, metavar="ACTION")
    q = pr_sub.add_parser("train", help="train a diffusion prior on parameter samples; writes an artifact folder")
    q.add_argument("samples", help="(n, 14) physical samples: .npy, .npz (array 'samples'), or a posterior .zarr store (draws pooled)")
    q.add_argument("--out", required=True, help="output artifact folder (checkpointed while training)")
    q.add_argument("--steps", type=int, default=20_000, help="Adam steps (default: 20000)")
    q.add_argument("--width", type=int, default=128, help="score-net hidden width (default: 128)")
    q.add_argument("--depth", type=int, default=3, help="score-net hidden layers (default: 3)")
    q.add_argument("--batch-size", type=int, default=2048)
    q.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    q.add_argument("--sde", default="vp", choices=["vp", "subvp"])
    q.add_argument("--beta-max", type=float, default=10.0, help="SDE beta(t = 1) (default: 10; 20 before 2026-12-02)")
    q.add_argument("--t-sampling", default="uniform", choices=["uniform", "likelihood"],
                   help="diffusion-time sampling of the loss: uniform (weighting std^2, default) or likelihood (g^2)")
    q.add_argument("--n-steps", type=int, default=16, help="Heun steps of the stored log-density solver (default: 16)")
    q.add_argument("--max-samples", type=int, default=None, help="train on a random subset of this many samples")
    q.add_argument("--redshift-bandwidth", type=float, default=0.0, metavar="DZ",
                   help="Gaussian kernel of DZ (1 + z) on each redshift, for draws fitted at known redshifts (e.g. 0.01)")
    q.add_argument("--distill", default=None, metavar="DIR", help="also distil a fast flow prior into DIR")
    q.add_argument("--distill-samples", type=int, default=200_000, help="teacher draws for the flow (default: 200000)")
    q.add_argument("--distill-steps", type=int, default=5000, help="flow training steps (default: 5000)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_prior_train)

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
