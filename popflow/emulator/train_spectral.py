"""Training of the spectral emulator (design b of issue 7) on a spectra store.

:func:`fit_pca` builds the continuum basis; :func:`train_spectral` fits the two
Speculator MLPs (continuum PCA coefficients; line log-luminosities relative to the
youngest SFH bin's mass, :func:`popflow.emulator.spectral.spectral_inputs`) jointly
with optax Adam (warm-up + cosine decay) on the summed mean squared error in dex:
``mean_k (log10 L_k - pred)^2`` over the continuum pixels (= the squared PCA
coefficient error / n_pix, the basis being orthonormal) plus the same over the
lines, where prediction and target are both raised to ``line_floor`` first (a line
fainter than that is invisible in any band, so how faint does not matter). Every
``checkpoint_every`` seconds it writes ``checkpoint.npz`` and a line of
``train.log``; ``resume=True`` continues a stopped run. :func:`package_spectral`
turns a finished run into an emulator artifact.

    popflow emulator train-spectral STORE.zarr --out DIR [--steps N] [--n-pca K] [--resume]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from popflow.emulator.network import init_mlp, mlp_apply
from popflow.emulator.spectral import Z_MAX, SpectralEmulator, spectral_inputs
from popflow.params import DEFAULT_SPACE

__all__ = ["SpectralConfig", "fit_pca", "train_spectral", "train_from_spectra", "finetune_photometry", "spectral_arrays",
           "package_spectral",
           "load_run"]

CHECKPOINT = "checkpoint.npz"
LOG = "train.log"


@dataclass(frozen=True)
class SpectralConfig:
    """Hyper-parameters of one run (stored in the checkpoint and ``config.json``)."""

    n_pca: int = 96
    cont_floor: float = -16.0  # log10 Lsun/A: targets clipped here (unit-mass m - DM > 30 below: no visible flux)
    line_floor: float = -14.0  # log10 Lsun: the same for lines (a line spread over a ~1000 A band)
    cont_hidden: tuple[int, ...] = (256, 256, 256, 256)
    line_hidden: tuple[int, ...] = (128, 128, 128)
    steps: int = 20_000
    batch_size: int = 512
    learning_rate: float = 2e-3
    final_learning_rate: float = 1e-5
    warmup_steps: int = 500  # capped at steps // 10
    heldout_fraction: float = 0.05
    seed: int = 0
    steps_per_call: int = 100
    checkpoint_every: float = 120.0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def fit_pca(log_cont: np.ndarray, n_pca: int, max_rows: int = 20_000, seed: int = 0):
    """PCA of log spectra (n, n_pix): (mean (n_pix,), basis (n_pca, n_pix) orthonormal rows), float32."""
    rng = np.random.default_rng(seed)
    rows = log_cont if len(log_cont) <= max_rows else log_cont[rng.choice(len(log_cont), max_rows, replace=False)]
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(np.asarray(rows - mean, np.float64), full_matrices=False)
    return mean.astype(np.float32), vt[:n_pca].astype(np.float32)


def _split(n: int, cfg: SpectralConfig):
    """(train, held-out) row indices: the same split as popflow.emulator.train for the same n and seed."""
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_held = max(1, int(round(cfg.heldout_fraction * n)))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def train_spectral(theta, log_cont, log_lines, grid: dict, out_dir, cfg: SpectralConfig = SpectralConfig(), *,
                   resume: bool = False, max_seconds: float | None = None, log=print) -> SpectralEmulator:
    """Train on rest-frame pieces (``theta`` (n, dim), ``log_cont`` (n, n_pix), ``log_lines`` (n, n_lines))
    and return the emulator with the best held-out weights (also saved as ``out_dir/weights.npz``).

    Continuum targets are clipped below at ``cfg.cont_floor`` and lines compared above
    ``cfg.line_floor`` only (no visible flux there), which removes the up-to-12-dex drops of
    fully obscured pixels and lines from the regression."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, log_young = (np.asarray(a, np.float32) for a in spectral_inputs(DEFAULT_SPACE, theta))
    log_cont = np.maximum(log_cont, cfg.cont_floor)
    log_lines = np.asarray(log_lines, np.float32)
    i_tr, i_ho = _split(len(x), cfg)
    pca_mean, basis = fit_pca(log_cont[i_tr], cfg.n_pca, seed=cfg.seed)
    coeff = (log_cont - pca_mean) @ basis.T
    # lines relative to the young stars' mass (spectral_inputs); statistics over visible lines only
    resid = np.ma.masked_array(log_lines - log_young[:, None], log_lines <= cfg.line_floor)[i_tr]
    stats = {"x_mean": x[i_tr].mean(0), "x_std": x[i_tr].std(0) + 1e-6, "c_mean": coeff[i_tr].mean(0),
             "c_std": coeff[i_tr].std(0) + 1e-6, "l_mean": resid.mean(0).filled(0.0).astype(np.float32),
             "l_std": (resid.std(0).filled(1.0) + 1e-3).astype(np.float32), "pca_mean": pca_mean, "pca_basis": basis}
    pca_resid = log_cont[i_ho] - (pca_mean + coeff[i_ho] @ basis)
    log(f"PCA {cfg.n_pca} components: held-out rms log-spectrum residual {np.sqrt(np.mean(pca_resid**2)):.2e} dex, "
        f"max {np.abs(pca_resid).max():.2e}")
    xs = jnp.asarray((x - stats["x_mean"]) / stats["x_std"])
    cs = jnp.asarray((coeff - stats["c_mean"]) / stats["c_std"])
    ls = jnp.asarray(np.maximum(log_lines, cfg.line_floor))
    base = jnp.asarray(log_young[:, None] + stats["l_mean"])
    c_w = jnp.asarray(stats["c_std"] ** 2 / log_cont.shape[1])  # standardised coefficient error -> dex^2 per pixel
    l_std = jnp.asarray(stats["l_std"])
    n_lines = log_lines.shape[1]
    k1, k2 = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = {"cont": init_mlp(k1, x.shape[1], cfg.cont_hidden, cfg.n_pca, 1),
              "lines": init_mlp(k2, x.shape[1], cfg.line_hidden, log_lines.shape[1], 1)}
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.steps // 10), cfg.steps,
                                               end_value=cfg.final_learning_rate)
    opt = optax.adam(sched)
    opt_state = opt.init(params)
    step, best, best_params, history = 0, np.inf, params, []
    ckpt = out_dir / CHECKPOINT
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    if resume and ckpt.is_file():
        with np.load(ckpt) as z:
            if str(z["config"]) != cfg_json:
                raise ValueError(f"{ckpt}: written with a different configuration; cannot resume")
            leaves = lambda tag, tree: jax.tree.unflatten(jax.tree.structure(tree),  # noqa: E731
                                                          [jnp.asarray(z[f"{tag}/{i}"]) for i in range(len(jax.tree.leaves(tree)))])
            params, best_params, opt_state = leaves("p", params), leaves("b", params), leaves("o", opt_state)
            step, best, history = int(z["step"]), float(z["best"]), json.loads(str(z["history"]))
        log(f"resumed at step {step}")

    def loss_fn(p, xb, cb, lb, bb):
        """(continuum, lines) mean squared error in dex^2; lines compared above the floor only."""
        ec = jnp.sum((mlp_apply(p["cont"], xb) - cb) ** 2 * c_w, -1)
        pred = jnp.maximum(bb + mlp_apply(p["lines"], xb) * l_std, cfg.line_floor)
        el = jnp.sum((pred - lb) ** 2, -1) / n_lines
        return jnp.mean(ec), jnp.mean(el)

    def total_loss(p, xb, cb, lb, bb):
        ec, el = loss_fn(p, xb, cb, lb, bb)
        return ec + el

    x_tr, c_tr, l_tr, b_tr = xs[i_tr], cs[i_tr], ls[i_tr], base[i_tr]

    @jax.jit
    def run(p, o, key):
        def body(carry, k):
            p, o = carry
            idx = jax.random.randint(k, (cfg.batch_size,), 0, x_tr.shape[0])
            loss, g = jax.value_and_grad(total_loss)(p, x_tr[idx], c_tr[idx], l_tr[idx], b_tr[idx])
            upd, o = opt.update(g, o, p)
            return (optax.apply_updates(p, upd), o), loss

        (p, o), losses = jax.lax.scan(body, (p, o), jax.random.split(key, cfg.steps_per_call))
        return p, o, jnp.mean(losses)

    heldout = jax.jit(lambda p: loss_fn(p, xs[i_ho], cs[i_ho], ls[i_ho], base[i_ho]))
    t0 = last = time.time()
    key = jax.random.PRNGKey(cfg.seed + 1)
    losses = []
    while step < cfg.steps:
        params, opt_state, loss = run(params, opt_state, jax.random.fold_in(key, step))
        step += cfg.steps_per_call
        losses.append(float(loss))
        now = time.time()
        stop = step >= cfg.steps or (max_seconds is not None and now - t0 > max_seconds)
        if now - last > cfg.checkpoint_every or stop:
            ho_c, ho_l = (float(v) for v in heldout(params))
            if ho_c + ho_l < best:
                best, best_params = ho_c + ho_l, params
            history.append({"step": step, "seconds": round(now - t0, 1), "train": float(np.mean(losses)),
                            "heldout_cont_dex2": ho_c, "heldout_lines_dex2": ho_l})
            losses = []
            arrays = {f"p/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(params))}
            arrays.update({f"b/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(best_params))})
            arrays.update({f"o/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(opt_state))})
            np.savez(ckpt.with_suffix(".tmp.npz"), **arrays, step=step, best=best, history=json.dumps(history),
                     config=cfg_json)
            ckpt.with_suffix(".tmp.npz").replace(ckpt)
            with open(out_dir / LOG, "a") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
            log(json.dumps(history[-1]))
            last = now
            if stop:
                break
    weights = {**{k: np.asarray(v, np.float32) for k, v in stats.items()},
               **jax.tree.map(lambda a: np.asarray(a, np.float32), best_params)}
    _save(out_dir, weights, grid, cfg)
    return SpectralEmulator(weights, grid)


def _save(out_dir: Path, weights: dict, grid: dict, cfg: SpectralConfig) -> None:
    from popflow.artifacts import flatten_tree

    flat = flatten_tree(weights)
    flat.update({f"grid/{k}": np.asarray(grid[k]) for k in ("wave", "width", "line_pixel", "igm_z", "igm_table")})
    np.savez(out_dir / "weights.npz", **flat)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))


def load_run(out_dir) -> SpectralEmulator:
    """The emulator saved by :func:`train_spectral` in ``out_dir``."""
    from popflow.artifacts import unflatten_tree

    with np.load(Path(out_dir) / "weights.npz") as z:
        tree = unflatten_tree({k: z[k] for k in z.files})
    grid = tree.pop("grid")
    return SpectralEmulator(tree, grid)


FINETUNE_LOG = "finetune.log"


def finetune_photometry(run_dir, theta, mags, curves, *, steps: int = 10_000, batch_size: int = 512,
                        learning_rate: float = 1e-4, eval_every: int = 500, n_eval: int = 4096,
                        max_seconds: float | None = None, seed: int = 0, log=print) -> dict:
    """Fine-tune a finished run on the simulator's own magnitudes, through the exact photometry.

    ``theta`` (n, dim) and unit-mass ``mags`` (n, n_filters) are the rows the run was trained on
    (same order: its held-out split is reused), ``curves`` the :class:`popflow.filters.Filter` of
    the magnitude columns.

    The spectral loss weighs every pixel alike, so an error shared by the pixels of a band (a
    0.005 dex offset or tilt) costs little there but is 0.0125 mag in the band. This stage
    minimises the squared magnitude error itself over every filter, both sides
    capped as in :func:`popflow.emulator.train.accuracy_table`, with Adam (warm-up, cosine
    decay from ``learning_rate``) from the run's weights, on the rows :func:`train_spectral`
    trained on. Every ``eval_every`` steps the median |dm| on ``n_eval`` of the run's held-out
    rows decides which weights are kept; they are written back to ``run_dir/weights.npz`` each
    time they improve (the spectral-loss weights stay in ``weights_spectral.npz``), so an
    interrupted run keeps its gains. Returns ``{"step", "heldout_median_dm", "history"}``.
    """
    from popflow.artifacts import flatten_tree
    from popflow.emulator.train import cap_magnitudes as capped

    run_dir = Path(run_dir)
    cfg_d = json.loads((run_dir / "config.json").read_text())
    cfg = SpectralConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_d.items()})
    i_tr, i_ho = _split(len(theta), cfg)  # the run's own split
    rng = np.random.default_rng(seed)
    i_ev = np.sort(rng.choice(i_ho, min(n_eval, i_ho.size), replace=False))
    theta = np.array(theta, np.float32)
    theta[:, DEFAULT_SPACE.index("log_mass")] = 0.0
    emu = load_run(run_dir)
    phot = emu.photometer(list(curves))
    i_z = DEFAULT_SPACE.index("redshift")

    fixed = {k: v for k, v in emu.w.items() if k not in ("cont", "lines")}
    params = {"cont": emu.w["cont"], "lines": emu.w["lines"]}
    th_j, m_j = jnp.asarray(theta), jnp.asarray(mags, jnp.float32)

    def loss_fn(p, tb, mb):
        pred = phot.magnitudes(tb, weights={**fixed, **p})
        return jnp.mean((capped(pred, tb[:, i_z]) - capped(mb, tb[:, i_z])) ** 2)

    sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, steps // 10), steps,
                                               end_value=learning_rate / 100)
    opt = optax.adam(sched)
    i_tr_j = jnp.asarray(i_tr)

    @jax.jit
    def run(p, o, key):
        def body(carry, k):
            p, o = carry
            idx = i_tr_j[jax.random.randint(k, (batch_size,), 0, i_tr_j.shape[0])]
            loss, g = jax.value_and_grad(loss_fn)(p, th_j[idx], m_j[idx])
            upd, o = opt.update(g, o, p)
            return (optax.apply_updates(p, upd), o), loss

        (p, o), losses = jax.lax.scan(body, (p, o), jax.random.split(key, 50))
        return p, o, jnp.mean(losses)

    ev = jax.jit(lambda p: jnp.abs(capped(phot.magnitudes(th_j[i_ev], weights={**fixed, **p}), th_j[i_ev, i_z])
                                   - capped(m_j[i_ev], th_j[i_ev, i_z])))
    weights_file = run_dir / "weights.npz"
    if not (run_dir / "weights_spectral.npz").exists():
        shutil.copyfile(weights_file, run_dir / "weights_spectral.npz")
    with np.load(weights_file) as z:
        flat = dict(z)
    best = float(np.median(np.asarray(ev(params))))
    history = [{"step": 0, "heldout_median_dm": best}]
    log(f"fine-tune on magnitudes ({len(phot.filters)} filters): start held-out median |dm| {best:.4f} mag")
    opt_state, key, t0, step, losses = opt.init(params), jax.random.PRNGKey(seed + 7), time.time(), 0, []
    while step < steps and (max_seconds is None or time.time() - t0 < max_seconds):
        params, opt_state, loss = run(params, opt_state, jax.random.fold_in(key, step))
        step += 50
        losses.append(float(loss))
        if step % eval_every == 0 or step >= steps:
            med = float(np.median(np.asarray(ev(params))))
            history.append({"step": step, "seconds": round(time.time() - t0, 1), "train_mag2": float(np.mean(losses)),
                            "heldout_median_dm": med})
            losses = []
            with open(run_dir / FINETUNE_LOG, "a") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
            log(json.dumps(history[-1]))
            if med < best:
                best = med
                flat.update({k: np.asarray(v, np.float32)
                             for k, v in flatten_tree(jax.tree.map(np.asarray, params)).items()})
                np.savez(weights_file.with_suffix(".tmp.npz"), **flat)
                weights_file.with_suffix(".tmp.npz").replace(weights_file)
    return {"step": step, "heldout_median_dm": best, "history": history}


