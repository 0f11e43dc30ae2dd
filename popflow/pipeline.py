"""Bulk fits out of core: Dask maps :func:`popflow.fit.fit_chunk` over a catalogue's galaxy chunks.

:func:`fit_catalog` is the imperative shell behind ``popflow fit``:

1. It takes a lock on the posterior store (``<store>.lock``: pid, host, start
   time); a second run is refused while the first is alive, and a lock left by
   a dead process on this host is cleared.
2. It creates the store's full layout once (every variable, NaN-filled, chunked
   along ``galaxy`` in fit chunks), an xarray DataTree in Zarr v3:

   - ``/posterior``: one variable per parameter, (galaxy, chain, draw), physical units;
   - ``/sample_stats``: ``log_prior`` (physical density), ``log_likelihood``
     (galaxy, chain, draw); ``acceptance_rate``, ``tau``, ``rhat``, ``converged``,
     ``usable`` (galaxy);
   - ``/summary``: ``<name>_q`` (galaxy, quantile), ``pz`` (galaxy, z_grid),
     ``z_median``, ``z_mode`` (:mod:`popflow.summary`);
   - root: coordinate ``galaxy_id``, ``chunk_done`` (chunk,) completion markers
     (one Zarr chunk per marker, so each is written atomically), attrs
     ``prior_id``, ``emulator_id``, ``datamodel``, ``settings``, ``seed``,
     ``catalog_sha256``, ``chunk_size``, ``popflow_version``.

   The identity attrs are written last: a store without them is a layout that
   was interrupted and is rebuilt. An existing store fitted with another prior,
   emulator, data model, settings, seed, chunk size or catalogue is refused
   unless ``overwrite=True``.
3. One Dask task per pending chunk reads its galaxies from the catalogue, fits
   them with the key ``fold_in(PRNGKey(seed), chunk_index)``, writes its region
   of every group and only then its completion marker. A task whose marker is
   already set does nothing, so a chunk re-run after a lost worker or a killed
   run is never written twice, and a resumed run gives exactly the store of an
   uninterrupted one.

Workers build the emulator, prior and compiled kernel once per process
(:func:`popflow.fit.fit_chunk` caches the kernel; the task carries only names,
paths or small pickles, never compiled code). On a LocalCluster each worker
runs one task at a time and its XLA/BLAS thread pools are limited to
``threads`` (``NPROC`` sizes XLA's CPU intra-op pool in jax 0.10; OMP/MKL/
OpenBLAS variables the BLAS pools). With GPUs visible to JAX there is one worker
per GPU. popflow's clusters do not pass on the nanny's default
``MALLOC_TRIM_THRESHOLD_=65536`` (``NANNY_CONFIG``): setting it turns off glibc's
adaptive mmap threshold, so XLA's large buffers are mapped and unmapped afresh
on every use, and the fit ran 18 % slower (BENCHMARKS.md). Workers started by
hand (``dask worker``) should be given the same setting in a Dask config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["fit_catalog", "open_posterior", "write_posterior_tree", "store_lock", "StoreLockedError", "StoreMismatchError",
           "default_chunk_size", "worker_env", "local_cluster", "NANNY_CONFIG"]

IDENTITY_KEYS = ("prior_id", "emulator_id", "datamodel", "settings", "seed", "catalog_sha256", "chunk_size",
                 "n_galaxies", "parameters", "filters")
# compared as well, but not required: stores written before it existed lack it (None: every redshift free)
COMPARED_KEYS = IDENTITY_KEYS + ("known_redshift",)
CHUNK_BYTES_TARGET = 256 * 2**20  # default fit chunks keep one chunk's draws near 256 MiB


class StoreLockedError(RuntimeError):
    """Another live process holds the posterior store's lock."""


class StoreMismatchError(ValueError):
    """An existing posterior store was made with other inputs (prior, emulator, settings, ...)."""


# ----------------------------------------------------------------------------- models, resolved in workers

