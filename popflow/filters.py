"""Filter transmission curves: astro-sedpy names, speclite names, plain files.

A filter identifier is resolved, in this order, as

1. a path to an existing two-column text file (wavelength in Angstrom,
   transmission; ``#`` comments allowed, further columns ignored);
2. a file ``<name>``, ``<name>.res``, ``<name>.dat`` or ``<name>.txt`` in a
   folder of the filter search path: the ``search_path`` argument first, then
   ``$POPFLOW_FILTER_PATH`` (folders separated by ``:``);
3. an astro-sedpy filter name (e.g. ``sdss_r0``, ``lsst_baseline_r``,
   ``cfht_megacam_us_9301``, ``subaru_suprimecam_rp``, ``hsc_g``);
4. a speclite filter name ``<group>-<band>`` (e.g. ``lsst2023-r``,
   ``sdss2010-r``, ``hsc2017-g``, ``cfht_megacam-ustar``).

An unknown identifier raises :class:`KeyError` listing close names from every
source. Use :func:`available_filters` to list the names known to the packages.

Photometry convention (SCIENCE.md): AB magnitudes, m = -2.5 log10(f_nu / 3631 Jy),
photon-counting filters. The AB zero point in f_nu is 3631 Jy = 3.631e12 nJy for
every filter (that is the definition of the AB system), so it is a module
constant, :data:`AB_ZERO_POINT_NJY`; the per-filter figure astronomers quote is
the zero point in f_lambda units, :attr:`Filter.ab_zero_point_flambda`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

AB_ZERO_POINT_NJY = 3.631e12
"""Flux density of a 0-mag AB source in nJy (3631 Jy), the same for every filter."""

AB_ZERO_POINT_MAG_NJY = 31.4
"""AB magnitude of 1 nJy: m = -2.5 log10(f / nJy) + 31.4 (rounded: 2.5 log10(3.631e12) = 31.40)."""

FILTER_PATH_ENV = "POPFLOW_FILTER_PATH"
_FILE_SUFFIXES = ("", ".res", ".dat", ".txt")
_C_ANGSTROM_PER_S = 2.99792458e18


class UnknownFilterError(KeyError, ValueError):
    """An identifier that no source resolves; the message lists close names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Filter:
    """A filter transmission curve (photon-counting response).

    Attributes:
        name: the identifier it was loaded by (e.g. ``"sdss_r0"``).
        wavelength: (n,) float64, Angstrom, strictly increasing.
        transmission: (n,) float64, dimensionless, >= 0.
        source: where the curve came from (``"sedpy"``, ``"speclite"`` or the file path).
    """

    name: str
    wavelength: np.ndarray
    transmission: np.ndarray
    source: str = ""

    def __post_init__(self):
        wave = np.array(self.wavelength, dtype=np.float64)
        trans = np.array(self.transmission, dtype=np.float64)
        _check_curve(wave, trans, f"filter {self.name!r} ({self.source or 'arrays'})")
        wave.flags.writeable = False
        trans.flags.writeable = False
        object.__setattr__(self, "wavelength", wave)
        object.__setattr__(self, "transmission", trans)

    @functools.cached_property
    def effective_wavelength(self) -> float:
        """Effective wavelength in Angstrom, the mean log wavelength
        exp(∫ T ln(λ) dλ/λ / ∫ T dλ/λ) (Schneider, Gunn & Hoessel 1983; Fukugita et al. 1996;
        the definition astro-sedpy's ``wave_effective`` uses)."""
        w, t = self.wavelength, self.transmission
        return float(np.exp(np.trapezoid(t * np.log(w) / w, w) / np.trapezoid(t / w, w)))

    @functools.cached_property
    def pivot_wavelength(self) -> float:
        """Pivot wavelength in Angstrom, sqrt(∫ T λ dλ / ∫ T dλ/λ) (Tokunaga & Vacca 2005):
        converts band-averaged f_nu to f_lambda exactly, f_lambda = f_nu c / λ_p²."""
        w, t = self.wavelength, self.transmission
        return float(np.sqrt(np.trapezoid(t * w, w) / np.trapezoid(t / w, w)))

    @property
    def ab_zero_point_njy(self) -> float:
        """AB zero point in f_nu, nJy: 3631 Jy for every filter (:data:`AB_ZERO_POINT_NJY`)."""
        return AB_ZERO_POINT_NJY

    @functools.cached_property
    def ab_zero_point_flambda(self) -> float:
        """Band-averaged f_lambda of a 0-mag AB source, erg s^-1 cm^-2 Å^-1:
        3631 Jy · c / λ_p² (photon-counting average, λ_p the pivot wavelength)."""
        return 3631e-23 * _C_ANGSTROM_PER_S / self.pivot_wavelength**2

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 hex digest of the curve (float64 little-endian wavelength then transmission)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.wavelength, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.transmission, dtype="<f8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Filter({self.name!r}, source={self.source!r}, n={self.wavelength.size}, "
                f"effective_wavelength={self.effective_wavelength:.1f} Å)")