def spectral_arrays(run: dict, curves) -> dict[str, np.ndarray]:
    """Artifact arrays of a spectral emulator: a run's flat weights (``weights.npz`` of
    :func:`train_spectral`: network trees and ``grid/...``) under ``spectral/``, the grid as is,
    and the filter curves (:class:`popflow.filters.Filter`, band order) as ``curves/<i>/...``."""
    from popflow.artifacts import flatten_tree

    arrays = {(k if k.startswith("grid/") else "spectral/" + k): np.asarray(v) for k, v in run.items()}
    # the IGM table only where it dims (below Lyman alpha) and up to the box's redshift: 1/13 of the full table
    igm, igm_z = arrays["grid/igm_table"], arrays["grid/igm_z"]
    n_pix = int(np.flatnonzero((igm < 1.0).any(axis=1)).max(initial=-1)) + 1
    n_z = int(np.searchsorted(igm_z, Z_MAX, side="right")) + 1
    arrays["grid/igm_table"], arrays["grid/igm_z"] = igm[:n_pix, :n_z].astype(np.float32), igm_z[:n_z]
    arrays.update(flatten_tree({"curves": {str(i): {"wavelength": c.wavelength, "transmission": c.transmission}
                                           for i, c in enumerate(curves)}}))
    return arrays


