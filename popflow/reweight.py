"""Importance reweighting of stored posteriors to a new population prior.

Draws ``theta_s`` of galaxy g were made under the prior ``p_old``; under a
new prior ``p_new`` the same draws are an importance sample with

    log w_s = log p_new(theta_s) - log p_old(theta_s)

(the likelihood cancels), self-normalised per galaxy (SCIENCE.md,
"Importance reweighting"). Both log-priors are densities in PHYSICAL
coordinates, normalised over the same parameter box: the stored
``log_prior`` is ``prior.log_prob(theta)`` of the prior the chains were drawn
under, and the new one is evaluated the same way.

How far the weights can be trusted is measured per galaxy by Kish's
effective sample size, ``ESS = (sum w)^2 / sum w^2`` (Kish 1965), and by the
Pareto k-hat of the weights' upper tail (PSIS; Vehtari, Simpson, Gelman, Yao
& Gabry 2024, JMLR 25, 72): k-hat > 0.7 means the weights cannot be trusted
and the galaxy should be re-fitted under the new prior.

The functional core (this section) is plain NumPy: log-weights,
normalisation, ESS and k-hat over the trailing ``(chain, draw)`` axes (a
chunk of galaxies at a time; NumPy needs no compilation, which a jitted core
added to every cold run). Only the new prior is evaluated with JAX. The
shell below it maps the core over a posterior store's galaxy chunks: lazily
with dask, or eagerly into the store.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from scipy.special import logsumexp, softmax

from popflow import summary

__all__ = [
    "log_importance_weights",
    "normalize_log_weights",
    "resample_draws",
    "kish_ess",
    "pareto_khat",
    "pareto_tail_length",
    "PriorEvaluator",
    "reweight_dataset",
    "reweighted",
    "materialize_weights",
    "refit_low_ess",
    "KHAT_THRESHOLD",
]

KHAT_THRESHOLD = 0.7
"""PSIS k-hat above which importance weights are unreliable (Vehtari et al. 2024, sec. 3.2.4)."""

_DRAW_AXES = (-2, -1)


def log_importance_weights(log_prior_new, log_prior_old) -> np.ndarray:
    """Unnormalised log importance weights ``log p_new - log p_old``; (...) -> (...) float32.

    A draw the old prior gives zero density (``log_prior_old = -inf``) cannot
    come from a chain drawn under it: its weight is NaN, which marks the whole
    galaxy as untrustworthy after normalisation. NaN inputs (draws of
    unusable galaxies) stay NaN. A draw outside the new prior's support gets
    weight zero (``-inf``).
    """
    new = np.asarray(log_prior_new, np.float32)
    old = np.asarray(log_prior_old, np.float32)
    with np.errstate(invalid="ignore"):
        return np.where(old == -np.inf, np.nan, new - old)



def resample_draws(draws, log_w, *, seed: int = 0) -> np.ndarray:
    """Each galaxy's draws resampled by their importance weights, pooled: one EM step of a population density.

    ``draws`` (G, S, dim) physical, made under ``p_old``; ``log_w`` (G, S) their log weights toward
    ``p_new`` (:func:`log_importance_weights`, unnormalised). Each galaxy's S draws are resampled with
    replacement by its self-normalised weights, so they become draws of its posterior under ``p_new``.
    Pooled, they are the EM update ``mean_g p(theta | d_g, p_new)`` of a free-form population density:
    pooling posteriors under a broad prior gives the population convolved with the posteriors' width,
    and each step deconvolves more of it. Galaxies with no usable weight (all zero, or any NaN) are
    dropped. Returns (n, dim), n <= G S.
    """
    draws = np.asarray(draws, np.float32)
    if draws.ndim != 3 or np.shape(log_w) != draws.shape[:2]:
        raise ValueError(f"resample_draws: draws {draws.shape} must be (G, S, dim) and log_w {np.shape(log_w)} (G, S)")
    lw = normalize_log_weights(log_w, axis=-1)
    ok = np.any(np.isfinite(lw), axis=-1) & ~np.any(np.isnan(lw), axis=-1)
    cdf = np.cumsum(np.exp(lw[ok], dtype=np.float64), axis=-1)
    u = np.random.default_rng(seed).random(cdf.shape) * cdf[:, -1:]
    idx = np.minimum([np.searchsorted(c, uu, side="right") for c, uu in zip(cdf, u)], draws.shape[1] - 1)  # (G_ok, S)
    return np.take_along_axis(draws[ok], idx[..., None], axis=1).reshape(-1, draws.shape[2])

def _logsumexp(a, axis, keepdims=False):
    """``log sum exp`` over ``axis``: ``-inf`` when every term is ``-inf``, NaN when any is NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return logsumexp(a, axis=axis, keepdims=keepdims)


