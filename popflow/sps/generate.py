"""Training-set generation: proposal draws -> bagpipes magnitudes -> a chunked Zarr store.

``popflow sps simulate --n N --out training.zarr --workers W --seed S`` calls
:func:`simulate`. Models are made in chunks of ``chunk_size``; chunk ``k``
draws its parameters from ``numpy.random.default_rng(SeedSequence(seed,
spawn_key=(k,)))``, so the data depend only on (seed, n, chunk_size, proposal)
and never on the number of workers or on interruptions. Each chunk is
written as soon as it is done, then marked complete in ``chunk_done``; a
re-run of the same command skips complete chunks (resume). Worker processes
(spawned) build their bagpipes simulator once.

Store layout (Zarr v3; ``xarray.open_zarr(path, consolidated=False)``)
--------------------------------------------------------------------
Dimensions ``model`` (n), ``param`` (14), ``filter`` (n_filters), ``chunk``.

- ``theta`` (model, param) float32: physical parameters, column order
  ``attrs["parameters"]`` (DEFAULT_SPACE; ``log_mass`` is drawn but irrelevant).
- ``mag_unit`` (model, filter) float32: AB apparent magnitude of the model with
  1 Msun formed, column order ``attrs["filters"]``; the magnitude at
  ``log_mass`` is ``mag_unit - 2.5 log_mass``. Capped at ``attrs["simulator"]
  ["mag_cap"]`` where the IGM blocks a whole band (zero flux).
- ``is_validation`` (model,) bool: the deterministic held-out subset, every
  ``attrs["validation_every"]``-th model (the draws are i.i.d., so this is a
  random subset).
- ``chunk_done`` (chunk,) bool: completion markers. Rows of unfinished chunks
  read back as NaN (the fill value), never as data.

Attributes: ``kind`` ("popflow-sps-training-set"), ``n_models``,
``chunk_size``, ``seed``, ``proposal`` (settings dict), ``filters`` (filter
identifiers, column order), ``filter_sha256``, ``filter_sources``,
``band_sets`` ({name: [filter identifiers]}), ``parameters``, ``space``
(ParameterSpace dict), ``space_id``, ``cosmology``, ``simulator`` (the
bagpipes mapping), ``bagpipes_version``, ``popflow_version``,
``validation_every``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from popflow import cosmology
from popflow.params import DEFAULT_SPACE
from popflow.sps import proposal as proposals
from popflow.sps.bagpipes_model import SIMULATOR_DESCRIPTION, Z_MIN, bagpipes_version, get_simulator

__all__ = ["simulate", "open_training_set", "BAND_SETS", "STORE_KIND", "chunk_rng", "chunk_theta"]

STORE_KIND = "popflow-sps-training-set"

BAND_SETS: dict[str, tuple[str, ...]] = {
    "lsst": tuple(f"lsst_baseline_{b}" for b in "ugrizy"),
    "sdss": tuple(f"sdss_{b}0" for b in "ugriz"),
    "cfhtls": ("cfht_megacam_us_9301", "cfht_megacam_gs_9401", "cfht_megacam_rs_9601", "cfht_megacam_is_9701",
               "cfht_megacam_zs_9801"),
    "hsc": tuple(f"hsc_{b}" for b in "grizy"),
    # zCOSMOS-bright (Capak et al. 2007 / Ilbert et al. 2009 photometry): the curve files shipped with the
    # catalogue (../shared/data/zcosmos_bright/filters), found through the filter search path
    "zcosmos_bright": ("u_megacam", "B_subaru", "V_subaru", "g_subaru", "r_subaru", "i_subaru", "z_subaru",
                       "i_megacam", "J_wfcam", "Ks_wircam"),
}
"""Filters of the shipped band sets, by name (the training sets cover their union)."""

_SPEC_KEYS = ("kind", "n_models", "chunk_size", "seed", "proposal", "filters", "filter_sha256", "space_id",
              "simulator", "validation_every")


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The random generator of chunk ``chunk`` (independent streams from one seed)."""
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(chunk),)))