def package_spectral(run_dir, store, out, *, validation=None, search_path=None, command: str = "", log=print):
    """Package a finished :func:`train_spectral` run as an :class:`popflow.emulator.Emulator` artifact.

    The artifact covers every filter of the spectra ``store`` (curves stored inside it, with
    their sha256), so it needs no filter files at fit time; ``popflow emulator select`` cuts it
    to one band set. Accuracy is measured on the store's validation rows ("box") and, when
    given, on a prior-drawn ``validation`` set ("prior", which sets the error floor), as for
    the other designs. Returns the saved emulator.
    """
    from popflow.emulator.model import Emulator
    from popflow.emulator.train import band_names, measure_and_save
    from popflow.emulator.network import feature_names
    from popflow.filters import load_filter
    from popflow.sps.spectra import read_spectra_store

    run_dir = Path(run_dir)
    val, attrs = read_spectra_store(store, fields=("theta", "mag_unit"), validation_only=True)
    filters = list(attrs["filters"])
    curves = [load_filter(f, search_path) for f in filters]
    with np.load(run_dir / "weights.npz") as z:
        run = {k: z[k] for k in z.files}
    cfg = json.loads((run_dir / "config.json").read_text())
    history = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    arrays = spectral_arrays(run, curves)
    bands = []
    for bs, fl in attrs["band_sets"].items():
        bands += [f"{bs}_{b}" for b, f in zip(band_names(bs, list(fl)), fl) if f"{bs}_{b}" not in bands]
    bands = bands if len(bands) == len(filters) else filters
    meta = {
        "kind": "emulator", "format": 1, "name": "spectral", "bands": bands, "filters": filters,
        "space": DEFAULT_SPACE.to_dict(),
        "architecture": {
            "design": "spectral", "target": "rest_frame_spectrum",
            "inputs": [*feature_names(DEFAULT_SPACE), *(f"log10 mass fraction of SFH bin {i}" for i in range(1, 8))],
            "continuum": f"{cfg['n_pca']} PCA components of log10 L_lambda on {run['grid/wave'].size} rest pixels "
                         f"({run['grid/wave'][0]:.0f}-{run['grid/wave'][-1]:.0f} A), Speculator MLP {cfg['cont_hidden']}",
            "lines": f"{run['grid/line_pixel'].size} Cloudy lines, log10 L - log10(youngest-bin mass fraction), "
                     f"Speculator MLP {cfg['line_hidden']}",
            "photometry": "Inoue+14 IGM (bagpipes' table), exact redshifting, D_L of popflow.cosmology, "
                          "photon-counting integration through the stored curves",
            "n_parameters": int(sum(v.size for k, v in run.items() if k.startswith(("cont/", "lines/")))),
        },
        "band_sets": {bs: list(fl) for bs, fl in attrs["band_sets"].items()},
        "filter_sha256": {c.name: c.sha256 for c in curves},
        "domain": {"lower": DEFAULT_SPACE.lower.tolist(), "upper": DEFAULT_SPACE.upper.tolist()},
        "training": {"store": str(store), "store_seed": attrs.get("seed"), "store_n_models": attrs.get("n_models"),
                     "proposal": attrs.get("proposal"), "bagpipes_version": attrs.get("bagpipes_version"),
                     "config": cfg, "steps": history[-1]["step"], "seconds": history[-1]["seconds"],
                     "heldout": {k: history[-1][k] for k in ("heldout_cont_dex2", "heldout_lines_dex2")},
                     "data_command": f"popflow sps spectra --n {attrs['n_models']} --seed {attrs['seed']} "
                                     f"--chunk-size {attrs['chunk_size']} --proposal {attrs['proposal']['kind']} "
                                     f"--workers 2 --out {store}",
                     "command": command},
    }
    if (run_dir / FINETUNE_LOG).is_file():
        tuned = [json.loads(line) for line in (run_dir / FINETUNE_LOG).read_text().splitlines()]
        meta["training"]["finetune"] = {"loss": "squared capped magnitude error, every filter (finetune_photometry)",
                                        "steps": tuned[-1]["step"], "seconds": tuned[-1]["seconds"],
                                        "heldout_median_dm": min(t["heldout_median_dm"] for t in tuned)}
    return measure_and_save(Emulator(meta, arrays), val["theta"], val["mag_unit"], store, out, validation=validation,
                            log=log)