def normalize_log_weights(log_w, axis=_DRAW_AXES) -> np.ndarray:
    """Self-normalise log-weights over ``axis`` (default: chain, draw) so that ``sum exp = 1``.

    log_w (..., chain, draw) -> same shape, float32. A galaxy whose draws all
    have zero weight under the new prior gets ``-inf`` everywhere (no draw
    survives); any NaN makes the whole galaxy NaN.
    """
    log_w = np.asarray(log_w, np.float32)
    total = _logsumexp(log_w, axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.where(total == -np.inf, -np.inf, log_w - total).astype(np.float32)


def kish_ess(log_w, axis=_DRAW_AXES) -> np.ndarray:
    """Kish effective sample size ``(sum w)^2 / sum w^2``; (..., chain, draw) -> (...) float32.

    Accepts normalised or unnormalised log-weights. Zero when every weight is
    zero, NaN when any is NaN. Equal weights give the number of draws.
    """
    log_w = np.asarray(log_w, np.float32)
    a = _logsumexp(log_w, axis)
    b = _logsumexp(2.0 * log_w, axis)
    with np.errstate(invalid="ignore"):
        return np.where(a == -np.inf, 0.0, np.exp(2.0 * a - b)).astype(np.float32)


def pareto_tail_length(n_draws: int, r_eff: float = 1.0) -> int:
    """Draws in the fitted upper tail: ``ceil(min(0.2 S, 3 sqrt(S / r_eff)))`` (Vehtari et al. 2024, sec. 3.1)."""
    return int(math.ceil(min(0.2 * n_draws, 3.0 * math.sqrt(n_draws / r_eff))))


def _gpd_khat(x: np.ndarray) -> np.ndarray:
    """Shape k of a generalised Pareto fitted to exceedances ``x`` (..., n), ascending, x[..., -1] > 0.

    Zhang & Stephens (2009) profile-likelihood posterior mean of ``b = -k / sigma``,
    then the weakly informative prior of Vehtari et al. (2024, appendix C) that
    shrinks k towards 0.5 with weight 10 draws.
    """
    n = x.shape[-1]
    m = 30 + int(math.sqrt(n))
    j = np.arange(1, m + 1, dtype=np.float64)
    x_max = x[..., -1:]
    # The first quartile of the tail sets the grid's spread. Ties at the cutoff give zero
    # exceedances; use the smallest positive one then, so that b stays finite.
    positive_min = np.min(np.where(x > 0, x, np.inf), axis=-1, keepdims=True)
    q1 = x[..., int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]
    q1 = np.where(q1 > 0, q1, positive_min)
    b = 1.0 / x_max + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * q1)  # (..., m)
    k = np.mean(np.log1p(-b[..., :, None] * x[..., None, :]), axis=-1)  # (..., m)
    profile = n * (np.log(-b / k) - k - 1.0)
    post = softmax(profile, axis=-1)
    b_post = np.sum(b * post, axis=-1, keepdims=True)
    k_post = np.mean(np.log1p(-b_post * x), axis=-1)
    return (n * k_post + 10.0 * 0.5) / (n + 10.0)


def pareto_khat(log_w, r_eff: float = 1.0) -> np.ndarray:
    """PSIS Pareto k-hat of the importance weights per galaxy; (..., chain, draw) -> (...) float32.

    Fits a generalised Pareto distribution to the largest
    :func:`pareto_tail_length` weights (exceedances over the next largest),
    as in Vehtari et al. (2024). ``r_eff`` is the relative efficiency of the
    draws (1 for independent draws; MCMC draws thinned to about one per
    autocorrelation time are close to it). Returns ``-inf`` when the tail is
    flat (all top weights equal: bounded weights, e.g. an unchanged prior),
    ``inf`` when every weight is zero, NaN when any weight is NaN.
    """
    log_w = np.asarray(log_w, np.float32)
    flat = log_w.reshape(log_w.shape[:-2] + (-1,))
    s = flat.shape[-1]
    m = pareto_tail_length(s, r_eff)
    if m < 5 or m + 1 > s:
        raise ValueError(f"pareto_khat needs a tail of at least 5 of {s} draws (got {m}); store more draws per galaxy")
    top = np.sort(np.partition(flat, s - m - 1, axis=-1)[..., s - m - 1 :], axis=-1)  # the m + 1 largest, ascending
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shift = top[..., -1:].astype(np.float64)
        w = np.exp(top - np.where(np.isfinite(shift), shift, 0.0))
        x = w[..., 1:] - w[..., :1]  # exceedances over the cutoff, ascending
        flat_tail = x[..., -1] <= 0
        k = _gpd_khat(np.where(flat_tail[..., None], 1.0, x))
    k = np.where(flat_tail, -np.inf, k)
    k = np.where(shift[..., 0] == -np.inf, np.inf, k)
    return np.where(np.any(np.isnan(flat), axis=-1), np.nan, k).astype(np.float32)


