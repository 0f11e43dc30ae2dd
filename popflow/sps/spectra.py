"""Rest-frame spectra of bagpipes models for the spectral emulator (issue 7, design b).

:class:`RestFrameSimulator` runs the same bagpipes model galaxy as
:class:`popflow.sps.bagpipes_model.BagpipesSimulator` (same parameter
mapping, same wavelength grid) and splits each model into the pieces the
spectral emulator (:mod:`popflow.emulator.spectral`) predicts, everything per
unit stellar mass formed and BEFORE the IGM:

- ``log_cont`` (n, n_pix): log10 of the rest-frame continuum L_lambda,
  Lsun/Angstrom, on a fixed rest grid ``wave`` (a slice of bagpipes' R = 100
  grid, 0.5 % pixels, from ``lambda_min / 7.05`` to ``lambda_max`` of the
  filters: every pixel a filter sees for z in [0, 6]); floored at
  :data:`LOG_FLOOR`. The continuum is bagpipes' full spectrum (stars, nebular
  continuum, dust, dust emission) minus every Cloudy emission line inside the grid.
- ``log_lines`` (n, n_lines): log10 line luminosities, Lsun, of every Cloudy line
  of bagpipes' grid that falls inside ``wave`` (floored at :data:`LOG_FLOOR`).
  bagpipes adds a line to the single pixel nearest its wavelength, with the
  pixel's continuum attenuation; the stored luminosity is exactly what that
  pixel receives (line attenuation corrected from bagpipes' A_line to the
  pixel's A_cont), and ``line_wave`` is that pixel's wavelength, so a delta
  function there reproduces the simulator exactly.
- The IGM (Inoue et al. 2014) is bagpipes' own table, stored as ``igm_table``
  (n_pix, n_igm_z) on the grid ``igm_z``, interpolated linearly in z as bagpipes does.

The simulator's photometry then follows analytically (in JAX,
:func:`popflow.emulator.spectral.photometry_mag`): observed f_lambda
``s = L (1 + z)^-1 Lsun / (4 pi D_L^2)`` times the IGM transmission,
integrated photon-counting through each filter as in ``BagpipesSimulator``.

``popflow sps spectra --n N --out spectra.zarr --seed S`` writes a
resumable store (:func:`simulate_spectra`); rows are the same proposal draws as
``popflow sps simulate`` with the same seed and chunk size, so a spectra store
and a magnitude store of equal (seed, chunk_size) hold identical models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from popflow import cosmology
from popflow.filters import AB_ZERO_POINT_MAG_NJY
from popflow.params import DEFAULT_SPACE
from popflow.sps import proposal as proposals
from popflow.sps.bagpipes_model import MAG_CAP, Z_MIN, BagpipesSimulator, _quiet, bagpipes_version, model_components

__all__ = ["RestFrameSimulator", "simulate_spectra", "read_spectra_store", "STORE_KIND", "LOG_FLOOR", "Z_MAX_GRID"]

STORE_KIND = "popflow-sps-spectra"
LOG_FLOOR = -20.0
"""Floor of log10 L (Lsun/A or Lsun): far below any flux a filter can register (cap: DM + 30 mag)."""
Z_MAX_GRID = 6.05
"""The rest grid starts at lambda_min / (1 + Z_MAX_GRID): complete for every filter up to z = 6.05."""
LSUN_ERG_S = 3.826e33  # bagpipes' L_sun
_MPC_CM = 3.085677581e24


class RestFrameSimulator:
    """Rest-frame continuum, line luminosities and simulator magnitudes of bagpipes models.

    Args: as :class:`BagpipesSimulator` (its filters fix bagpipes' wavelength grid:
    give the same filter list as the magnitude store the results are compared with).
    The wrapped bagpipes model has its IGM switched off (it is applied analytically), so
    its ``BagpipesSimulator`` is private: use :meth:`spectra`'s ``mag_unit``.
    """

    def __init__(self, filters: Sequence[str], search_path=None):
        self._sim = BagpipesSimulator(filters, search_path=search_path)
        from bagpipes import config

        model = self._sim._model
        full = self._sim._wave
        lo = min(f.wavelength[0] for f in self._sim.curves) / (1.0 + Z_MAX_GRID)
        hi = max(f.wavelength[-1] for f in self._sim.curves)
        self._sel = np.flatnonzero((full >= lo) & (full <= hi))
        self.wave = full[self._sel]
        self.width = self._sim._width[self._sel]
        # every Cloudy line bagpipes puts inside the grid (nearest pixel, as nebular._setup_grids does)
        pix = np.array([np.abs(full - lw).argmin() for lw in config.line_wavs])
        inside = (pix >= self._sel[0]) & (pix <= self._sel[-1]) & (pix > 0) & (pix < full.size - 1)
        self._line_idx = np.flatnonzero(inside)
        self._line_pix_full = pix[inside]
        self.line_names = tuple(str(config.line_names[i]) for i in self._line_idx)
        self.line_rest = np.asarray(config.line_wavs[self._line_idx], np.float64)
        self.line_pixel = self._line_pix_full - self._sel[0]  # index into wave
        self.line_wave = self.wave[self.line_pixel]
        self.igm_z = np.asarray(config.igm_redshifts, np.float64)
        self.igm_table = np.asarray(model.igm.grid[self._sel], np.float64)
        self._igm_trans = model.igm.trans
        model.igm.trans = lambda z: 1.0  # models are made before the IGM; it is applied analytically

    @property
    def filters(self):
        return self._sim.filters

    @property
    def curves(self):
        """The loaded :class:`popflow.filters.Filter` curves, in ``filters`` order."""
        return self._sim.curves

    def spectra(self, theta):
        """Pieces of each model: theta (n, dim) physical ->
        (log_cont (n, n_pix), log_lines (n, n_lines), mag_unit (n, n_filters)), float32.

        ``mag_unit`` is the simulator's unit-mass magnitude computed from the same
        bagpipes spectrum (identical to ``BagpipesSimulator.magnitudes``).
        """
        theta = self._sim.space.check(np.atleast_2d(theta), "theta")
        z = theta[:, self._sim.space.index("redshift")].astype(np.float64)
        if np.any(z.astype(np.float32) < np.float32(Z_MIN)):
            raise ValueError(f"theta: redshift below the simulator's floor Z_MIN = {Z_MIN}")
        model = self._sim._model
        dl_cm = np.asarray(cosmology.luminosity_distance(z), np.float64) * _MPC_CM
        n = theta.shape[0]
        log_cont = np.empty((n, self.wave.size), np.float32)
        log_lines = np.empty((n, self.line_pixel.size), np.float32)
        mags = np.empty((n, len(self._sim.curves)), np.float32)
        floor = 10.0 ** (-0.4 * (MAG_CAP - AB_ZERO_POINT_MAG_NJY))
        for i, row in enumerate(theta):
            comps = model_components(row, self._sim.space)
            with _quiet():
                model.update(comps)
            if model.sfh.unphysical:
                raise RuntimeError(f"bagpipes flagged row {i} (theta = {row.tolist()}) as unphysical")
            # rest-frame L_lambda per unit mass before the IGM, Lsun/A (undo bagpipes' flux scaling)
            lum = model.spectrum_full * model.lum_flux * (1.0 + z[i]) / LSUN_ERG_S
            # line luminosity (Lsun) as received by its pixel: bagpipes attenuates lines with A_line,
            # their pixel copies with A_cont at the pixel
            av_bc = comps["dust"]["eta"] * comps["dust"]["Av"]
            fix = 10.0 ** (-0.4 * av_bc * (model.dust_atten.A_cont[self._line_pix_full]
                                          - model.dust_atten.A_line[self._line_idx]))
            l_line = np.array([model.line_fluxes[name] for name in self.line_names])
            l_line = l_line * model.lum_flux / LSUN_ERG_S * fix
            cont = lum.copy()
            np.subtract.at(cont, self._line_pix_full, l_line / self._sim._width[self._line_pix_full])
            cont = cont[self._sel]
            log_cont[i] = np.log10(np.maximum(cont, 10.0**LOG_FLOOR))
            log_lines[i] = np.log10(np.maximum(l_line, 10.0**LOG_FLOOR))
            spectrum = model.spectrum_full * self._igm_trans(z[i]) * (model.lum_flux / (4.0 * np.pi * dl_cm[i] ** 2))
            mags[i] = AB_ZERO_POINT_MAG_NJY - 2.5 * np.log10(np.maximum(self._sim._photometry_njy(spectrum, z[i]), floor))
        return log_cont, log_lines, mags

    def grid_arrays(self) -> dict:
        """The fixed arrays of the decomposition (stored with every spectra store)."""
        return {"wave": self.wave, "width": self.width, "line_wave": self.line_wave, "line_rest": self.line_rest,
                "line_pixel": self.line_pixel, "igm_z": self.igm_z, "igm_table": self.igm_table}


# --- the store ---------------------------------------------------------------------------------------------------

def _worker(filters, search_path, chunk, theta):
    return (chunk, *_cached(tuple(filters), tuple(search_path)).spectra(theta))


_CACHE: dict = {}


def _cached(filters, search_path) -> RestFrameSimulator:
    key = (filters, search_path)
    if key not in _CACHE:
        _CACHE[key] = RestFrameSimulator(filters, search_path=list(search_path))
    return _CACHE[key]


def simulate_spectra(out, n: int, *, seed: int = 0, chunk_size: int = 1000, proposal: str = "wide",
                     band_sets: Sequence[str] | None = None, search_path=None, validation_fraction: float = 0.05,
                     workers: int = 1, max_chunks: int | None = None, progress: bool = True) -> Path:
    """Generate (or resume) ``n`` models' spectra in the Zarr store ``out``.

    Chunk ``k`` holds the proposal draws of :func:`popflow.sps.generate.chunk_theta` (seed, k):
    the same models as ``popflow sps simulate`` with this seed and chunk size. Arrays
    ``theta``, ``log_cont``, ``log_lines``, ``mag_unit``, ``is_validation``, ``chunk_done``
    (completion markers; unfinished rows read as NaN) and the fixed grid arrays of
    :meth:`RestFrameSimulator.grid_arrays`; a re-run resumes the missing chunks.
    """
    import concurrent.futures as cf
    import multiprocessing

    import zarr
    from tqdm.auto import tqdm

    from popflow.sps.generate import BAND_SETS, _resolve_filters, chunk_theta

    out = Path(out)
    filters, chosen = _resolve_filters(None, band_sets or list(BAND_SETS))
    search = tuple(str(p) for p in ([search_path] if isinstance(search_path, (str, os.PathLike))
                                    else (search_path or ())))
    spec = {"kind": STORE_KIND, "n_models": int(n), "chunk_size": int(chunk_size), "seed": int(seed),
            "proposal": proposals.describe(proposal, Z_MIN, 6.0), "filters": list(filters), "band_sets": chosen,
            "parameters": list(DEFAULT_SPACE.names), "bagpipes_version": bagpipes_version(),
            "validation_every": max(1, int(round(1.0 / validation_fraction))), "log_floor": LOG_FLOOR,
            "units": {"log_cont": "log10 Lsun/A per Msun formed, rest frame, before IGM",
                      "log_lines": "log10 Lsun per Msun formed, before IGM", "wave": "Angstrom rest"}}
    n_chunks = -(-n // chunk_size)
    if out.exists():
        root = zarr.open_group(str(out), mode="r+")
        for key in ("kind", "n_models", "chunk_size", "seed", "proposal", "filters"):
            if root.attrs.get(key) != spec[key]:
                raise ValueError(f"{out}: exists with a different {key}; use another --out")
    else:
        rfs = _cached(tuple(filters), search)
        root = zarr.open_group(str(out), mode="w", zarr_format=3)
        for name, arr in rfs.grid_arrays().items():
            root.create_array(name, data=np.asarray(arr))
        shapes = {"theta": DEFAULT_SPACE.dim, "log_cont": rfs.wave.size, "log_lines": rfs.line_pixel.size,
                  "mag_unit": len(filters)}
        for name, m in shapes.items():
            root.create_array(name, shape=(n, m), chunks=(chunk_size, m), dtype="float32", fill_value=np.nan)
        val = root.create_array("is_validation", shape=(n,), chunks=(chunk_size,), dtype="bool", fill_value=False)
        val[:] = np.arange(n) % spec["validation_every"] == 0
        root.create_array("chunk_done", shape=(n_chunks,), dtype="bool", fill_value=False)
        root.attrs.update({**spec, "line_names": list(rfs.line_names)})
    done = np.asarray(root["chunk_done"][:])
    todo = [k for k in range(n_chunks) if not done[k]][: max_chunks]
    bounds = {k: (k * chunk_size, min(n, (k + 1) * chunk_size)) for k in range(n_chunks)}
    bar = tqdm(total=n, initial=int(sum(bounds[k][1] - bounds[k][0] for k in range(n_chunks) if done[k])),
               unit="model", disable=not progress, desc=f"spectra -> {out.name}")
    thetas = {k: chunk_theta(seed, k, bounds[k][1] - bounds[k][0], spec["proposal"]) for k in todo}

    def write(k, log_cont, log_lines, mags):
        a, b = bounds[k]
        root["theta"][a:b] = thetas[k]
        root["log_cont"][a:b] = log_cont
        root["log_lines"][a:b] = log_lines
        root["mag_unit"][a:b] = mags
        root["chunk_done"][k] = True  # marker last
        bar.update(b - a)

    try:
        if workers == 1:
            for k in todo:
                write(*_worker(filters, search, k, thetas[k]))
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for fut in cf.as_completed([pool.submit(_worker, filters, search, k, thetas[k]) for k in todo]):
                    write(*fut.result())
    finally:
        bar.close()
    return out


def read_spectra_store(path, fields=("theta", "log_cont", "log_lines", "mag_unit", "is_validation"),
                       validation_only: bool = False) -> tuple[dict, dict]:
    """(arrays, attrs) of the completed chunks of a spectra store: ``fields`` (rows of done chunks,
    only the validation rows with ``validation_only``) and the grid arrays."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    if attrs.get("kind") != STORE_KIND:
        raise ValueError(f"{path}: not a popflow spectra store (kind = {attrs.get('kind')!r})")
    cs, n = int(attrs["chunk_size"]), int(attrs["n_models"])
    done = np.flatnonzero(root["chunk_done"][:])
    if done.size == 0:
        raise ValueError(f"{path}: no completed chunk yet")
    rows = np.concatenate([np.arange(k * cs, min(n, (k + 1) * cs)) for k in done])
    if validation_only:
        rows = rows[np.asarray(root["is_validation"][:])[rows]]
    out = {name: np.asarray(root[name].get_orthogonal_selection((rows,))) for name in fields}
    out.update({name: np.asarray(root[name][:]) for name in ("wave", "width", "line_wave", "line_rest", "line_pixel",
                                                             "igm_z", "igm_table")})
    return out, attrs