@dataclasses.dataclass(frozen=True)
class _ModelRef:
    """How a worker gets an emulator or prior: a spec it loads itself, or a pickle of the object."""

    kind: str  # "emulator" or "prior"
    id: str
    spec: str | None = None  # shipped name, artifact folder or "module:factory"
    blob: bytes | None = None

    def build(self):
        model = load_model(self.spec, self.kind) if self.spec is not None else pickle.loads(self.blob)
        if str(model.id) != self.id:
            raise ValueError(f"{self.kind} {self.spec!r} has id {model.id} on this worker but {self.id} on the client "
                             "(changed on disk, or another installation)")
        return model


def load_model(spec, kind: str):
    """An emulator or prior from a shipped name, an artifact folder or ``"package.module:factory"``.

    ``factory`` is called with no arguments (a class or a function), so user models plug in
    without being saved as artifacts.
    """
    spec = str(spec)
    if ":" in spec and not Path(spec).exists():
        import importlib

        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{kind} {spec!r}: cannot import {attr!r} from {module!r} ({err})") from None
        return factory()
    if kind == "emulator":
        from popflow.emulator import Emulator

        return Emulator.load(spec)
    from popflow.priors import load_prior

    return load_prior(spec)


def _model_ref(obj, kind: str) -> tuple[_ModelRef, object]:
    """(reference for the workers, the object here) from a spec string/path or an object."""
    if isinstance(obj, (str, os.PathLike)):
        model = load_model(obj, kind)
        spec = str(Path(obj).resolve()) if Path(obj).exists() else str(obj)  # workers may run elsewhere
        return _ModelRef(kind, _model_id(model, kind), spec=spec), model
    return _ModelRef(kind, _model_id(obj, kind), blob=pickle.dumps(obj)), obj