# --- the lazy shell: posterior stores -------------------------------------------------------------
#
# A posterior store (DESIGN.md, "Stores") holds /posterior (one variable per parameter, dims
# galaxy, chain, draw), /sample_stats/log_prior (the log-density of the prior the chains were drawn
# under, physical coordinates) and the root attribute ``prior_id``. Reweighting adds, per prior id,
#
#   /weights/<prior_id>: log_weight (galaxy, chain, draw), self-normalised; ess, khat (galaxy);
#                        the weighted summaries of popflow.summary (<name>_q, pz, z_median, z_mode)
#
# lazily in a view (``reweighted``), or materialised into the store chunk by chunk
# (``materialize_weights``, with per-chunk completion markers ``chunk_done``). Galaxies whose ESS is
# too low are re-fitted under the new prior (``refit_low_ess``): their draws go to
# /refit/<prior_id> (dim ``refit``, coordinate ``galaxy_index``), their summaries replace the
# weighted ones in /weights/<prior_id>, and /weights/<prior_id>/refitted (galaxy,) marks them.

LOG_WEIGHT = "log_weight"
CHUNK_DONE = "chunk_done"
WEIGHTS_GROUP = "weights"
SAMPLED_PRIOR_ATTR = "sampled_prior_id"
VIEW_ATTR = "weights_prior_id"


_JITTED_LOG_PROB: dict = {}  # prior id -> jitted log_prob, per process (the id is a content hash)


