"""The bagpipes simulator: a point of the parameter space -> unit-mass AB magnitudes.

One :class:`BagpipesSimulator` holds one ``bagpipes.model_galaxy`` (BC03 +
MILES stellar grids, Cloudy nebular grids, Inoue et al. 2014 IGM, Draine & Li
2007 dust emission; Carnall et al. 2018) built once and updated per model.

Mapping of theta (DEFAULT_SPACE, physical coordinates) to bagpipes components
---------------------------------------------------------------------------
- Mass: ``massformed = 0`` (one solar mass formed, "unit mass"). ``log_mass``
  is ignored by the simulator; the apparent magnitude of the model is
  ``mag_unit - 2.5 log_mass`` exactly (flux is linear in mass formed).
- SFH: bagpipes' ``continuity`` component (Leja et al. 2019) with 7 bins in
  lookback time rebuilt at each redshift by :func:`sfh_bin_edges`: 0-30 Myr,
  30-100 Myr, four bins log-spaced from 100 Myr to 0.85 t_univ(z), and
  [0.85, 1] t_univ(z). The oldest edge is capped at ``(1 - AGE_EPS) t_univ(z)``:
  bagpipes gives a zero stellar spectrum (with only a warning) if any star
  formed before the Big Bang; the simulator also raises if bagpipes ever flags
  the SFH as unphysical. bagpipes' ``dsfr{k}`` is log10 SFR(next younger bin) /
  SFR(older bin) counting from the oldest bin, so ``dsfr{k} = logsfr_ratio_{7-k}``
  (popflow's ratio i is log10 SFR(bin i) / SFR(bin i+1), bin 1 the youngest).
- Stellar metallicity: ``metallicity = 10**log_zstar`` (Z/Zsun, bagpipes'
  Zsun = 0.02), the same for every bin (interpolated linearly in Z between
  the BC03 grids by bagpipes).
- Nebular emission (Cloudy grid): ``logU = log_u`` and the gas-phase
  metallicity ``nebular.metallicity = 10**log_zgas`` (bagpipes >= 1.1 supports
  a nebular metallicity different from the stellar one: the ionising spectrum
  then also comes from stars of that metallicity, which is how bagpipes'
  grids are built). No Lyman-continuum escape (fesc = 0).
- Dust: bagpipes' Salim et al. (2018) law, ``Av = 1.086 dust2``,
  ``delta = dust_index``, bump strength tied to the slope as in Kriek & Conroy
  (2013) / Prospector dust_type 4, ``B = 0.85 - 1.9 dust_index`` (>= 0.09 on
  the box), birth clouds (stars younger than ``t_bc = 10 Myr``) get total
  ``eta Av`` with ``eta = 1 + dust1_fraction``. Approximation: Prospector's
  birth-cloud component is a separate power law of slope -1; bagpipes applies
  the extra ``(eta - 1) Av`` with the same Salim curve. Energy-balance dust
  emission with bagpipes' defaults (qpah 2, Umin 1, gamma 0.01); it matters only
  redward of ~3 micron rest.
- IGM: Inoue et al. (2014), always on.
- Redshift: ``z >= Z_MIN`` (bagpipes' luminosity distance is zero at z = 0);
  ``z < Z_MIN`` is rejected with an error. Fluxes use the luminosity distance
  of :mod:`popflow.cosmology` (bagpipes' internal cosmology, FlatLambdaCDM
  H0 = 70, Om0 = 0.3) evaluated exactly, not bagpipes' table interpolated
  every 0.01 in z (which is 0.4% off in D_L at z = 0.005).
- Photometry: bagpipes' rest-frame spectrum (R = 100 in the photometric
  range) integrated here through each filter's native curve shifted to the
  rest frame, photon-counting (SCIENCE.md):
  ``f_nu = (1+z)^2 sum(s lam T w) / (c sum(T w / lam))`` with ``s`` the
  observed f_lambda, ``lam`` and ``w`` the rest-frame wavelengths and pixel
  widths, ``T`` the transmission at ``lam (1+z)``. AB magnitudes
  ``m = 31.4 - 2.5 log10(f_nu / nJy)``. Where no flux gets through (a band
  blueward of the Lyman limit behind the IGM) the flux is floored at
  ``10**(-0.4 (MAG_CAP - 31.4))`` nJy, i.e. ``mag_unit <= MAG_CAP``.

Redshift range: bagpipes is set up to z = 10; popflow's box stops at 6.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from popflow import cosmology
from popflow.filters import AB_ZERO_POINT_MAG_NJY, Filter, load_filters
from popflow.params import DEFAULT_SPACE, N_SFR_RATIOS, ParameterSpace
from popflow.sfh import AGE_EPS, bin_edges_myr

__all__ = ["BagpipesSimulator", "sfh_bin_edges", "model_components", "Z_MIN", "MAG_CAP", "AGE_EPS", "T_BC_GYR",
           "get_simulator", "bagpipes_version", "SIMULATOR_DESCRIPTION"]

Z_MIN = 1e-3
"""Lowest redshift simulated (D_L = 4.3 Mpc); bagpipes' flux is undefined at z = 0."""
MAG_CAP = 99.0
"""Largest stored unit-mass magnitude (flux floor where the IGM blocks a whole band)."""
T_BC_GYR = 0.01
"""Birth-cloud lifetime in Gyr (stars younger than this get the extra birth-cloud dust)."""
_C_ANGSTROM_PER_S = 2.99792458e18
_NJY_CGS = 1e-32  # 1 nJy in erg s^-1 cm^-2 Hz^-1
_LSUN_CGS = 3.826e33  # bagpipes' L_sun (erg/s)
_MPC_CM = 3.085677581e24