def _model_id(model, kind: str) -> str:
    if not getattr(model, "id", None):
        raise ValueError(f"the {kind} has no id (save it as an artifact first, so stores can record what made them)")
    return str(model.id)


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a chunk task needs; small and picklable."""

    catalog: str
    store: str
    token: str  # sha256 of the run's identity: the per-process model cache key
    emulator: _ModelRef
    prior: _ModelRef
    filters: tuple[str, ...]
    datamodel: dict
    settings: dict
    seed: int
    chunk_size: int
    n_galaxies: int
    use_field: bool
    known_redshift: str | None  # catalogue variable of known redshifts (NaN: unknown), or None

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.n_galaxies)


_MODELS: dict = {}  # per worker process: job token -> (emulator, prior, datamodel, settings)


def _worker_models(job: _Job):
    if job.token not in _MODELS:
        from popflow.datamodel import DataModel
        from popflow.fit import FitSettings

        emulator = job.emulator.build().select(job.filters)
        _MODELS[job.token] = (emulator, job.prior.build(), DataModel.from_dict(job.datamodel),
                              FitSettings.from_dict(job.settings))
    return _MODELS[job.token]


# ----------------------------------------------------------------------------- one chunk (runs in a worker)

def _fit_chunk_task(job: _Job, index: int) -> dict:
    """Fit chunk ``index`` and write it; returns ``{"index", "n", "seconds", "skipped"}``."""
    import zarr

    t0 = time.perf_counter()
    start, stop = job.chunk_bounds(index)
    store = zarr.open_group(job.store, mode="r+")
    if int(store["chunk_done"][index]):
        return {"index": index, "n": stop - start, "seconds": 0.0, "skipped": True}
    try:
        _fit_and_write(job, store, index, start, stop)
    except Exception as err:
        raise RuntimeError(f"chunk {index} (galaxies {start}..{stop - 1} of {job.catalog}): "
                           f"{type(err).__name__}: {err}") from err
    return {"index": index, "n": stop - start, "seconds": time.perf_counter() - t0, "skipped": False}


def _fit_and_write(job: _Job, store, index: int, start: int, stop: int) -> None:
    """Fit galaxies ``start:stop`` and write them into the open Zarr group ``store``, the marker last.

    Reads and writes go through Zarr directly: the region is exactly one Zarr chunk of every
    array, so there is nothing for xarray or dask to plan (per chunk they cost more than the
    summaries).
    """
    import jax
    import zarr

    from popflow.fit import fit_chunk
    from popflow.summary import summarize

    emulator, prior, datamodel, settings = _worker_models(job)
    cat = zarr.open_group(job.catalog, mode="r")
    rows = slice(start, stop)
    field = np.asarray(cat["field"][rows], np.int32) if job.use_field else None
    redshift = None if job.known_redshift is None else np.asarray(cat[job.known_redshift][rows], np.float64)
    key = jax.random.fold_in(jax.random.PRNGKey(job.seed), index)
    res = fit_chunk(key, cat["flux"][rows], cat["flux_err"][rows], cat["mask"][rows], emulator=emulator,
                    prior=prior, datamodel=datamodel, settings=settings, field=field, redshift=redshift,
                    pad_to=job.chunk_size)
    names = prior.space.names
    out = {f"posterior/{n}": res["samples"][..., i] for i, n in enumerate(names)}
    out.update({f"sample_stats/{k}": res[k] for k in _STATS})
    out.update({f"summary/{k}": v for k, v in summarize(res["samples"], names).items()})
    for path, values in out.items():
        store[path][rows] = values
    # the marker last: a chunk counts as done only once all its data are on disk
    store["chunk_done"][index] = 1


_DRAW_DIMS = ("galaxy", "chain", "draw")
_STATS = ("log_prior", "log_likelihood", "acceptance_rate", "tau", "rhat", "converged", "usable")


# ----------------------------------------------------------------------------- the store

def _layout(job: _Job, names, n_chain: int, n_draw: int, galaxy_id):
    """The store as a DataTree of lazy fill arrays (nothing is computed when written with compute=False)."""
    import dask.array as da
    import xarray as xr

    from popflow.summary import QUANTILES, Z_GRID

    n, cs = job.n_galaxies, job.chunk_size

    def full(shape, dtype, fill):
        return da.full(shape, fill, dtype=dtype, chunks=(cs,) + shape[1:])

    draws = lambda: (_DRAW_DIMS, full((n, n_chain, n_draw), np.float32, np.nan))  # noqa: E731
    per_gal = lambda dtype=np.float32, fill=np.nan: (("galaxy",), full((n,), dtype, fill))  # noqa: E731
    n_chunks = -(-n // cs)
    root = xr.Dataset({"chunk_done": (("chunk",), da.zeros(n_chunks, dtype=np.int8, chunks=1))},
                      coords={"galaxy_id": (("galaxy",), galaxy_id)})
    posterior = xr.Dataset({p: draws() for p in names})
    stats = xr.Dataset({"log_prior": draws(), "log_likelihood": draws(),
                        **{k: per_gal() for k in ("acceptance_rate", "tau", "rhat")},
                        "converged": per_gal(bool, False), "usable": per_gal(bool, False)})
    summary = xr.Dataset(
        {**{f"{p}_q": (("galaxy", "quantile"), full((n, QUANTILES.size), np.float32, np.nan)) for p in names},
         "pz": (("galaxy", "z_grid"), full((n, Z_GRID.size), np.float32, np.nan)),
         "z_median": per_gal(), "z_mode": per_gal()},
        coords={"quantile": QUANTILES, "z_grid": Z_GRID.astype(np.float32)})
    return xr.DataTree.from_dict({"/": root, "/posterior": posterior, "/sample_stats": stats, "/summary": summary})


def _encoding(tree) -> dict:
    from zarr.codecs import BloscCodec

    comp = [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    enc = {}
    for node in tree.subtree:
        path = node.path
        enc[path] = {}
        for name, var in node.to_dataset(inherit=False).variables.items():
            if name in ("quantile", "z_grid"):
                continue
            fill = {"f": np.nan, "b": False}.get(var.dtype.kind, -1 if name == "galaxy_id" else 0)
            enc[path][name] = {"compressors": comp, "fill_value": fill}
    return enc


def _create_store(job: _Job, identity: dict, names, n_chain: int, n_draw: int, galaxy_id) -> None:
    import xarray as xr
    import zarr

    tree = _layout(job, names, n_chain, n_draw, galaxy_id)
    tree.to_zarr(job.store, mode="w", consolidated=False, compute=False, encoding=_encoding(tree))
    # galaxy ids are copied chunk by chunk from the catalogue (dask), never held whole
    xr.Dataset(coords={"galaxy_id": ("galaxy", galaxy_id)}).to_zarr(
        job.store, region={"galaxy": slice(None)}, mode="r+", consolidated=False)
    zarr.open_group(job.store, mode="r+").attrs.update(identity)  # last: marks the layout complete


def _read_identity(store: Path) -> dict | None:
    """The identity attrs of an existing store; None when there is no complete layout."""
    import zarr

    if not store.exists():
        return None
    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception:  # noqa: BLE001 - not a readable Zarr group: treated as an interrupted layout
        return None
    return attrs if all(k in attrs for k in IDENTITY_KEYS) else None


def _check_identity(store: Path, old: dict, new: dict) -> None:
    diff = [k for k in COMPARED_KEYS if _canonical(old.get(k)) != _canonical(new.get(k))]
    if diff:
        lines = "\n".join(f"  {k}: store has {_short(old.get(k))}, this run has {_short(new.get(k))}" for k in diff)
        raise StoreMismatchError(
            f"posterior store {store} was made with other inputs:\n{lines}\n"
            "refusing to mix them; use another --out, or --overwrite to discard the store and refit")


def _canonical(v):
    return json.dumps(v, sort_keys=True)


def _short(v, n: int = 120) -> str:
    s = _canonical(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def open_posterior(path, prior=None):
    """Open a posterior store lazily as an xarray DataTree (dask arrays; groups posterior, sample_stats, summary).

    Galaxies of chunks that are not done yet (``chunk_done == 0``) read as NaN / False.
    ``prior`` (an object, shipped name or artifact folder): a view importance-reweighted to that
    prior, still lazy (:func:`popflow.reweight.reweighted`); the stored view when the draws were
    made under it.
    """
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"posterior store {path} does not exist (no zarr.json)")
    tree = xr.open_datatree(path, engine="zarr", consolidated=False, chunks={})
    if prior is None:
        return tree
    from popflow.reweight import reweighted

    if isinstance(prior, (str, os.PathLike)):
        prior = load_model(prior, "prior")
    return reweighted(tree, prior, source=str(path))


def write_posterior_tree(path, samples, names, sample_stats: dict, *, prior_id: str, galaxy_id, chunk: int):
    """Write in-memory draws as a complete store in this module's layout (every chunk marked done).

    ``samples`` (n_gal, n_chain, n_draw, dim) physical; ``sample_stats`` maps names to arrays shaped
    (n_gal, n_chain, n_draw) or (n_gal,); ``galaxy_id`` (n_gal,); ``chunk`` galaxies per Zarr chunk.
    For stores made outside :func:`fit_catalog` (tests, benchmarks, small in-memory fits).
    """
    import xarray as xr

    from popflow import summary

    dims = ("galaxy", "chain", "draw")
    n_chunks = -(-samples.shape[0] // chunk)
    root = xr.Dataset({"chunk_done": ("chunk", np.ones(n_chunks, np.int8))},
                      coords={"galaxy_id": ("galaxy", np.asarray(galaxy_id))}, attrs={"prior_id": prior_id})
    post = xr.Dataset({n: (dims, samples[..., i]) for i, n in enumerate(names)})
    stats_ = xr.Dataset({k: (dims if v.ndim == 3 else ("galaxy",), v) for k, v in sample_stats.items()})
    summ = summary.summary_dataset(summary.summarize(samples, names))
    tree = xr.DataTree.from_dict({"/": root, "/posterior": post, "/sample_stats": stats_, "/summary": summ})
    encoding = {node.path: {name: {"chunks": tuple(chunk if d == "galaxy" else 1 if d == "chunk" else var.sizes[d]
                                                   for d in var.dims)}
                            for name, var in node.to_dataset(inherit=False).variables.items() if name not in var.dims}
                for node in tree.subtree}
    tree.to_zarr(path, mode="w", consolidated=False, encoding=encoding)


# ----------------------------------------------------------------------------- the lock

@contextlib.contextmanager
def store_lock(store):
    """Hold ``<store>.lock`` (JSON: pid, host, started) for the duration; refuse if a live process holds it.

    A lock whose pid is dead on this host is stale (a killed run): it is removed, with a message.
    """
    lock = Path(str(Path(store)) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    tmp = lock.with_name(f"{lock.name}.{me['host']}.{me['pid']}")
    tmp.write_text(json.dumps(me))
    try:
        for attempt in range(2):
            try:
                os.link(tmp, lock)  # atomic: the lock appears complete or not at all
                break
            except FileExistsError:
                holder = _read_lock(lock)
                if attempt == 0 and holder and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    print(f"popflow: clearing stale lock {lock} left by pid {holder.get('pid')} "
                          f"(started {holder.get('started')}), which is no longer running", file=sys.stderr)
                    lock.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       if holder else "an unknown process (unreadable lock file)")
                raise StoreLockedError(
                    f"posterior store {store} is being written by {who} (lock file {lock}); wait for that run to "
                    "finish or stop it. If no run is active (e.g. it was killed on another host), delete the lock "
                    "file.") from None
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield lock
    finally:
        if (_read_lock(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but not ours, or unreadable: assume alive
    return True


# ----------------------------------------------------------------------------- the cluster

def worker_env(threads: int) -> dict[str, str]:
    """Environment for a worker process whose XLA and BLAS pools use ``threads`` threads.

    Also points JAX's persistent compilation cache at ``$JAX_COMPILATION_CACHE_DIR`` (default
    ``~/.cache/popflow/jax``), so a new worker process loads the compiled fit kernel from disk
    instead of compiling it again (tens of seconds on a busy 2-core machine).
    """
    t = str(int(threads))
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "popflow" / "jax")
    env = {"NPROC": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
           "JAX_COMPILATION_CACHE_DIR": cache}
    flags = os.environ.get("XLA_FLAGS", "")
    if int(threads) == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    return env


def _n_gpus() -> int:
    """GPUs JAX could use, counted without initialising a backend here (that would grab GPU memory)."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS", "").lower() == "cpu":
        return 0
    if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    import subprocess

    out = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


# Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers (to hand freed memory back to the OS); any
# explicit trim threshold also freezes glibc's mmap threshold at 128 KiB, which costs XLA's CPU buffers a page-fault
# storm. None drops the variable (distributed's ``_get_env_variables``).
NANNY_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(workers: int | None = None, threads: int | None = None, log: Callable = print):
    """The cluster ``popflow fit`` starts on this machine: one worker per GPU if JAX can use GPUs, else
    ``workers`` processes (default 1) x ``threads`` XLA/BLAS threads (default: cores / workers), one task at a
    time each, with the nanny's malloc setting left out (``NANNY_CONFIG``). Dashboard on port 8787 if free."""
    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    n_gpu = _n_gpus()
    with dask.config.set(NANNY_CONFIG):  # read by each Nanny when it is built, i.e. here
        if n_gpu:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(n_gpu)]
            specs = {f"gpu-{d}": {"cls": Nanny, "options": {"nthreads": 1, "env": {
                "CUDA_VISIBLE_DEVICES": d, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}}} for d in ids}
            log(f"popflow: {n_gpu} GPU(s) visible: one worker per GPU")
            return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":8787"}})
        workers = workers or 1
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, env=worker_env(threads),
                            dashboard_address=":8787")


# ----------------------------------------------------------------------------- the driver