class PriorEvaluator:
    """``prior.log_prob`` on NumPy arrays, in fixed-size blocks so that it compiles once.

    theta (..., dim) physical -> (...) float32. Rows with a non-finite
    coordinate (draws of unusable galaxies) give NaN without reaching the
    prior. Picklable (the compiled function is rebuilt in each process), so a
    dask.distributed worker can run it.
    """

    def __init__(self, prior, block_size: int = 8192):
        self.prior = prior
        self.block_size = int(block_size)
        self._fn = None

    def __getstate__(self):
        return {"prior": self.prior, "block_size": self.block_size, "_fn": None}

    def __call__(self, theta) -> np.ndarray:
        space = self.prior.space
        theta = np.asarray(theta, np.float32)
        if theta.shape[-1] != space.dim:
            raise ValueError(f"PriorEvaluator: theta has {theta.shape[-1]} parameters, the prior {self.prior.id} has {space.dim}")
        if self._fn is None:
            self._fn = _JITTED_LOG_PROB.setdefault(self.prior.id, jax.jit(self.prior.log_prob))
        flat = theta.reshape(-1, space.dim)
        ok = np.all(np.isfinite(flat), axis=-1)
        centre = 0.5 * (space.lower + space.upper)
        n, b = flat.shape[0], self.block_size
        padded = np.broadcast_to(centre, (-(-n // b) * b, space.dim)).copy()
        padded[:n] = np.where(ok[:, None], flat, centre)
        out = np.concatenate([np.asarray(self._fn(padded[i : i + b])) for i in range(0, padded.shape[0], b)])[:n]
        return np.where(ok, out, np.nan).astype(np.float32).reshape(theta.shape[:-1])


def _reweight_arrays(theta, log_prior_old, *, evaluator: PriorEvaluator, names) -> dict:
    """One galaxy chunk: draws theta (galaxy, chain, draw, dim) physical and the stored log_prior
    (galaxy, chain, draw) -> {name: array} for every variable of :func:`reweight_dataset`.
    """
    lw = normalize_log_weights(log_importance_weights(evaluator(theta), log_prior_old))
    return {LOG_WEIGHT: lw, "ess": kish_ess(lw), "khat": pareto_khat(lw),
            **summary.summarize(theta, names, weights=np.exp(lw))}


def _reweight_block(block, *, evaluator: PriorEvaluator, names, log_prior: str):
    """:func:`_reweight_arrays` on one galaxy chunk of :func:`reweight_dataset` (inside a dask task)."""
    import xarray as xr

    theta = np.stack([block[n].values for n in names], axis=-1)
    out = _reweight_arrays(theta, block[log_prior].values, evaluator=evaluator, names=names)
    coords = {k: c for k, c in block.coords.items() if set(c.dims) <= {"galaxy", "chain", "draw"}}
    coords.update(quantile=summary.QUANTILES, z_grid=summary.Z_GRID.astype(np.float32))
    return xr.Dataset({k: (_weight_dims(k), v) for k, v in out.items()}, coords=coords)


def _weight_dims(name: str) -> tuple[str, ...]:
    if name == LOG_WEIGHT:
        return ("galaxy", "chain", "draw")
    return ("galaxy", "quantile") if name.endswith("_q") else ("galaxy", "z_grid") if name == "pz" else ("galaxy",)


def _weight_variables(n_gal: int, n_chain: int, n_draw: int, names) -> dict:
    """{name: (dims, shape)} of every float32 variable of :func:`reweight_dataset`."""
    sizes = {"galaxy": n_gal, "chain": n_chain, "draw": n_draw, "quantile": summary.QUANTILES.size,
             "z_grid": summary.Z_GRID.size}
    variables = [LOG_WEIGHT, "ess", "khat", *(f"{n}_q" for n in names), "pz", "z_median", "z_mode"]
    return {v: (_weight_dims(v), tuple(sizes[d] for d in _weight_dims(v))) for v in variables}


def _weights_template(n_gal: int, n_chain: int, n_draw: int, g_chunks, names):
    """The variables of :func:`reweight_dataset` as uncomputed dask arrays (shapes, dtypes, chunks only)."""
    import dask.array as da
    import xarray as xr

    data = {}
    for v, (dims, shape) in _weight_variables(n_gal, n_chain, n_draw, names).items():
        chunks = tuple(g_chunks if d == "galaxy" else n for d, n in zip(dims, shape))
        data[v] = (dims, da.empty(shape, dtype=np.float32, chunks=chunks))
    return xr.Dataset(data, coords={"quantile": summary.QUANTILES, "z_grid": summary.Z_GRID.astype(np.float32)})


def reweight_dataset(posterior, log_prior_old, prior, *, names=None, block_size: int = 8192):
    """Lazy importance weights and weighted summaries under ``prior``; computes nothing.

    posterior: Dataset with one variable per parameter, dims (galaxy, chain, draw),
    physical coordinates, dask-backed (chunked along galaxy). log_prior_old:
    DataArray (galaxy, chain, draw), the log-density of the prior the draws were
    made under (physical coordinates, normalised over the same box). Returns a
    dask-backed Dataset, one task per galaxy chunk: ``log_weight`` (galaxy,
    chain, draw) self-normalised, ``ess`` and ``khat`` (galaxy,), and the weighted
    summaries of :func:`popflow.summary.summarize` (``<name>_q`` (galaxy,
    quantile), ``pz`` (galaxy, z_grid), ``z_median``, ``z_mode``).
    """
    import xarray as xr

    names = tuple(prior.space.names if names is None else names)
    missing = [n for n in names if n not in posterior.data_vars]
    if missing:
        raise KeyError(f"posterior has no variable for parameter(s) {', '.join(missing)} of prior {prior.id}; "
                       f"it has: {', '.join(map(str, posterior.data_vars))}")
    log_prior = "__log_prior_old"
    inputs = posterior[list(names)].assign({log_prior: log_prior_old})
    if not all(inputs[v].chunks for v in inputs.data_vars):
        inputs = inputs.chunk({"galaxy": "auto"})
    g_chunks = inputs[log_prior].chunks[inputs[log_prior].dims.index("galaxy")]
    inputs = inputs.chunk({"galaxy": g_chunks, "chain": -1, "draw": -1})
    lp = inputs[log_prior]
    template = _weights_template(lp.sizes["galaxy"], lp.sizes["chain"], lp.sizes["draw"], g_chunks, names)
    template = template.assign_coords({k: c for k, c in inputs.coords.items() if set(c.dims) <= {"galaxy", "chain", "draw"}})
    return xr.map_blocks(_reweight_block, inputs, template=template,
                         kwargs={"evaluator": PriorEvaluator(prior, block_size), "names": names, "log_prior": log_prior})


def _check_space(prior, posterior, source: str):
    missing = [n for n in prior.space.names if n not in posterior.data_vars]
    if missing:
        raise ValueError(f"{source}: the new prior {prior.id} has parameter(s) {', '.join(missing)} that the posterior "
                         f"store does not (it has {', '.join(map(str, posterior.data_vars))}); reweighting needs the same space")


def _stored_weights(dt, prior_id: str, sampled_id: str):
    """The materialised ``/weights/<prior_id>`` group as a Dataset, or None when absent or incomplete."""
    path = f"{WEIGHTS_GROUP}/{prior_id}"
    try:
        node = dt[path]
    except KeyError:
        return None
    if not node.attrs.get("complete") or node.attrs.get(SAMPLED_PRIOR_ATTR) != sampled_id:
        return None
    return node.to_dataset(inherit=False).drop_vars(CHUNK_DONE, errors="ignore")


def reweighted(dt, prior, *, source: str = "posterior"):
    """A lazily reweighted view of a posterior DataTree under ``prior``; reads no chunk.

    When ``prior.id`` equals the tree's ``prior_id`` (the draws were made under
    it) the tree is returned unchanged. Otherwise the view has:
    ``/weights/<prior.id>`` with ``log_weight``, ``ess``, ``khat`` and the
    weighted summaries (the materialised group when :func:`materialize_weights`
    has completed it, else dask-backed computations), ``/summary`` with the
    weighted summaries in place of the stored ones, and the root attribute
    ``weights_prior_id`` naming the prior the summaries are under (``prior_id``
    still names the prior of the draws). ``source`` names the store in errors.
    """
    import xarray as xr

    attrs = dict(dt.attrs)
    if VIEW_ATTR in attrs:
        raise ValueError(f"{source}: already a view reweighted to prior {attrs[VIEW_ATTR]}; reweight the stored posterior instead")
    sampled = attrs.get("prior_id")
    if sampled is None:
        raise ValueError(f"{source}: no 'prior_id' attribute, so the prior of its draws is unknown and cannot be divided out")
    if prior.id == sampled:
        return dt
    for group, var in (("posterior", None), ("sample_stats", "log_prior")):
        if group not in dt.children or (var is not None and var not in dt[group].data_vars):
            raise KeyError(f"{source}: no /{group}{'/' + var if var else ''} (not a popflow posterior store?)")
    posterior = dt["posterior"].to_dataset(inherit=False)
    _check_space(prior, posterior, source)
    weights = _stored_weights(dt, prior.id, sampled)
    if weights is None:
        weights = reweight_dataset(posterior, dt["sample_stats"]["log_prior"], prior)
    tree = {node.path: node.to_dataset(inherit=False) for node in dt.subtree}
    tree["/"] = tree["/"].assign_attrs({**attrs, VIEW_ATTR: prior.id})
    weighted_summary = [v for v in weights.data_vars if v not in (LOG_WEIGHT, "ess", "khat", "refitted")]
    stored_summary = tree.get("/summary", xr.Dataset())
    tree["/summary"] = xr.merge([stored_summary.drop_vars([v for v in weighted_summary if v in stored_summary]),
                                 weights[weighted_summary]], compat="override", join="override")
    tree[f"/{WEIGHTS_GROUP}/{prior.id}"] = weights
    return xr.DataTree.from_dict(tree)


def _create_weights_group(root, prior_id: str, shape: tuple[int, int, int], step: int, names, attrs: dict):
    """An empty ``/weights/<prior_id>`` group in the Zarr group ``root`` (replacing any there), through Zarr directly.

    Every variable of :func:`reweight_dataset` unwritten (NaN), chunked by ``step`` galaxies, with
    its dimension names, the coordinates ``quantile`` and ``z_grid``, and ``chunk_done`` (chunk,)
    zeros, one Zarr chunk per marker: what xarray reads as a Dataset. ``attrs`` on the group.
    """
    from zarr.codecs import BloscCodec

    comp = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    group = root.require_group(WEIGHTS_GROUP).create_group(prior_id, overwrite=True, attributes=attrs)
    for name, (dims, var_shape) in _weight_variables(*shape, names).items():
        chunks = tuple(step if d == "galaxy" else n for d, n in zip(dims, var_shape))
        group.create_array(name, shape=var_shape, chunks=chunks, dtype=np.float32, fill_value=np.nan, compressors=comp,
                           dimension_names=dims)
    for name, values in (("quantile", summary.QUANTILES), ("z_grid", summary.Z_GRID.astype(np.float32))):
        group.create_array(name, data=values, dimension_names=(name,))
    group.create_array(CHUNK_DONE, shape=(-(-shape[0] // step),), chunks=(1,), dtype=np.int8, fill_value=0,
                       compressors=comp, dimension_names=("chunk",))
    return group


def materialize_weights(path, prior, *, block_size: int = 8192, threads: int | None = None, progress: bool = True,
                        log=print) -> dict:
    """Write ``/weights/<prior.id>`` into the posterior store at ``path``, chunk by chunk, resumably.

    Each galaxy chunk of the store (the Zarr chunks of ``/sample_stats/log_prior``) is read,
    reweighted (:func:`_reweight_arrays`, the same function the lazy view maps over the chunks),
    written as its region of the group and only then marked done in the group's ``chunk_done``
    (one Zarr chunk per marker); a re-run skips marked chunks, so an interrupted run resumes
    where it stopped. The group is laid out and chunks are read and written through Zarr
    directly: nothing is planned by dask, and the only compilation is the new prior's, so the
    cost is the reads, one prior evaluation per draw, the weighted summaries of every parameter
    and the writes. ``threads`` chunks (default: one per core) are processed at once (NumPy's
    sorts, XLA and Zarr's codecs release the GIL), which also bounds the memory. The group's
    attributes ``prior_id``, ``sampled_prior_id`` and ``complete`` are written last. Holds the
    store's lock (:func:`popflow.pipeline.store_lock`), so it never runs while ``popflow fit``
    writes the same store. ``prior``: a prior object; ``block_size``: draws per prior evaluation
    (:class:`PriorEvaluator`). Returns ``{"group", "n_chunks", "chunks_done_now", "ess_median",
    "frac_khat_ok", "seconds"}``.
    """
    import time

    import zarr
    from tqdm.auto import tqdm

    from popflow.pipeline import store_lock

    path = Path(path)
    t0 = time.perf_counter()
    with store_lock(path):
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"posterior store {path} does not exist (no zarr.json)")
        root = zarr.open_group(path, mode="r+")
        sampled = root.attrs.get("prior_id")
        if sampled is None:
            raise ValueError(f"{path}: no 'prior_id' attribute (an interrupted fit layout?); finish the fit first")
        if prior.id == sampled:
            raise ValueError(f"{path}: the draws were made under prior {prior.id} already; there is nothing to reweight")
        if "chunk_done" in root and not bool(np.all(root["chunk_done"][:])):
            n_left = int(np.sum(root["chunk_done"][:] == 0))
            raise ValueError(f"{path}: {n_left} fit chunk(s) are not done; finish the fit (re-run popflow fit) before reweighting")
        if "posterior" not in root or "sample_stats/log_prior" not in root:
            raise KeyError(f"{path}: no /posterior or /sample_stats/log_prior (not a popflow posterior store?)")
        stored_names = sorted(k for k, _ in root["posterior"].arrays())
        missing = [n for n in prior.space.names if n not in stored_names]
        if missing:
            raise ValueError(f"{path}: the new prior {prior.id} has parameter(s) {', '.join(missing)} that the posterior "
                             f"store does not (it has {', '.join(stored_names)}); reweighting needs the same space")
        names = tuple(prior.space.names)
        log_prior = root["sample_stats/log_prior"]
        n_gal, n_chain, n_draw = log_prior.shape
        step = log_prior.chunks[0]
        bounds = list(range(0, n_gal, step)) + [n_gal]
        g_chunks = tuple(int(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:]))
        group = f"{WEIGHTS_GROUP}/{prior.id}"
        identity = {"prior_id": prior.id, SAMPLED_PRIOR_ATTR: sampled, "galaxy_chunks": list(g_chunks)}

        existing = dict(root[group].attrs) if group in root else None
        if existing is not None and any(existing.get(k) != v for k, v in identity.items()):
            log(f"popflow: {path}/{group} was made for other draws or chunks ({existing.get(SAMPLED_PRIOR_ATTR)}); rebuilding it")
            existing = None
        if existing is None:
            wgroup = _create_weights_group(root, prior.id, (n_gal, n_chain, n_draw), step, names,
                                           {**identity, "complete": False})
        else:
            wgroup = root[group]
        arrays = dict(wgroup.arrays())  # opened once: each lookup by name re-reads the array's metadata
        done_array = arrays[CHUNK_DONE]
        todo = [i for i, d in enumerate(done_array[:]) if not d]
        draws = [root[f"posterior/{n}"] for n in names]
        evaluator = PriorEvaluator(prior, block_size)

        def one_chunk(i: int) -> int:
            rows = slice(bounds[i], bounds[i + 1])
            theta = np.stack([a[rows] for a in draws], axis=-1)
            out = _reweight_arrays(theta, log_prior[rows], evaluator=evaluator, names=names)
            for name, values in out.items():
                arrays[name][rows] = values
            done_array[i] = 1  # the marker last: a chunk counts as done once its data are on disk
            return rows.stop - rows.start

        threads = max(1, min(threads or os.cpu_count() or 1, len(todo)))
        with tqdm(total=n_gal, initial=n_gal - sum(g_chunks[i] for i in todo), unit="gal",
                  desc="reweight", disable=not progress) as bar, ThreadPoolExecutor(threads) as pool:
            if todo:  # compile the prior once, before the threads need it
                evaluator(0.5 * (prior.space.lower + prior.space.upper))
            for n_done in pool.map(one_chunk, todo):  # at most `threads` chunks in memory at once
                bar.update(n_done)
        wgroup.attrs["complete"] = True
        ess, khat = arrays["ess"][:], arrays["khat"][:]
    if todo:
        log(f"popflow: reweighted {int(sum(g_chunks[i] for i in todo))} galaxies to prior {prior.id} into {path}/{group}")
    ok = np.isfinite(ess)
    return {"group": group, "n_chunks": len(g_chunks), "chunks_done_now": len(todo),
            "ess_median": float(np.median(ess[ok])) if ok.any() else float("nan"),
            "frac_khat_ok": float(np.mean(khat[ok] <= KHAT_THRESHOLD)) if ok.any() else float("nan"),
            "seconds": time.perf_counter() - t0}


REFIT_GROUP = "refit"


def refit_low_ess(posterior, catalog, prior, threshold: float, *, emulator, progress: bool = True, log=print) -> dict:
    """Re-fit, under ``prior``, the galaxies whose ESS after reweighting to it is below ``threshold``.

    The store's weights under ``prior`` are materialised first (:func:`materialize_weights`).
    Usable galaxies with ``ess < threshold`` are fitted again with the store's own data model,
    sampler settings and seed (chunk keys ``fold_in(PRNGKey(seed), n_chunks + b)``, distinct from
    the original fit's), in batches of the store's chunk size. Their draws go to
    ``/refit/<prior.id>`` (dim ``refit``; coordinates ``galaxy_index``, the position in the store,
    and ``galaxy_id``) with ``sample_stats``-like diagnostics; in ``/weights/<prior.id>`` their
    summaries are replaced by the re-fit's and ``refitted`` (galaxy,) records which were
    re-fitted, so the reweighted view (:func:`reweighted`) shows them. ``emulator``: an emulator
    object or spec (:func:`popflow.pipeline.load_model`) whose id matches the store's. Returns
    ``{"n_refitted", "galaxy_index", "seconds"}``.
    """
    import time

    import jax
    import xarray as xr
    import zarr

    from popflow.catalog import open_catalog
    from popflow.datamodel import DataModel
    from popflow.fit import FitSettings, fit_chunk
    from popflow.pipeline import load_model, open_posterior, store_lock

    path = Path(posterior)
    t0 = time.perf_counter()
    materialize_weights(path, prior, progress=progress, log=log)
    with store_lock(path):
        dt = open_posterior(path)
        attrs = dict(dt.attrs)
        emulator = load_model(emulator, "emulator") if isinstance(emulator, (str, Path)) else emulator
        if emulator.id != attrs.get("emulator_id"):
            raise ValueError(f"{path}: fitted with emulator {attrs.get('emulator_id')}, not {emulator.id}; "
                             "re-fits must use the store's emulator")
        cat = open_catalog(catalog)
        if cat.attrs.get("source_sha256") != attrs.get("catalog_sha256"):
            raise ValueError(f"{path}: fitted on catalogue sha256 {attrs.get('catalog_sha256')}, "
                             f"but {catalog} has {cat.attrs.get('source_sha256')}")
        group = f"{WEIGHTS_GROUP}/{prior.id}"
        wds = xr.open_zarr(path, group=group, consolidated=False)
        ess = wds["ess"].values
        usable = dt["sample_stats"]["usable"].values.astype(bool)
        idx = np.flatnonzero(usable & (ess < threshold))
        refit_group = f"{REFIT_GROUP}/{prior.id}"
        root = zarr.open_group(path, mode="r+")
        if refit_group in root and root[refit_group].attrs.get("complete") \
                and root[refit_group].attrs.get("threshold") == float(threshold):
            log(f"popflow: {path}/{refit_group} is complete ({len(idx)} galaxies below ESS {threshold}); nothing to do")
            return {"n_refitted": 0, "galaxy_index": idx, "seconds": time.perf_counter() - t0}
        log(f"popflow: {len(idx)} of {int(usable.sum())} usable galaxies have ESS < {threshold} under prior {prior.id}; re-fitting them")
        emulator = emulator.select(tuple(cat.attrs["filters"]))
        datamodel = DataModel.from_dict(attrs["datamodel"])
        settings = FitSettings.from_dict(attrs["settings"])
        chunk = int(attrs.get("chunk_size", max(len(idx), 1)))
        n_chunks = len(dt["chunk_done"]) if "chunk_done" in dt.data_vars else 0
        parts = []
        from tqdm.auto import tqdm

        for b, start in enumerate(tqdm(range(0, len(idx), chunk), desc="refit", disable=not progress)):
            rows = idx[start : start + chunk]
            sub = cat.isel(galaxy=rows)
            field = np.asarray(sub["field"].values, np.int32) if datamodel.n_fields is not None else None
            known = attrs.get("known_redshift")  # a store fitted at known redshifts is re-fitted at them too
            redshift = None if known is None else np.asarray(sub[known].values, np.float64)
            key = jax.random.fold_in(jax.random.PRNGKey(int(attrs.get("seed", 0))), n_chunks + b)
            parts.append(fit_chunk(key, sub["flux"].values, sub["flux_err"].values, sub["mask"].values, emulator=emulator,
                                   prior=prior, datamodel=datamodel, settings=settings, field=field, redshift=redshift,
                                   pad_to=chunk))
        names = prior.space.names
        dims = ("refit", "chain", "draw")
        if parts:
            res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            shape = (0, settings.n_walkers, settings.n_draws)
            res = {"samples": np.zeros(shape + (len(names),), np.float32),
                   **{k: np.zeros(shape, np.float32) for k in ("log_prior", "log_likelihood")},
                   **{k: np.zeros(0, np.float32) for k in ("acceptance_rate", "tau", "rhat")},
                   "converged": np.zeros(0, bool), "usable": np.zeros(0, bool)}
        out = xr.Dataset({**{n: (dims, res["samples"][..., i]) for i, n in enumerate(names)},
                          **{k: (dims if res[k].ndim == 3 else ("refit",), res[k]) for k in res if k != "samples"}},
                         coords={"galaxy_index": ("refit", idx), "galaxy_id": ("refit", dt["galaxy_id"].values[idx])})
        out.to_zarr(path, group=refit_group, mode="w", consolidated=False)
        # the re-fit's own summaries replace the weighted ones of those galaxies
        refitted = np.zeros(len(ess), bool)
        refitted[idx] = True
        # through zarr, not xarray: an xarray append would rewrite the group's attributes (its completion flag)
        wgroup = zarr.open_group(path, path=group, mode="r+")
        chunks = wgroup["ess"].chunks
        if "refitted" not in wgroup:
            wgroup.create_array("refitted", shape=(len(ess),), chunks=chunks, dtype=bool, fill_value=False,
                                dimension_names=["galaxy"])
        wgroup["refitted"][:] = refitted
        if len(idx):
            for name, values in summary.summarize(res["samples"], names).items():
                arr = zarr.open_array(path, path=f"{group}/{name}", mode="r+")
                arr.oindex[(idx,) + (slice(None),) * (values.ndim - 1)] = values
        zarr.open_group(path, path=refit_group, mode="r+").attrs.update(
            {"prior_id": prior.id, "threshold": float(threshold), "complete": True})
    return {"n_refitted": len(idx), "galaxy_index": idx, "seconds": time.perf_counter() - t0}