def chunk_theta(seed: int, chunk: int, size: int, proposal: dict) -> np.ndarray:
    """Parameters of chunk ``chunk``, (size, dim) float32, from the proposal settings dict."""
    return proposals.draw(chunk_rng(seed, chunk), size, proposal["kind"], z_min=proposal["z_min"],
                          z_max=proposal["z_max"], uniform_fraction=proposal.get("uniform_fraction", 0.0))


def _resolve_filters(filters: Sequence[str] | None, band_sets: Sequence[str] | None) -> tuple[tuple[str, ...], dict]:
    if filters:
        return tuple(dict.fromkeys(filters)), {}
    names = list(band_sets) if band_sets else list(BAND_SETS)
    unknown = [b for b in names if b not in BAND_SETS]
    if unknown:
        raise ValueError(f"unknown band set(s) {', '.join(unknown)}; known: {', '.join(BAND_SETS)}")
    chosen = {b: list(BAND_SETS[b]) for b in names}
    return tuple(dict.fromkeys(f for b in names for f in BAND_SETS[b])), chosen


def _worker_magnitudes(filters: tuple[str, ...], search_path: tuple[str, ...], chunk: int, theta: np.ndarray):
    return chunk, get_simulator(filters, search_path).magnitudes(theta)


def _create_store(path: Path, spec: dict, n_filters: int):
    import zarr

    n, cs = spec["n_models"], spec["chunk_size"]
    n_chunks = -(-n // cs)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("theta", shape=(n, DEFAULT_SPACE.dim), chunks=(cs, DEFAULT_SPACE.dim), dtype="float32",
                      fill_value=np.nan, dimension_names=["model", "param"])
    root.create_array("mag_unit", shape=(n, n_filters), chunks=(cs, n_filters), dtype="float32",
                      fill_value=np.nan, dimension_names=["model", "filter"])
    val = root.create_array("is_validation", shape=(n,), chunks=(cs,), dtype="bool", fill_value=False,
                            dimension_names=["model"])
    val[:] = np.arange(n) % spec["validation_every"] == 0
    root.create_array("chunk_done", shape=(n_chunks,), chunks=(n_chunks,), dtype="bool", fill_value=False,
                      dimension_names=["chunk"])
    root.attrs.update(spec)
    return root


def _open_existing(path: Path, spec: dict):
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs)
    if attrs.get("kind") != STORE_KIND:
        raise ValueError(f"{path}: exists and is not a popflow training set (kind = {attrs.get('kind')!r}); "
                         "choose another --out or pass --overwrite")
    for key in _SPEC_KEYS:
        if attrs.get(key) != spec[key]:
            raise ValueError(f"{path}: exists with a different {key} ({attrs.get(key)!r} there, {spec[key]!r} now); "
                             "re-run with the original settings to resume, or pass --overwrite / a new --out")
    return root