SIMULATOR_DESCRIPTION = {
    "engine": "bagpipes model_galaxy (BC03+MILES stellar, Cloudy nebular, Inoue+14 IGM, DL07 dust emission)",
    "mass": "massformed = 0 (1 Msun formed); m(log_mass) = mag_unit - 2.5 log_mass",
    "sfh": "continuity, 7 bins: 0-30 Myr, 30-100 Myr, 4 log-spaced to 0.85 t_univ(z), 0.85-1 t_univ(z); "
           f"oldest edge (1 - {AGE_EPS}) t_univ(z); dsfr_k = logsfr_ratio_(7-k)",
    "metallicity": "stellar 10**log_zstar; nebular 10**log_zgas (Z/Zsun, Zsun = 0.02)",
    "nebular": "logU = log_u, fesc = 0",
    "dust": "Salim: Av = 1.086 dust2, delta = dust_index, B = 0.85 - 1.9 dust_index, "
            f"eta = 1 + dust1_fraction, t_bc = {T_BC_GYR} Gyr; DL07 emission qpah 2 Umin 1 gamma 0.01",
    "igm": "Inoue et al. 2014",
    "z_min": Z_MIN,
    "mag_cap": MAG_CAP,
    "photometry": "photon-counting, native filter curves, D_L from popflow.cosmology, m = 31.4 - 2.5 log10(f/nJy)",
}
"""The mapping above as a JSON-able dict (recorded in training stores)."""


def bagpipes_version() -> str:
    """Installed bagpipes version (raises a clear error when it is missing)."""
    try:
        return metadata.version("bagpipes")
    except metadata.PackageNotFoundError:
        raise ImportError("popflow.sps needs bagpipes: pip install 'popflow[sps]'") from None


def sfh_bin_edges(z: float) -> np.ndarray:
    """Continuity SFH bin edges in lookback time, Myr, ascending; shape (8,) (:func:`popflow.sfh.bin_edges_myr`)."""
    return bin_edges_myr(float(z))


def model_components(theta_row, space: ParameterSpace = DEFAULT_SPACE) -> dict:
    """bagpipes ``model_components`` for one physical point ``theta_row`` (dim,), unit mass formed.

    See the module docstring for the mapping. Raises ValueError for points outside
    the box or below ``Z_MIN``, naming the parameter.
    """
    t = np.asarray(space.check(np.asarray(theta_row)[None], "theta")[0], np.float64)
    p = {n: float(t[i]) for i, n in enumerate(space.names)}
    z = p["redshift"]
    if np.float32(z) < np.float32(Z_MIN):
        raise ValueError(f"theta: redshift = {z} is below the simulator's floor Z_MIN = {Z_MIN} "
                         "(the luminosity distance vanishes at z = 0)")
    continuity = {
        "massformed": 0.0,
        "metallicity": 10.0 ** p["log_zstar"],
        "bin_edges": list(sfh_bin_edges(z)),
    }
    for k in range(1, N_SFR_RATIOS + 1):
        continuity[f"dsfr{k}"] = p[f"logsfr_ratio_{N_SFR_RATIOS + 1 - k}"]
    return {
        "redshift": z,
        "t_bc": T_BC_GYR,
        "continuity": continuity,
        "nebular": {"logU": p["log_u"], "metallicity": 10.0 ** p["log_zgas"]},
        "dust": {
            "type": "Salim",
            "Av": 1.086 * p["dust2"],
            "delta": p["dust_index"],
            "B": 0.85 - 1.9 * p["dust_index"],
            "eta": 1.0 + p["dust1_fraction"],
        },
    }