def default_chunk_size(catalog_chunk: int, n_walkers: int, n_draws: int, dim: int) -> int:
    """The catalogue's chunk size, reduced so one chunk's draws stay near CHUNK_BYTES_TARGET."""
    per_galaxy = (dim + 2) * n_walkers * n_draws * 4  # posterior + log_prior + log_likelihood, float32
    return int(max(1, min(catalog_chunk, CHUNK_BYTES_TARGET // per_galaxy)))


def fit_catalog(catalog, out, *, emulator="lsst", prior=None, datamodel=None, settings=None, seed: int = 0,
                chunk_size: int | None = None, limit: int | None = None, client=None, scheduler: str | None = None,
                workers: int | None = None, threads: int | None = None, overwrite: bool = False,
                known_redshift: str | None = None, progress: bool = True, log: Callable = print) -> dict:
    """Fit every galaxy of a catalogue store into a posterior store, resumably (module docstring).

    Args:
        catalog: catalogue store (``popflow ingest`` output).
        out: posterior store to create or resume.
        emulator: shipped name, artifact folder, ``"module:factory"`` or an emulator object;
            restricted to the catalogue's filters.
        prior: same forms; default the :class:`~popflow.priors.AnalyticPrior`.
        datamodel: a :class:`~popflow.datamodel.DataModel`; default the emulator's error floor.
        settings: :class:`~popflow.fit.FitSettings` (default settings if None).
        seed: chunk i is fitted with ``fold_in(PRNGKey(seed), i)``.
        chunk_size: galaxies per task and per store chunk (default :func:`default_chunk_size`).
        limit: fit only the first ``limit`` galaxies.
        client: a ``distributed.Client`` to use; else ``scheduler`` (address of a running
            scheduler); else a LocalCluster of ``workers`` processes x ``threads`` XLA threads.
        overwrite: discard an existing store made with other inputs.
        known_redshift: a catalogue variable (e.g. ``"z_spec"``) of known redshifts: those galaxies are
            fitted at it (the other parameters conditional on it; NaN rows as usual), e.g. a spectroscopic
            sample whose draws train a population prior.
        progress: tqdm bar over completed chunks.
        log: where messages go.

    Returns:
        ``{"store", "n_galaxies", "n_chunks", "chunk_size", "chunks_fitted", "chunks_skipped", "seconds",
        "galaxies_per_s", "dashboard"}``; galaxies_per_s counts the galaxies fitted in this call.
    """
    import xarray as xr

    from popflow import __version__
    from popflow.catalog import open_catalog
    from popflow.datamodel import DataModel
    from popflow.fit import FitSettings

    catalog, out = Path(catalog), Path(out)
    cat = open_catalog(catalog)
    filters = tuple(cat.attrs["filters"])
    n = cat.sizes["galaxy"] if limit is None else min(int(limit), cat.sizes["galaxy"])
    if n < 1:
        raise ValueError(f"catalogue {catalog} has no galaxies to fit")
    settings = settings or FitSettings()
    if prior is None:
        from popflow.priors import AnalyticPrior

        prior = AnalyticPrior()
    emu_ref, emu = _model_ref(emulator, "emulator")
    prior_ref, prior = _model_ref(prior, "prior")
    selected = emu.select(filters)
    datamodel = datamodel or DataModel.from_emulator(selected)
    names = tuple(prior.space.names)
    if chunk_size is None:
        chunk_size = default_chunk_size(int(cat.attrs.get("chunk_size", n)), settings.n_walkers, settings.n_draws,
                                        len(names))
    chunk_size = min(int(chunk_size), n)
    use_field = datamodel.n_fields is not None
    if use_field and "field" not in cat:
        raise ValueError(f"the data model has per-field zero points but catalogue {catalog} has no 'field' variable")
    if known_redshift is not None and known_redshift not in cat:
        raise ValueError(f"known_redshift={known_redshift!r}: catalogue {catalog} has no such variable "
                         f"(it has {', '.join(sorted(cat.data_vars))})")

    identity = {
        "prior_id": prior_ref.id, "emulator_id": emu_ref.id, "datamodel": datamodel.to_dict(),
        "settings": settings.to_dict(), "seed": int(seed), "catalog_sha256": cat.attrs.get("source_sha256"),
        "chunk_size": chunk_size, "n_galaxies": n, "parameters": list(names), "filters": list(filters),
        "known_redshift": known_redshift,
    }
    token = hashlib.sha256(_canonical({**identity, "emulator": emu_ref.spec, "prior": prior_ref.spec}).encode()).hexdigest()
    job = _Job(str(catalog.resolve()), str(out.resolve()), token, emu_ref, prior_ref, filters,
               datamodel.to_dict(), settings.to_dict(), int(seed), chunk_size, n, use_field, known_redshift)
    n_chunks = -(-n // chunk_size)

    with store_lock(out):
        old = _read_identity(out)
        if old is not None:
            try:
                _check_identity(out, old, identity)
            except StoreMismatchError:
                if not overwrite:
                    raise
                log(f"popflow: --overwrite: discarding {out}")
                old = None
        if old is None:
            if out.exists():
                shutil.rmtree(out)
            _create_store(job, {**identity, "popflow_version": __version__, "catalog": str(catalog.resolve())},
                          names, settings.n_walkers, settings.n_draws, cat["galaxy_id"].data[:n].rechunk(chunk_size))
        else:
            for tmp in out.rglob("*.partial"):  # Zarr's temporary files of a write a killed run left unfinished
                tmp.unlink()
        done = xr.open_zarr(out, consolidated=False, chunks=None)["chunk_done"].values
        pending = [i for i in range(n_chunks) if not done[i]]
        log(f"popflow: {out}: {n} galaxies in {n_chunks} chunks of {chunk_size}; "
            f"{n_chunks - len(pending)} already done, {len(pending)} to fit")
        stats = {"store": str(out), "n_galaxies": n, "n_chunks": n_chunks, "chunk_size": chunk_size, "chunks_fitted": 0,
                 "chunks_skipped": n_chunks - len(pending), "seconds": 0.0, "galaxies_per_s": float("nan"),
                 "dashboard": None}
        if not pending:
            return stats
        with contextlib.ExitStack() as stack:
            client = client or stack.enter_context(_client(scheduler, workers, threads, log))
            stats["dashboard"] = client.dashboard_link
            log(f"popflow: dashboard {client.dashboard_link}")
            _run_tasks(client, job, pending, stats, progress, log)
    return stats


@contextlib.contextmanager
def _client(scheduler, workers, threads, log):
    from distributed import Client

    if scheduler:
        log(f"popflow: connecting to scheduler {scheduler}")
        with Client(scheduler) as client:
            yield client
        return
    with local_cluster(workers, threads, log) as cluster, Client(cluster) as client:
        yield client


def _run_tasks(client, job: _Job, pending, stats: dict, progress: bool, log: Callable) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    futures = [client.submit(_fit_chunk_task, job, i, pure=False) for i in pending]
    failed, fitted_galaxies = [], 0
    with tqdm(total=sum(job.chunk_bounds(i)[1] - job.chunk_bounds(i)[0] for i in pending), unit="gal",
              desc="fit", disable=not progress) as bar:
        for fut in as_completed(futures):
            try:
                r = fut.result()
            except Exception as err:  # noqa: BLE001 - collected and reported together below
                failed.append(str(err))
                continue
            finally:
                fut.release()
            bar.update(r["n"])
            if r["skipped"]:
                stats["chunks_skipped"] += 1
            else:
                stats["chunks_fitted"] += 1
                fitted_galaxies += r["n"]
    stats["seconds"] = time.perf_counter() - t0
    stats["galaxies_per_s"] = fitted_galaxies / stats["seconds"] if fitted_galaxies else float("nan")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pending)} chunks failed (the others are saved; fix the cause and "
                           "re-run to resume):\n  " + "\n  ".join(failed))
    log(f"popflow: fitted {fitted_galaxies} galaxies in {stats['seconds']:.1f} s "
        f"({stats['galaxies_per_s']:.1f} galaxies/s); store {job.store}")
