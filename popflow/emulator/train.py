"""Training of Speculator-style emulators: optax Adam, checkpoints, resume.

:func:`train` runs minibatch Adam (warm-up + cosine learning-rate decay) on
standardised inputs and outputs, minimising the mean squared error of the
standardised target. Every ``checkpoint_every`` seconds it writes
``checkpoint.npz`` (weights, optimiser state, step, best weights) and appends a
line to ``train.log`` (step, time, train loss, held-out loss, held-out median
and 95th percentile |dm| in mag), so an interrupted run loses at most one
checkpoint interval and ``resume=True`` continues it exactly where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from popflow.artifacts import flatten_tree, unflatten_tree
from popflow.cosmology import distance_modulus
from popflow.emulator.model import TARGETS, Z_FLOOR, Emulator
from popflow.emulator.network import SpeculatorMLP, feature_names, features
from popflow.params import DEFAULT_SPACE, ParameterSpace

__all__ = ["TrainConfig", "prepare_targets", "cap_magnitudes", "read_training_store", "train", "accuracy_table",
           "measure_and_save", "Y_CAP"]

Y_CAP = 30.0  # cap on unit-mass m - DM(z), mag (see cap_magnitudes)
CHECKPOINT = "checkpoint.npz"
LOG = "train.log"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all stored in model.json)."""

    design: str = "per_band"  # "per_band" (one MLP per band) or "trunk" (shared MLP)
    hidden: tuple[int, ...] = (128, 128, 128, 128)
    target: str = "m_minus_dm"  # network predicts m_unit - DM(z) ("m_minus_dm") or m_unit ("m")
    steps: int = 100_000
    batch_size: int = 1024
    learning_rate: float = 2e-3
    final_learning_rate: float = 1e-5
    warmup_steps: int = 500
    heldout_fraction: float = 0.05
    seed: int = 0
    steps_per_call: int = 100  # optimiser steps fused into one jitted lax.scan
    checkpoint_every: float = 120.0  # seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def prepare_targets(theta: np.ndarray, mags: np.ndarray, target: str, space: ParameterSpace = DEFAULT_SPACE):
    """Unit-mass magnitudes -> network targets; returns (theta, y, keep) with the rows kept.

    ``theta`` (n, dim) physical (log_mass ignored), ``mags`` (n, n_bands) unit-mass
    apparent AB magnitudes. Rows with z < Z_FLOOR or non-finite values are dropped;
    magnitudes are capped at ``DM(z) + Y_CAP`` (:func:`cap_magnitudes`). ``target =
    "m_minus_dm"`` subtracts DM(z), ``"m"`` keeps the apparent magnitude.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown emulator target {target!r}; known: {', '.join(TARGETS)}")
    theta = np.asarray(theta, np.float32)
    mags = np.asarray(mags, np.float32)
    z = theta[:, space.index("redshift")]
    keep = np.all(np.isfinite(mags), axis=1) & np.all(np.isfinite(theta), axis=1) & (z >= Z_FLOOR)
    theta, mags = theta[keep], mags[keep]
    dm = _dm(theta[:, space.index("redshift")])
    y = np.minimum(mags, dm[:, None] + Y_CAP)
    if target == "m_minus_dm":
        y = y - dm[:, None]
    return theta, y, keep


def _dm(z):
    """Distance modulus (float32 JAX path, as at inference) as NumPy; z (n,) >= Z_FLOOR."""
    return np.asarray(distance_modulus(jnp.asarray(np.maximum(z, Z_FLOOR), jnp.float32)), np.float32)


def cap_magnitudes(mags, z):
    """``min(mags, DM(z) + Y_CAP)``: unit-mass magnitudes fainter than the cap carry no usable flux.

    mags (n, n_bands) unit-mass apparent AB, z (n,). Even at log_mass = 13 and z = 0.01 the
    capped magnitude is DM + 30 - 32.5 >= 35.5, below 0.02 nJy (survey noise is ~10 nJy);
    such models are UV bands of very dusty galaxies at z > 3 or bands behind the IGM
    (bagpipes stores MAG_CAP = 99 there). The cap keeps that invisible range out of the
    regression. JAX arrays (and tracers) stay in JAX, for losses.
    """
    if isinstance(mags, jax.Array):
        return jnp.minimum(mags, distance_modulus(jnp.maximum(z, Z_FLOOR))[:, None] + Y_CAP)
    return np.minimum(np.asarray(mags, np.float32), _dm(np.asarray(z))[:, None] + Y_CAP)


def read_training_store(path, filters=None):
    """Completed models of a ``popflow sps simulate`` store.

    Returns ``(theta (n, dim), mags (n, n_filters) unit-mass AB, is_validation (n,), filters, attrs)``,
    only rows of chunks marked done (the store may still be growing). ``filters``
    picks and orders columns (default: all); unknown filters raise naming the store.
    """
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    if attrs.get("kind") != "popflow-sps-training-set":
        raise ValueError(f"{path}: not a popflow training set (kind = {attrs.get('kind')!r})")
    store_filters = list(attrs["filters"])
    filters = store_filters if filters is None else list(filters)
    missing = [f for f in filters if f not in store_filters]
    if missing:
        raise KeyError(f"{path}: training set has no filter {', '.join(map(repr, missing))}; it has {', '.join(store_filters)}")
    cols = [store_filters.index(f) for f in filters]
    done = np.asarray(root["chunk_done"][:])
    cs, n = int(attrs["chunk_size"]), int(attrs["n_models"])
    thetas, mags, val = [], [], []
    for k in np.flatnonzero(done):
        a, b = k * cs, min(n, (k + 1) * cs)
        thetas.append(np.asarray(root["theta"][a:b]))
        mags.append(np.asarray(root["mag_unit"][a:b])[:, cols])
        val.append(np.asarray(root["is_validation"][a:b]))
    if not thetas:
        raise ValueError(f"{path}: no completed chunk yet")
    return np.concatenate(thetas), np.concatenate(mags), np.concatenate(val), filters, attrs


def _optimizer(cfg: TrainConfig):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, end_value=cfg.final_learning_rate
    )
    return optax.adam(sched)


def _heldout_split(n: int, cfg: TrainConfig):
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    n_held = max(1, int(round(cfg.heldout_fraction * n)))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def train(
    theta: np.ndarray,
    mags: np.ndarray,
    bands,
    filters,
    out_dir,
    cfg: TrainConfig = TrainConfig(),
    *,
    space: ParameterSpace = DEFAULT_SPACE,
    resume: bool = False,
    max_seconds: float | None = None,
    provenance: dict | None = None,
    log=print,
) -> Emulator:
    """Train an emulator on unit-mass magnitudes and return it (best held-out weights).

    ``theta`` (n, dim) physical, ``mags`` (n, n_bands) unit-mass apparent AB magnitudes
    of ``bands``/``filters``. Checkpoints and ``train.log`` go to ``out_dir``; with
    ``resume`` the run continues from ``out_dir/checkpoint.npz`` (same config required).
    ``max_seconds`` stops early (after a checkpoint) so a run can be continued later.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bands, filters = list(bands), list(filters)
    theta, y, _ = prepare_targets(theta, mags, cfg.target, space)
    if len(theta) < 100:
        raise ValueError(f"only {len(theta)} usable training models; need at least 100")
    x = np.asarray(features(space, theta), np.float32)
    i_tr, i_ho = _heldout_split(len(x), cfg)
    x_mean, x_std = x[i_tr].mean(0), x[i_tr].std(0) + 1e-6
    y_mean, y_std = y[i_tr].mean(0), y[i_tr].std(0) + 1e-6
    xs = jnp.asarray((x - x_mean) / x_std)
    ys = jnp.asarray((y - y_mean) / y_std)
    x_tr, y_tr, x_ho, y_ho = xs[i_tr], ys[i_tr], xs[i_ho], ys[i_ho]
    y_std_j = jnp.asarray(y_std)

    model = SpeculatorMLP(x.shape[1], len(bands), cfg.hidden, cfg.design, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = _optimizer(cfg)
    opt_state = opt.init(params)
    step, best_loss, best_params = 0, np.inf, params
    history: list[dict] = []
    ckpt = out_dir / CHECKPOINT
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    if resume and ckpt.is_file():
        step, params, opt_state, best_params, best_loss, history = _load_checkpoint(ckpt, params, opt_state, cfg_json)
        log(f"resumed from {ckpt} at step {step}")
    elif resume:
        log(f"no checkpoint at {ckpt}; starting afresh")

    def loss_fn(p, xb, yb):
        return jnp.mean((nnx.merge(graphdef, p)(xb) - yb) ** 2)

    @jax.jit
    def run_steps(p, o, key):
        n = x_tr.shape[0]

        def body(carry, k):
            p, o = carry
            idx = jax.random.randint(k, (cfg.batch_size,), 0, n)
            loss, g = jax.value_and_grad(loss_fn)(p, x_tr[idx], y_tr[idx])
            upd, o = opt.update(g, o, p)
            return (optax.apply_updates(p, upd), o), loss

        (p, o), losses = jax.lax.scan(body, (p, o), jax.random.split(key, cfg.steps_per_call))
        return p, o, jnp.mean(losses)

    @jax.jit
    def heldout(p):
        pred = jax.lax.map(lambda xb: nnx.merge(graphdef, p)(xb), x_ho.reshape(-1, 1, x_ho.shape[1]), batch_size=4096)
        r = pred.reshape(y_ho.shape) - y_ho
        return jnp.mean(r**2), jnp.abs(r) * y_std_j

    t0 = time.time()
    last_ckpt = time.time()
    key = jax.random.PRNGKey(cfg.seed)
    train_losses = []
    while step < cfg.steps:
        params, opt_state, loss = run_steps(params, opt_state, jax.random.fold_in(key, step))
        step += cfg.steps_per_call
        train_losses.append(float(loss))
        now = time.time()
        done = step >= cfg.steps or (max_seconds is not None and now - t0 > max_seconds)
        if now - last_ckpt > cfg.checkpoint_every or done:
            ho_loss, dm = heldout(params)
            ho_loss, dm = float(ho_loss), np.asarray(dm)
            if ho_loss < best_loss:
                best_loss, best_params = ho_loss, params
            rec = {
                "step": step,
                "seconds": round(now - t0, 1),
                "train_loss": float(np.mean(train_losses)),
                "heldout_loss": ho_loss,
                "heldout_median_dm": float(np.max(np.median(dm, 0))),
                "heldout_p95_dm": float(np.max(np.percentile(dm, 95, 0))),
            }
            train_losses = []
            history.append(rec)
            with open(out_dir / LOG, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log(
                f"step {step}/{cfg.steps}  train {rec['train_loss']:.3e}  held-out {ho_loss:.3e}  "
                f"worst-band median |dm| {rec['heldout_median_dm']:.4f}  p95 {rec['heldout_p95_dm']:.4f} mag"
            )
            _save_checkpoint(ckpt, step, params, opt_state, best_params, best_loss, history, cfg_json)
            last_ckpt = time.time()
            if done:
                break

    layers = nnx.to_pure_dict(best_params)["layers"]
    meta = {
        "kind": "emulator",
        "format": 1,
        "bands": bands,
        "filters": filters,
        "space": space.to_dict(),
        "architecture": {
            "design": cfg.design,
            "hidden": list(cfg.hidden),
            "activation": "speculator: [gamma + (1 - gamma) sigmoid(beta x)] x (Alsing et al. 2020)",
            "target": cfg.target,
            "inputs": list(feature_names(space)),
            "n_parameters": int(sum(np.size(v) for v in jax.tree.leaves(layers))),
        },
        "domain": _domain(theta, space),
        "training": {
            "config": cfg.to_dict(),
            "n_models": int(len(i_tr)),
            "n_heldout": int(len(i_ho)),
            "steps": int(step),
            "best_heldout_loss": float(best_loss),
            "history_tail": history[-5:],
            **(provenance or {}),
        },
    }
    weights = Emulator.build_weights(layers, x_mean, x_std, y_mean, y_std)
    return Emulator(meta, weights)


def _domain(theta: np.ndarray, space: ParameterSpace) -> dict:
    """Training coverage per parameter: the data's min/max, or the box bound where the data
    come within 1% of the range of it (the proposal covers the box; its finite sample does not)."""
    lo, hi = space.lower, space.upper
    tol = 0.01 * (hi - lo)
    tmin, tmax = theta.min(0), theta.max(0)
    return {"lower": np.where(tmin - lo < tol, lo, tmin).tolist(), "upper": np.where(hi - tmax < tol, hi, tmax).tolist()}


def _save_checkpoint(path: Path, step, params, opt_state, best_params, best_loss, history, cfg_json):
    arrays = {f"params/{k}": v for k, v in flatten_tree(nnx.to_pure_dict(params)).items()}
    arrays.update({f"best/{k}": v for k, v in flatten_tree(nnx.to_pure_dict(best_params)).items()})
    arrays.update({f"opt/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(opt_state))})
    arrays["step"] = np.asarray(step)
    arrays["best_loss"] = np.asarray(best_loss)
    arrays["history"] = np.asarray(json.dumps(history))
    arrays["config"] = np.asarray(cfg_json)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_checkpoint(path: Path, params, opt_state, cfg_json):
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    if str(a["config"]) != cfg_json:
        raise ValueError(f"{path}: checkpoint was written with a different training config:\n{a['config']}\nnow:\n{cfg_json}")

    def restore(prefix, like):
        tree = unflatten_tree({k[len(prefix) + 1 :]: v for k, v in a.items() if k.startswith(prefix + "/")})
        new = jax.tree.map(lambda x: x, like)
        nnx.replace_by_pure_dict(new, jax.tree.map(jnp.asarray, tree))
        return new

    leaves, treedef = jax.tree.flatten(opt_state)
    opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a[f"opt/{i}"]) for i in range(len(leaves))])
    return (int(a["step"]), restore("params", params), opt_state, restore("best", params), float(a["best_loss"]),
            json.loads(str(a["history"])))


def accuracy_table(emulator: Emulator, theta: np.ndarray, mags_unit: np.ndarray, z_edges=(0, 0.5, 1, 2, 3, 4, 6)) -> dict:
    """Per-band |dm| statistics of ``emulator`` against SPS unit-mass magnitudes.

    ``theta`` (n, dim) physical (log_mass is set to 0 here), ``mags_unit`` (n, n_bands) in
    the emulator's band order. Rows with z < Z_FLOOR or non-finite magnitudes are skipped;
    both sides are capped with :func:`cap_magnitudes` (beyond the cap the flux is nil).
    Returns ``{"n", "median", "p68", "p95", "max", "by_z": [{"z_lo", "z_hi", "n", "median", "p95"}]}``
    with per-band lists in mag.
    """
    theta = np.array(theta, np.float32)
    theta[:, emulator.space.index("log_mass")] = 0.0
    z = theta[:, emulator.space.index("redshift")]
    ok = np.all(np.isfinite(mags_unit), 1) & (z >= Z_FLOOR)
    theta, mags_unit, z = theta[ok], np.asarray(mags_unit, np.float32)[ok], z[ok]
    pred = np.asarray(jax.jit(emulator.magnitudes)(jnp.asarray(theta)))
    d = np.abs(cap_magnitudes(pred, z) - cap_magnitudes(mags_unit, z))

    def stats(dd):
        return {
            "n": int(len(dd)),
            "median": np.round(np.median(dd, 0), 5).tolist(),
            "p68": np.round(np.percentile(dd, 68, 0), 5).tolist(),
            "p95": np.round(np.percentile(dd, 95, 0), 5).tolist(),
            "max": np.round(dd.max(0), 5).tolist(),
        }

    out = stats(d)
    out["by_z"] = []
    for lo, hi in zip(z_edges[:-1], z_edges[1:]):
        sel = (z >= lo) & (z < hi) if hi != z_edges[-1] else (z >= lo) & (z <= hi)
        if sel.sum() >= 10:
            s = stats(d[sel])
            out["by_z"].append({"z_lo": lo, "z_hi": hi, "n": s["n"], "median": s["median"], "p95": s["p95"]})
    return out


def band_names(band_set: str, filters: list[str]) -> list[str]:
    """Band names of a shipped band set (positionally, same length), else the filter identifiers."""
    from popflow.catalog import load_bandset

    try:
        names = list(load_bandset(band_set).band_names)
    except (FileNotFoundError, KeyError, ValueError):
        return list(filters)
    return names if len(names) == len(filters) else list(filters)


def store_filters(attrs: dict, band_sets: list[str]) -> tuple[list[str], list[str]]:
    """(bands, filters) for ``band_sets`` of a training store (``["all"]``: every band set, union).

    Band names are the band sets' own (``u``, ``g``...) for one set, ``<set>_<band>`` for several.
    """
    known = attrs.get("band_sets", {})
    if band_sets == ["all"]:
        band_sets = list(known)
    bands, filters = [], []
    for bs in band_sets:
        if bs not in known:
            raise KeyError(f"training set has no band set {bs!r}; it has {', '.join(known)} (or 'all')")
        names = band_names(bs, list(known[bs]))
        for name, f in zip(names, known[bs]):
            if f not in filters:
                filters.append(f)
                bands.append(name if len(band_sets) == 1 else f"{bs}_{name}")
    return bands, filters


def train_from_store(store, band_sets: list[str], out, cfg: TrainConfig, *, validation=None, resume=False,
                     max_seconds=None, command: str = "", log=print) -> Emulator:
    """Train on a ``popflow sps simulate`` store and write the artifact to ``out``.

    Trains on the store's non-validation rows (completed chunks only); reports
    accuracy on the store's own validation rows ("box": the wide training
    proposal, which covers the whole box) and, when given, on a prior-drawn
    ``validation`` store ("prior": the region fits visit). The error floor is
    the per-band 68th percentile of |dm| on the prior set (else the box set).
    """
    theta, mags, is_val, _, attrs = read_training_store(store)
    bands, filters = store_filters(attrs, band_sets)
    cols = [list(attrs["filters"]).index(f) for f in filters]
    mags = mags[:, cols]
    space = ParameterSpace.from_dict(attrs["space"])
    log(f"{store}: {int((~is_val).sum())} training and {int(is_val.sum())} validation models, {len(filters)} filters")
    provenance = {
        "store": str(store),
        "store_n_models_complete": int(len(theta)),
        "store_seed": attrs.get("seed"),
        "proposal": attrs.get("proposal"),
        "simulator": attrs.get("simulator"),
        "bagpipes_version": attrs.get("bagpipes_version"),
        "cosmology": attrs.get("cosmology"),
        "command": command,
    }
    emu = train(theta[~is_val], mags[~is_val], bands, filters, out, cfg, space=space, resume=resume,
                max_seconds=max_seconds, provenance=provenance, log=log)
    emu.meta["filter_sha256"] = {f: attrs["filter_sha256"][list(attrs["filters"]).index(f)]
                                 if isinstance(attrs.get("filter_sha256"), list) else attrs["filter_sha256"][f]
                                 for f in filters}
    emu.meta["band_sets"] = {bs: [f for f in attrs["band_sets"][bs]] for bs in (attrs["band_sets"] if band_sets == ["all"] else band_sets)}
    emu.meta["name"] = band_sets[0] if len(band_sets) == 1 else "+".join(band_sets)
    return measure_and_save(emu, theta[is_val], mags[is_val], store, out, validation=validation, log=log)


def measure_and_save(emu: Emulator, theta_box, mags_box, store, out, *, validation=None, log=print) -> Emulator:
    """Record ``emu``'s accuracy on a training store's validation rows (``theta_box`` (n, dim), unit-mass
    ``mags_box`` (n, n_bands): "box") and on a prior-drawn ``validation`` set ("prior"), set the error
    floor (the prior set's per-band p68, else the box's), save the artifact to ``out`` and return ``emu``."""
    emu.meta["accuracy"] = {"y_cap": Y_CAP, "box": {**accuracy_table(emu, theta_box, mags_box),
                                                    "source": f"{store} (is_validation rows, wide proposal)"}}
    if validation is not None:
        set_prior_accuracy(emu, validation)
    else:
        emu.meta["error_floor"] = emu.meta["accuracy"]["box"]["p68"]
        emu.error_floor = np.asarray(emu.meta["error_floor"], np.float32)
    aid = emu.save(out)
    log(f"wrote emulator {aid} ({emu.meta['architecture']['design']}, {len(emu.filters)} filters) to {out}")
    log(describe_accuracy(emu))
    return emu


def read_validation(path, filters):
    """(theta (n, dim), unit-mass mags (n, len(filters)), source) from a validation npz
    (:func:`write_validation_npz`) or a ``popflow sps simulate`` store."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            have = [str(f) for f in z["filters"]]
            missing = [f for f in filters if f not in have]
            if missing:
                raise KeyError(f"{path}: validation set has no filter {', '.join(map(repr, missing))}")
            mags = z["mag_unit"][:, [have.index(f) for f in filters]]
            return z["theta"], mags, f"{path.name} ({json.loads(str(z['source'])).get('store')}, "\
                f"proposal {json.loads(str(z['source'])).get('proposal', {}).get('kind')})"
    theta, mags, _, _, attrs = read_training_store(path, filters)
    return theta, mags, f"{path} (proposal {attrs.get('proposal', {}).get('kind')})"


def set_prior_accuracy(emu: Emulator, validation) -> None:
    """Measure ``emu`` on a prior-drawn validation set (npz or store) into ``meta["accuracy"]["prior"]``
    and set the error floor to the per-band 68th percentile of |dm| there."""
    theta, mags, source = read_validation(validation, emu.filters)
    emu.meta.setdefault("accuracy", {"y_cap": Y_CAP})
    emu.meta["accuracy"]["prior"] = {**accuracy_table(emu, theta, mags), "source": source}
    emu.meta["error_floor"] = emu.meta["accuracy"]["prior"]["p68"]
    emu.error_floor = np.asarray(emu.meta["error_floor"], np.float32)


def describe_accuracy(emu: Emulator) -> str:
    """One line per validation set: per-band median/p95 |dm| in mag."""
    lines = []
    for which in ("prior", "box"):
        a = emu.meta.get("accuracy", {}).get(which)
        if a:
            lines.append(f"{which} (n={a['n']}): " + "  ".join(
                f"{b} {m:.4f}/{p:.4f}" for b, m, p in zip(emu.bands, a["median"], a["p95"])) + "  (median/p95 |dm|, mag)")
    return "\n".join(lines)


def write_validation_npz(store, path) -> None:
    """Save a store's completed models as a compact float32 npz (``theta``, ``mag_unit``, ``filters``,
    ``source``): the committed validation set of the shipped emulators."""
    theta, mags, _, filters, attrs = read_training_store(store)
    source = json.dumps({"store": str(store), "seed": attrs.get("seed"), "proposal": attrs.get("proposal"),
                         "bagpipes_version": attrs.get("bagpipes_version"), "filter_sha256": attrs.get("filter_sha256")})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, theta=theta.astype(np.float32), mag_unit=mags.astype(np.float32),
                        filters=np.asarray(filters), source=np.asarray(source))