def simulate(out, n: int, *, seed: int = 0, workers: int = 1, chunk_size: int = 1000, proposal: str = "wide",
             uniform_fraction: float = proposals.UNIFORM_FRACTION, z_max: float = 6.0,
             filters: Sequence[str] | None = None, band_sets: Sequence[str] | None = None, search_path=None,
             validation_fraction: float = 0.05, overwrite: bool = False, max_chunks: int | None = None,
             progress: bool = True) -> Path:
    """Generate (or resume) a training set of ``n`` bagpipes models in the Zarr store ``out``.

    Args:
        out: store path (.zarr). An existing store made with the same settings is resumed.
        n: number of models. seed: master seed. workers: processes (1 = in this process).
        chunk_size: models per chunk (the unit of work, writing and resuming).
        proposal: ``"wide"``, ``"prior"`` or ``"uniform"`` (:mod:`popflow.sps.proposal`).
        filters: explicit filter identifiers; default: the union of ``band_sets``
            (default: every set in :data:`BAND_SETS`).
        search_path: folders for filter files (``--filter-path``).
        validation_fraction: size of the deterministic ``is_validation`` subset.
        max_chunks: stop after this many new chunks (a time-boxed run; re-run to continue).
    Returns the store path.
    """
    from popflow import __version__

    out = Path(out)
    if n < 1 or chunk_size < 1 or workers < 1:
        raise ValueError(f"simulate: n ({n}), chunk_size ({chunk_size}) and workers ({workers}) must be >= 1")
    if not 0.0 < validation_fraction <= 1.0:
        raise ValueError(f"simulate: validation_fraction = {validation_fraction} must lie in (0, 1]")
    filter_ids, chosen_sets = _resolve_filters(filters, band_sets)
    search = tuple(str(p) for p in ([search_path] if isinstance(search_path, (str, os.PathLike))
                                    else (search_path or ())))
    from popflow.filters import load_filters

    curves = load_filters(filter_ids, list(search))
    spec = {
        "kind": STORE_KIND,
        "n_models": int(n),
        "chunk_size": int(chunk_size),
        "seed": int(seed),
        "proposal": proposals.describe(proposal, Z_MIN, z_max, uniform_fraction),
        "filters": list(filter_ids),
        "filter_sha256": [c.sha256 for c in curves],
        "filter_sources": [c.source for c in curves],
        "band_sets": chosen_sets,
        "parameters": list(DEFAULT_SPACE.names),
        "space": DEFAULT_SPACE.to_dict(),
        "space_id": DEFAULT_SPACE.id,
        "cosmology": cosmology.DESCRIPTION,
        "simulator": SIMULATOR_DESCRIPTION,
        "bagpipes_version": bagpipes_version(),
        "popflow_version": __version__,
        "validation_every": max(1, int(round(1.0 / validation_fraction))),
    }
    if out.exists() and not overwrite:
        root = _open_existing(out, spec)
    else:
        root = _create_store(out, spec, len(filter_ids))
    n_chunks = root["chunk_done"].shape[0]
    done = np.asarray(root["chunk_done"][:])
    todo = [k for k in range(n_chunks) if not done[k]]
    if max_chunks is not None:
        todo = todo[: max(0, int(max_chunks))]
    bounds = {k: (k * chunk_size, min(n, (k + 1) * chunk_size)) for k in range(n_chunks)}
    n_done = int(sum(bounds[k][1] - bounds[k][0] for k in range(n_chunks) if done[k]))

    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=n_done, unit="model", desc=f"sps simulate -> {out.name}", disable=not progress,
               smoothing=0.05)
    thetas = {}

    def write(chunk: int, mags: np.ndarray):
        a, b = bounds[chunk]
        root["theta"][a:b] = thetas.pop(chunk)
        root["mag_unit"][a:b] = mags
        root["chunk_done"][chunk] = True  # marker last: a crash before it leaves the chunk to redo
        bar.update(b - a)

    try:
        if workers == 1:
            for k in todo:
                a, b = bounds[k]
                thetas[k] = chunk_theta(seed, k, b - a, spec["proposal"])
                write(*_worker_magnitudes(filter_ids, search, k, thetas[k]))
        else:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, "1")  # one core per worker process
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending = set()
                queue = iter(todo)
                for k in queue:  # keep about two chunks per worker in flight
                    a, b = bounds[k]
                    thetas[k] = chunk_theta(seed, k, b - a, spec["proposal"])
                    pending.add(pool.submit(_worker_magnitudes, filter_ids, search, k, thetas[k]))
                    if len(pending) >= 2 * workers:
                        finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for fut in finished:
                            write(*fut.result())
                for fut in cf.as_completed(pending):
                    write(*fut.result())
    finally:
        bar.close()
    return out


def open_training_set(path):
    """The training store as a lazy xarray Dataset (see the module docstring for the layout).

    Raises ValueError naming the store if it is not a popflow training set.
    """
    import xarray as xr

    ds = xr.open_zarr(str(path), consolidated=False)
    if ds.attrs.get("kind") != STORE_KIND:
        raise ValueError(f"{path}: not a popflow training set (kind = {ds.attrs.get('kind')!r})")
    return ds