class BagpipesSimulator:
    """Unit-mass AB magnitudes of bagpipes model galaxies through a list of filters.

    Args:
        filters: filter identifiers (see :func:`popflow.filters.load_filter`), column order of the output.
        search_path: folders searched for filter files (``--filter-path``).
        space: the parameter space theta lives in (must have the DEFAULT_SPACE names).

    Building one takes a few seconds (bagpipes resamples its grids); build one per process.
    """

    def __init__(self, filters: Sequence[str], search_path=None, space: ParameterSpace = DEFAULT_SPACE):
        bagpipes_version()
        missing = set(DEFAULT_SPACE.names) - set(space.names)
        if missing:
            raise ValueError(f"BagpipesSimulator: parameter space lacks {', '.join(sorted(missing))}")
        if len(filters) == 0 or len(set(filters)) != len(filters):
            raise ValueError(f"BagpipesSimulator: need a non-empty list of distinct filters, got {list(filters)}")
        self.space = space
        self.filters: tuple[str, ...] = tuple(filters)
        self.curves: tuple[Filter, ...] = tuple(load_filters(self.filters, search_path))
        with _quiet():
            import bagpipes

            with tempfile.TemporaryDirectory(prefix="popflow-filters-") as tmp:
                paths = []
                for i, f in enumerate(self.curves):
                    path = Path(tmp) / f"{i:03d}.dat"
                    np.savetxt(path, np.c_[f.wavelength, f.transmission])
                    paths.append(str(path))
                reference = self.space.lower + 0.5 * (self.space.upper - self.space.lower)
                self._model = bagpipes.model_galaxy(model_components(reference, space), filt_list=paths)
        # bagpipes' own photometry (resampled twice onto its R=100 grid) is replaced by ours below
        self._model.filt_list = None
        self._wave = self._model.wavelengths  # rest-frame, Angstrom
        from bagpipes import utils as bp_utils

        self._width = bp_utils.make_bins(self._wave)[1]

    @property
    def filter_sha256(self) -> tuple[str, ...]:
        return tuple(f.sha256 for f in self.curves)

    def _photometry_njy(self, spectrum: np.ndarray, z: float) -> np.ndarray:
        """Photon-counting f_nu (nJy) of an observed f_lambda on the rest grid; shape (n_filters,)."""
        obs = self._wave * (1.0 + z)
        out = np.zeros(len(self.curves))
        for j, f in enumerate(self.curves):
            lo, hi = np.searchsorted(obs, (f.wavelength[0], f.wavelength[-1]))
            lam, w = self._wave[lo:hi], self._width[lo:hi]
            trans = np.interp(obs[lo:hi], f.wavelength, f.transmission)
            num = np.sum(spectrum[lo:hi] * lam * trans * w)
            den = np.sum(trans * w / lam)
            out[j] = (1.0 + z) ** 2 * num / (_C_ANGSTROM_PER_S * den) / _NJY_CGS
        return out

    def magnitudes(self, theta) -> np.ndarray:
        """Unit-mass apparent AB magnitudes, shape (n, n_filters) float32, for theta (n, dim) physical.

        Raises ValueError for out-of-box rows or z < Z_MIN (naming the row and parameter)
        and RuntimeError if bagpipes returns an unphysical (zero) model.
        """
        theta = self.space.check(np.atleast_2d(theta), "theta")
        z = theta[:, self.space.index("redshift")].astype(np.float64)
        low = np.flatnonzero(z.astype(np.float32) < np.float32(Z_MIN))
        if low.size:
            raise ValueError(f"theta: redshift = {z[low[0]]} at row {low[0]} is below the simulator's floor "
                             f"Z_MIN = {Z_MIN} (the luminosity distance vanishes at z = 0)")
        dl_cm = np.asarray(cosmology.luminosity_distance(z), np.float64) * _MPC_CM
        mags = np.empty((theta.shape[0], len(self.curves)), np.float32)
        floor = 10.0 ** (-0.4 * (MAG_CAP - AB_ZERO_POINT_MAG_NJY))
        for i, row in enumerate(theta):
            comps = model_components(row, self.space)
            with _quiet():
                self._model.update(comps)
            if self._model.sfh.unphysical:
                raise RuntimeError(f"bagpipes flagged row {i} (theta = {row.tolist()}) as forming stars before the "
                                   "Big Bang: SFH bin edges exceed the age of the Universe")
            # undo bagpipes' 4 pi D_L^2 (interpolated table) and use the exact D_L of popflow.cosmology
            spectrum = self._model.spectrum_full * (self._model.lum_flux / (4.0 * np.pi * dl_cm[i] ** 2))
            flux = self._photometry_njy(spectrum, z[i])
            mags[i] = AB_ZERO_POINT_MAG_NJY - 2.5 * np.log10(np.maximum(flux, floor))
        return mags


@contextlib.contextmanager
def _quiet():
    """Silence bagpipes' import banner and its warnings (the simulator checks the flags itself)."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.lru_cache(maxsize=4)
def get_simulator(filters: tuple[str, ...], search_path: tuple[str, ...] = ()) -> BagpipesSimulator:
    """A :class:`BagpipesSimulator` cached per process (built once per worker)."""
    return BagpipesSimulator(filters, search_path=list(search_path))