def _check_curve(wave: np.ndarray, trans: np.ndarray, what: str) -> None:
    if wave.ndim != 1 or wave.shape != trans.shape:
        raise ValueError(f"{what}: wavelength and transmission must be 1-D of equal length, "
                         f"got {wave.shape} and {trans.shape}")
    if wave.size < 2:
        raise ValueError(f"{what}: needs at least 2 points, got {wave.size}")
    if not (np.all(np.isfinite(wave)) and np.all(np.isfinite(trans))):
        raise ValueError(f"{what}: non-finite wavelength or transmission values")
    if np.any(np.diff(wave) <= 0):
        i = int(np.argmax(np.diff(wave) <= 0))
        raise ValueError(f"{what}: wavelengths must be strictly increasing (row {i + 1}: "
                         f"{wave[i]} then {wave[i + 1]})")
    if wave[0] <= 0:
        raise ValueError(f"{what}: wavelengths must be positive Angstrom, got {wave[0]}")
    if np.any(trans < 0) or not np.any(trans > 0):
        raise ValueError(f"{what}: transmission must be >= 0 and not all zero")


def read_filter_file(path: str | os.PathLike, name: str | None = None) -> Filter:
    """Read a text file of (wavelength [Angstrom], transmission) columns; extra columns are ignored."""
    path = Path(path)
    try:
        data = np.loadtxt(path, comments="#", ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"filter file {path}: not a whitespace table of numbers ({err})") from None
    if data.shape[1] < 2:
        raise ValueError(f"filter file {path}: needs two columns (wavelength in Angstrom, transmission), "
                         f"found {data.shape[1]}")
    return Filter(name=name or path.name, wavelength=data[:, 0], transmission=data[:, 1], source=str(path))


def filter_search_path(search_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """The folders searched for filter files: ``search_path`` then ``$POPFLOW_FILTER_PATH``."""
    folders: list[Path] = []
    if search_path is not None:
        if isinstance(search_path, (str, os.PathLike)):
            search_path = str(search_path).split(os.pathsep)
        folders += [Path(p) for p in search_path if str(p)]
    folders += [Path(p) for p in os.environ.get(FILTER_PATH_ENV, "").split(os.pathsep) if p]
    return folders


def _package_data(package: str, *parts: str) -> Path | None:
    """A package's data folder, found without importing the package (sedpy's import takes seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


@functools.lru_cache(maxsize=1)
def _sedpy_names() -> tuple[str, ...]:
    folder = _package_data("sedpy", "data", "filters")
    return tuple(sorted(p.stem for p in folder.glob("*.par"))) if folder else ()


@functools.lru_cache(maxsize=1)
def _speclite_names() -> tuple[str, ...]:
    folder = _package_data("speclite", "data", "filters")
    return tuple(sorted(p.stem for p in folder.glob("*.ecsv"))) if folder else ()


def available_filters() -> dict[str, tuple[str, ...]]:
    """Filter names known to the packages: ``{"sedpy": (...), "speclite": (...)}``."""
    return {"sedpy": _sedpy_names(), "speclite": _speclite_names()}


@functools.lru_cache(maxsize=256)
def _load_cached(name: str, folders: tuple[Path, ...]) -> Filter:
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return read_filter_file(candidate, name=name)
    for folder in folders:
        for suffix in _FILE_SUFFIXES:
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return read_filter_file(p, name=name)
    if name in _sedpy_names():
        from sedpy.observate import Filter as SedpyFilter

        f = SedpyFilter(name)
        return Filter(name=name, wavelength=f.wavelength, transmission=f.transmission, source="sedpy")
    if name in _speclite_names():
        import speclite.filters

        f = speclite.filters.load_filter(name)
        return Filter(name=name, wavelength=np.asarray(f.wavelength), transmission=np.asarray(f.response),
                      source="speclite")
    raise UnknownFilterError(_unknown_message(name, folders))


def _unknown_message(name: str, folders: Sequence[Path]) -> str:
    files = []
    for folder in folders:
        if folder.is_dir():
            files += [p.stem if p.suffix in _FILE_SUFFIXES[1:] else p.name for p in folder.iterdir() if p.is_file()]
    pool = list(dict.fromkeys(files + list(_sedpy_names()) + list(_speclite_names())))
    close = difflib.get_close_matches(name, pool, n=8, cutoff=0.5)
    where = ", ".join(str(f) for f in folders) if folders else f"none (set --filter-path or ${FILTER_PATH_ENV})"
    hint = f"close names: {', '.join(close)}" if close else "no close names"
    return (f"unknown filter {name!r}: not a file, not in the filter search path ({where}), "
            f"not an astro-sedpy or speclite name; {hint}")


def load_filter(name: str, search_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> Filter:
    """Load one filter curve by file path, search-path file, astro-sedpy or speclite name.

    Args:
        name: the filter identifier (see the module docstring for the resolution order).
        search_path: extra folders searched before ``$POPFLOW_FILTER_PATH``
            (a list, or one string with ``:``-separated folders).

    Raises:
        UnknownFilterError (a KeyError and a ValueError): unknown identifier; the message
            lists close names from every source.
        ValueError: a file that is not a valid two-column curve (names the file).
    """
    name = str(name)
    candidate = Path(name).expanduser()
    if candidate.is_file():
        f = _load_cached(str(candidate.resolve()), ())
        return f if f.name == name else dataclasses.replace(f, name=name)
    return _load_cached(name, tuple(filter_search_path(search_path)))


def load_filters(names: Sequence[str], search_path=None) -> list[Filter]:
    """Load several filters (same order); see :func:`load_filter`."""
    return [load_filter(n, search_path) for n in names]