def train_from_spectra(store, out_dir, cfg: SpectralConfig = SpectralConfig(), *, resume: bool = False,
                       max_seconds: float | None = None, finetune_steps: int = 0, search_path=None,
                       log=print) -> bool:
    """Train on the non-validation rows of a spectra store, then (``finetune_steps``) fine-tune on its
    magnitudes (:func:`finetune_photometry`); True when all ``cfg.steps`` are done (False: stopped at
    ``max_seconds``, with a checkpoint to resume from, before any fine-tuning)."""
    from popflow.filters import load_filter
    from popflow.sps.spectra import read_spectra_store

    d, attrs = read_spectra_store(store)
    keep = ~d["is_validation"]
    log(f"{store}: {int(keep.sum())} models (validation rows excluded)")
    train_spectral(d["theta"][keep], d["log_cont"][keep], d["log_lines"][keep], d, out_dir, cfg, resume=resume,
                   max_seconds=max_seconds, log=log)
    with np.load(Path(out_dir) / CHECKPOINT) as z:
        if int(z["step"]) < cfg.steps:
            return False
    if finetune_steps:
        curves = [load_filter(f, search_path) for f in attrs["filters"]]
        finetune_photometry(out_dir, d["theta"][keep], d["mag_unit"][keep], curves, steps=finetune_steps, log=log)
    return True
