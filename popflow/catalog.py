"""Survey tables -> chunked Zarr catalogues (xarray), and back.

Band sets
---------
A band set maps the columns of a survey table to filters. It is a YAML file
(shipped ones live in ``popflow/data/bandsets/``, also visible as
``catalogs/bandsets/``; load one with :func:`load_bandset` by name or path)::

    name: zcosmos_bright              # required
    description: free text            # optional
    id_column: id_zcosmos             # optional; default: the row number
    extra_columns:                    # optional: store name -> table column
      z_spec: zpec                    #   (z_spec, field, ra, dec, or any other name)
    sentinels: [99, -99, -99.9]       # values meaning "no measurement" (default shown);
                                      #   NaN and +-inf always count as missing
    error_sentinels: [-1, 99, -99]    # error values meaning "no measurement" (default: sentinels)
    read:                             # optional reader hints
      format: csv                     #   csv | fits | hdf5 | parquet (default: from the suffix)
      names: [zs, u, g, ...]          #   text tables: column names (the file's header is skipped)
      delimiter: whitespace           #   text tables: "," (default for .csv) or whitespace (others)
      comment: "#"                    #   text tables: comment character (default "#")
      hdf5_path: photometry           #   HDF5: group of 1-D column datasets or a compound table
      hdu: 1                          #   FITS: HDU index or name (default: first table HDU)
    bands:                            # required, in output order: band name -> mapping
      u:
        column: u_photzi25            #   flux or magnitude column
        error: eu_photzi25            #   its 1-sigma error column (same unit)
        unit: AB mag                  #   AB mag | nJy | uJy | mJy | Jy | erg/s/cm2/Hz
        filter: cfht_megacam_us_9301  #   a filter identifier for popflow.filters.load_filter

An entry is *masked* (``mask`` False, flux and error NaN) when its value is NaN,
+-inf or a sentinel, or its error is an error sentinel. Unmasked entries must
have a finite, positive error; negative fluxes are kept (they are data).
Magnitudes become fluxes in nJy, f = 10^(-0.4 (m - 31.4)), with the first-order
error sigma_f = 0.4 ln(10) f sigma_m (SCIENCE.md, "Photometry").

Store layout (DESIGN.md, "Stores")
----------------------------------
Zarr v3, dims ``galaxy`` x ``band``, chunked along ``galaxy`` only: ``flux``,
``flux_err`` (float32 nJy, NaN where masked), ``mask`` (bool, True = usable),
coordinate ``galaxy_id`` (int64), optional extra variables (``z_spec`` ...).
Band names are stored as the attribute ``bands`` (a string coordinate would need
Zarr's unstable string dtype) and become the ``band`` coordinate on opening.
The root attribute ``popflow_complete`` is written last: :func:`open_catalog`
refuses a store without it.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

__all__ = ["Band", "BandSet", "load_bandset", "available_bandsets", "ingest", "open_catalog", "describe_store",
           "mag_to_njy", "to_njy", "UNITS"]

DEFAULT_SENTINELS = (99.0, -99.0, -99.9)
MAG_UNIT = "AB mag"
UNITS = {"AB mag": None, "nJy": 1.0, "uJy": 1e3, "mJy": 1e6, "Jy": 1e9, "erg/s/cm2/Hz": 1e32}
"""Accepted units and their factor to nJy (None: AB magnitudes; 1 Jy = 1e-23 erg s^-1 cm^-2 Hz^-1)."""
_UNIT_ALIASES = {"abmag": MAG_UNIT, "ab": MAG_UNIT, "mag": MAG_UNIT, "magab": MAG_UNIT, "njy": "nJy",
                 "ujy": "uJy", "µjy": "uJy", "μjy": "uJy", "microjy": "uJy", "mjy": "mJy", "jy": "Jy",
                 "erg/s/cm2/hz": "erg/s/cm2/Hz", "erg/s/cm^2/hz": "erg/s/cm2/Hz", "ergs-1cm-2hz-1": "erg/s/cm2/Hz",
                 "erg/(s*cm2*hz)": "erg/s/cm2/Hz"}
MAG_RANGE = (-5.0, 50.0)
"""Plausible AB magnitudes; an unmasked 'AB mag' value outside is reported as a unit mismatch."""
COMPLETE_ATTR = "popflow_complete"
_FORMATS = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".fits.gz": "fits", ".parquet": "parquet",
            ".pq": "parquet", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".he5": "hdf5"}
_RESERVED = {"flux", "flux_err", "mask", "galaxy_id", "band", "galaxy"}
_BANDSET_DIR = "bandsets"


# ----------------------------------------------------------------------------- band sets

@dataclasses.dataclass(frozen=True)
class Band:
    """One band of a band set: table columns, unit and filter identifier."""

    name: str
    column: str
    error: str
    unit: str
    filter: str


@dataclasses.dataclass(frozen=True)
class BandSet:
    """A mapping from table columns to filters (see the module docstring for the YAML schema)."""

    name: str
    bands: tuple[Band, ...]
    id_column: str | None = None
    extra_columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sentinels: tuple[float, ...] = DEFAULT_SENTINELS
    error_sentinels: tuple[float, ...] = DEFAULT_SENTINELS
    read: Mapping[str, object] = dataclasses.field(default_factory=dict)
    description: str = ""
    source: str = ""

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def filters(self) -> tuple[str, ...]:
        return tuple(b.filter for b in self.bands)

    def to_dict(self) -> dict:
        """JSON/YAML-able dict in the band-set schema (round-trips through :meth:`from_dict`)."""
        out = {"name": self.name, "description": self.description, "id_column": self.id_column,
               "extra_columns": dict(self.extra_columns), "sentinels": list(self.sentinels),
               "error_sentinels": list(self.error_sentinels), "read": dict(self.read),
               "bands": {b.name: {"column": b.column, "error": b.error, "unit": b.unit, "filter": b.filter}
                         for b in self.bands}}
        return out

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "") -> "BandSet":
        """Build and validate a band set from a parsed YAML mapping; errors name ``source``."""
        where = f"band set {source or d.get('name', '?')}"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping at the top level, got {type(d).__name__}")
        known = {"name", "description", "id_column", "extra_columns", "sentinels", "error_sentinels", "read",
                 "bands", "reference"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(known)})")
        if not d.get("bands") or not isinstance(d["bands"], Mapping):
            raise ValueError(f"{where}: 'bands' must be a non-empty mapping of band name -> "
                             "{column, error, unit, filter}")
        bands = []
        for name, spec in d["bands"].items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"{where}, band {name!r}: expected a mapping with column, error, unit, filter")
            missing = [k for k in ("column", "error", "unit", "filter") if not spec.get(k)]
            if missing:
                raise ValueError(f"{where}, band {name!r}: missing {', '.join(missing)}")
            extra = set(spec) - {"column", "error", "unit", "filter"}
            if extra:
                raise ValueError(f"{where}, band {name!r}: unknown keys {sorted(extra)}")
            bands.append(Band(str(name), str(spec["column"]), str(spec["error"]),
                              normalise_unit(spec["unit"], f"{where}, band {name!r}"), str(spec["filter"])))
        extras = {str(k): str(v) for k, v in (d.get("extra_columns") or {}).items()}
        bad = _RESERVED.intersection(extras)
        if bad:
            raise ValueError(f"{where}: extra column names {sorted(bad)} are reserved")
        read = dict(d.get("read") or {})
        bad_read = set(read) - {"format", "names", "delimiter", "comment", "hdf5_path", "hdu"}
        if bad_read:
            raise ValueError(f"{where}: unknown read options {sorted(bad_read)}")
        sentinels = tuple(float(x) for x in (d.get("sentinels") if d.get("sentinels") is not None
                                             else DEFAULT_SENTINELS))
        err_sent = d.get("error_sentinels")
        return cls(name=str(d.get("name") or Path(source).stem or "custom"), bands=tuple(bands),
                   id_column=d.get("id_column") or None, extra_columns=extras, sentinels=sentinels,
                   error_sentinels=tuple(float(x) for x in err_sent) if err_sent is not None else sentinels,
                   read=read, description=str(d.get("description") or ""), source=source)


def normalise_unit(unit: str, where: str = "") -> str:
    """Canonical unit string (a key of :data:`UNITS`); ValueError naming ``where`` for unknown units."""
    u = str(unit).strip()
    if u in UNITS:
        return u
    key = u.lower().replace(" ", "").replace("_", "")
    if key in _UNIT_ALIASES:
        return _UNIT_ALIASES[key]
    raise ValueError(f"{where}: unknown unit {unit!r}; use one of {', '.join(UNITS)}")


def _shipped_bandsets():
    return resources.files("popflow") / "data" / _BANDSET_DIR


def available_bandsets() -> list[str]:
    """Names of the shipped band sets."""
    return sorted(p.name[:-5] for p in _shipped_bandsets().iterdir() if p.name.endswith(".yaml"))


def load_bandset(name_or_yaml: str | os.PathLike | BandSet) -> BandSet:
    """A band set by shipped name (``"lsst"``, ``"zcosmos_bright"``, ...) or YAML file path."""
    import yaml

    if isinstance(name_or_yaml, BandSet):
        return name_or_yaml
    path = Path(name_or_yaml).expanduser()
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        shipped = _shipped_bandsets() / f"{name_or_yaml}.yaml"
        if not shipped.is_file():
            names = available_bandsets()
            close = difflib.get_close_matches(str(name_or_yaml), names, n=3)
            raise ValueError(f"unknown band set {str(name_or_yaml)!r}: not a YAML file and not a shipped band set "
                             f"({', '.join(names)})" + (f"; did you mean {', '.join(close)}?" if close else ""))
        text, source = shipped.read_text(), str(name_or_yaml)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"band set {source}: invalid YAML ({err})") from None
    return BandSet.from_dict(data, source=source)


# ----------------------------------------------------------------------------- conversions (pure)

def mag_to_njy(mag: np.ndarray, mag_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AB magnitudes (n,) -> flux and error in nJy (n,): f = 10^(-0.4 (m - 31.4)),
    sigma_f = 0.4 ln(10) f sigma_m (first-order propagation; SCIENCE.md)."""
    flux = np.power(10.0, -0.4 * (np.asarray(mag, np.float64) - 31.4))
    return flux, 0.4 * np.log(10.0) * flux * np.asarray(mag_err, np.float64)


def to_njy(value: np.ndarray, error: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Values and errors in ``unit`` (a key of :data:`UNITS`) -> nJy, float64."""
    if unit == MAG_UNIT:
        return mag_to_njy(value, error)
    scale = UNITS[unit]
    return np.asarray(value, np.float64) * scale, np.asarray(error, np.float64) * scale


# ----------------------------------------------------------------------------- table readers (streaming)

def _table_format(path: Path, hint: str | None) -> str:
    if hint:
        if hint not in ("csv", "fits", "hdf5", "parquet"):
            raise ValueError(f"{path}: unknown read format {hint!r} (csv, fits, hdf5, parquet)")
        return hint
    name = path.name.lower()
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return "csv"


class _Reader:
    """Row-chunk reader: ``columns`` (names in the table), ``n_rows``, ``chunks(size)`` -> dicts of arrays."""

    def __init__(self, path: Path, read: Mapping):
        self.path = path
        self.read = read
        self.fmt = _table_format(path, read.get("format"))
        getattr(self, f"_open_{self.fmt}")()

    # -- text (pandas, chunked)
    def _text_kwargs(self) -> dict:
        delim = self.read.get("delimiter")
        if delim is None:
            delim = "," if self.path.name.lower().endswith(".csv") else "whitespace"
        kw = {"comment": self.read.get("comment", "#")}
        kw["sep"] = r"\s+" if delim == "whitespace" else delim
        if self.read.get("names"):
            kw.update(header=None, names=list(self.read["names"]))
        return kw

    def _open_csv(self):
        import pandas as pd

        try:
            head = pd.read_csv(self.path, nrows=0, **self._text_kwargs())
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path}: cannot read as a text table ({err})") from None
        self.columns = [str(c) for c in head.columns]
        n = 0
        for part in pd.read_csv(self.path, usecols=[0], chunksize=1_000_000, **self._text_kwargs()):
            n += len(part)
        self.n_rows = n

    def _chunks_csv(self, size, cols):
        import pandas as pd

        reader = pd.read_csv(self.path, usecols=cols, chunksize=size, **self._text_kwargs())
        for part in reader:
            yield {c: part[c].to_numpy() for c in cols}

    # -- parquet (pyarrow row batches)
    def _open_parquet(self):
        import pyarrow.parquet as pq

        # pre_buffer=True (the default) keeps every read column chunk alive while iterating (pyarrow 26):
        # memory grew with the table; a buffered stream keeps it flat
        self._pq = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 22)
        self.columns = list(self._pq.schema_arrow.names)
        self.n_rows = self._pq.metadata.num_rows

    def _chunks_parquet(self, size, cols):
        for batch in self._pq.iter_batches(batch_size=size, columns=cols):
            yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in cols}

    # -- HDF5 (h5py slices): a compound table dataset, or a group of 1-D column datasets
    def _open_hdf5(self):
        import h5py

        self._h5 = h5py.File(self.path, "r")
        base = self._h5[self.read["hdf5_path"]] if self.read.get("hdf5_path") else self._h5
        tables, columns = [], {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.split("/")[-1].startswith("__"):
                if obj.dtype.names:
                    tables.append(obj)
                elif obj.ndim == 1:
                    columns.setdefault(name.split("/")[-1], obj)

        if isinstance(base, h5py.Dataset):
            tables.append(base)
        else:
            base.visititems(visit)
        if len(tables) == 1 and not columns:
            self._table, self._cols = tables[0], None
            self.columns = list(self._table.dtype.names)
            self.n_rows = self._table.shape[0]
        elif columns and not tables:
            self._table, self._cols = None, columns
            self.columns = list(columns)
            lengths = {c: d.shape[0] for c, d in columns.items()}
            self.n_rows = max(lengths.values())
            short = [c for c, n in lengths.items() if n != self.n_rows]
            if short:
                raise ValueError(f"{self.path}: HDF5 column datasets of different lengths "
                                 f"({', '.join(f'{c}: {lengths[c]}' for c in short)}; others {self.n_rows}); "
                                 "set read.hdf5_path to the table's group")
        else:
            raise ValueError(f"{self.path}: cannot tell which HDF5 dataset is the table "
                             f"({len(tables)} compound datasets, {len(columns)} column datasets); "
                             "set read.hdf5_path in the band set")

    def _chunks_hdf5(self, size, cols):
        for start in range(0, self.n_rows, size):
            stop = min(start + size, self.n_rows)
            if self._table is not None:
                rows = self._table[start:stop]
                yield {c: rows[c] for c in cols}
            else:
                yield {c: self._cols[c][start:stop] for c in cols}

    # -- FITS (astropy, memory-mapped; each slice is converted on its own)
    def _open_fits(self):
        from astropy.io import fits

        self._fits = fits.open(self.path, memmap=True)
        hdu_key = self.read.get("hdu")
        if hdu_key is not None:
            hdu = self._fits[hdu_key]
        else:
            tabs = [h for h in self._fits if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
            if not tabs:
                raise ValueError(f"{self.path}: no table HDU in this FITS file")
            hdu = tabs[0]
        self._hdu = hdu
        self.columns = list(hdu.columns.names)
        self.n_rows = int(hdu.header.get("NAXIS2", 0))
        # Plain binary tables are read row-slice by row-slice straight from the file: pages of a
        # memory map stay resident and the RSS would grow with the table. Scaled (TSCAL/TZERO),
        # variable-length or bit columns and compressed files go through astropy's memmap instead.
        dtype = hdu.columns.dtype.newbyteorder(">")
        plain = (isinstance(hdu, fits.BinTableHDU) and dtype.itemsize == hdu.header.get("NAXIS1")
                 and not self.path.name.lower().endswith((".gz", ".bz2", ".zip"))
                 and all(c.bscale in (None, 1) and c.bzero in (None, 0) and c.format[-1] not in "PQX"
                         for c in hdu.columns))
        self._fits_raw = (hdu.fileinfo()["datLoc"], dtype) if plain else None

    def _chunks_fits(self, size, cols):
        for start in range(0, self.n_rows, size):
            stop = min(start + size, self.n_rows)
            if self._fits_raw is not None:
                offset, dtype = self._fits_raw
                with open(self.path, "rb") as f:
                    f.seek(offset + start * dtype.itemsize)
                    rows = np.fromfile(f, dtype=dtype, count=stop - start)
                yield {c: rows[c].astype(rows[c].dtype.newbyteorder("=")) for c in cols}
            else:
                rows = self._hdu.data[start:stop]
                yield {c: np.asarray(rows.field(c)) for c in cols}

    def chunks(self, size: int, cols: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of column arrays, exactly ``size`` rows each (the last one shorter)."""
        pending: list[dict] = []
        have = 0
        for part in getattr(self, f"_chunks_{self.fmt}")(size, list(cols)):
            pending.append(part)
            have += len(next(iter(part.values())))
            while have >= size:
                merged = {c: np.concatenate([p[c] for p in pending]) for c in cols}
                yield {c: v[:size] for c, v in merged.items()}
                rest = {c: v[size:] for c, v in merged.items()}
                have -= size
                pending = [rest] if have else []
        if have:
            yield {c: np.concatenate([p[c] for p in pending]) for c in cols}

    def close(self):
        for attr in ("_h5", "_fits"):
            if hasattr(self, attr):
                getattr(self, attr).close()


def _column_lookup(reader: _Reader, wanted: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Map requested column names to the table's names (FITS names match case-insensitively)."""
    have = {c: c for c in reader.columns}
    if reader.fmt == "fits":
        have.update({c.lower(): c for c in reader.columns})
    out = {}
    for col, role in wanted:
        key = col if col in have else col.lower() if reader.fmt == "fits" and col.lower() in have else None
        if key is None:
            close = difflib.get_close_matches(col, reader.columns, n=3)
            raise ValueError(f"{reader.path}: column {col!r} ({role}) not found"
                             + (f"; close names: {', '.join(close)}" if close else "")
                             + f" (table columns: {', '.join(reader.columns[:40])}"
                             + (", ..." if len(reader.columns) > 40 else "") + ")")
        out[col] = have[key]
    return out


def _as_float(values: np.ndarray, path: Path, column: str, start: int) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        import pandas as pd

        parsed = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy()
        bad = int(np.argmax(np.isnan(parsed) & pd.notna(pd.Series(values)).to_numpy()))
        raise ValueError(f"{path}: column {column!r}, row {start + bad}: non-numeric value "
                         f"{values[bad]!r}") from None


# ----------------------------------------------------------------------------- per-chunk conversion (pure)

def _is_sentinel(x: np.ndarray, sentinels: Sequence[float]) -> np.ndarray:
    """Compared in float32 so that -99.9 matches whether the column is float32 or float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isin(x.astype(np.float32), np.asarray(sentinels, np.float32))

def _convert_band(value: np.ndarray, error: np.ndarray, band: Band, bandset: BandSet, path: Path,
                  start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One band of one chunk -> (flux, flux_err, mask), float32 nJy; validation errors name column and row
    (rows are 0-based data rows, header excluded)."""
    missing = (~np.isfinite(value) | _is_sentinel(value, bandset.sentinels)
               | _is_sentinel(error, bandset.error_sentinels))
    ok = ~missing
    bad_err = ok & ~(np.isfinite(error) & (error > 0))
    if bad_err.any():
        i = int(np.argmax(bad_err))
        raise ValueError(f"{path}: column {band.error!r} (error of band {band.name!r}), row {start + i}: "
                         f"error {error[i]!r} is not a positive number while {band.column!r} = {value[i]!r} "
                         "is a measurement; fix the table or declare the value in error_sentinels")
    if band.unit == MAG_UNIT:
        outside = ok & ((value < MAG_RANGE[0]) | (value > MAG_RANGE[1]))
        if outside.any():
            i = int(np.argmax(outside))
            raise ValueError(f"{path}: column {band.column!r}, row {start + i}: value {value[i]!r} is not a "
                             f"plausible AB magnitude (declared unit 'AB mag'); unit mismatch? (fluxes need "
                             f"a flux unit: {', '.join(u for u in UNITS if u != MAG_UNIT)})")
    elif ok.sum() >= 50 and np.all((value[ok] > 10) & (value[ok] < 40)) and np.all(error[ok] < 2):
        raise ValueError(f"{path}: column {band.column!r}: all {int(ok.sum())} values in rows {start}-"
                         f"{start + len(value) - 1} lie between 10 and 40 with errors below 2, like AB "
                         f"magnitudes, but the declared unit is {band.unit!r}; unit mismatch?")
    flux, err = to_njy(np.where(ok, value, np.nan), np.where(ok, error, np.nan), band.unit)
    return flux.astype(np.float32), err.astype(np.float32), ok


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parse_extras(extra_columns) -> dict[str, str]:
    if not extra_columns:
        return {}
    if isinstance(extra_columns, Mapping):
        return {str(k): str(v) for k, v in extra_columns.items()}
    out = {}
    for item in extra_columns:
        name, sep, col = str(item).partition("=")
        if not sep or not name or not col:
            raise ValueError(f"extra column {item!r}: expected NAME=COLUMN, e.g. z_spec=zspec")
        out[name.strip()] = col.strip()
    bad = _RESERVED.intersection(out)
    if bad:
        raise ValueError(f"extra column names {sorted(bad)} are reserved")
    return out


def _extra_dtype(name: str, sample: np.ndarray) -> np.dtype:
    if name in ("ra", "dec"):
        return np.dtype(np.float64)
    if sample.dtype.kind in "iu" or sample.dtype.kind == "b":
        return np.dtype(np.int64)
    if sample.dtype.kind == "f":
        return np.dtype(np.float32)
    raise ValueError(f"extra column {name!r} has dtype {sample.dtype}; only numeric extra columns are stored")


# ----------------------------------------------------------------------------- ingest (imperative shell)

def ingest(table: str | os.PathLike, bands: str | os.PathLike | BandSet, out: str | os.PathLike, *,
           id_column: str | None = None, chunk_size: int = 10_000, overwrite: bool = False,
           filter_path: Sequence[str] | str | None = None, extra_columns=None, progress: bool = True) -> Path:
    """Read a FITS, CSV, HDF5 or Parquet table in row chunks and write a Zarr v3 catalogue.

    Args:
        table: the survey table.
        bands: a band-set name, YAML path or :class:`BandSet`.
        out: the catalogue store to write (a folder, conventionally ``*.zarr``).
        id_column: unique galaxy id column (overrides the band set's; default: row number).
        chunk_size: galaxies per Zarr chunk (also the read chunk: memory is O(chunk_size)).
        overwrite: replace an existing store at ``out``.
        filter_path: folders searched for filter curve files (see :mod:`popflow.filters`).
        extra_columns: ``{"z_spec": "zspec"}`` or ``["z_spec=zspec", ...]``; added to the band set's.
        progress: show a tqdm progress bar over rows.

    Returns:
        The store path. On a validation error the partial store is removed and a ValueError names
        the file, column and (0-based data) row.
    """
    from popflow.filters import load_filter

    table, out = Path(table), Path(out)
    bandset = load_bandset(bands)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not table.is_file():
        raise FileNotFoundError(f"table {table} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (popflow ingest --overwrite) to replace it")
    filters = []
    for b in bandset.bands:
        try:
            filters.append(load_filter(b.filter, filter_path))
        except KeyError as err:
            raise ValueError(f"band set {bandset.name}, band {b.name!r}: {err}") from None
    extras = {**bandset.extra_columns, **_parse_extras(extra_columns)}
    id_col = id_column or bandset.id_column

    reader = _Reader(table, bandset.read)
    try:
        wanted = [(c, f"band {b.name} {role}") for b in bandset.bands for c, role in
                  ((b.column, "value"), (b.error, "error"))]
        wanted += [(c, f"extra {n}") for n, c in extras.items()] + ([(id_col, "id")] if id_col else [])
        colmap = _column_lookup(reader, wanted)
        if reader.n_rows == 0:
            raise ValueError(f"{table}: the table is empty (no data rows)")
        if out.exists():
            shutil.rmtree(out)
        try:
            _write_store(reader, bandset, filters, colmap, extras, id_col, out, chunk_size, progress)
        except Exception:
            shutil.rmtree(out, ignore_errors=True)
            raise
    finally:
        reader.close()
    return out


def _write_store(reader, bandset, filters, colmap, extras, id_col, out, chunk_size, progress):
    import dask.array as da
    import xarray as xr
    import zarr
    from tqdm import tqdm
    from zarr.codecs import BloscCodec

    from popflow import __version__

    n, nb = reader.n_rows, len(bandset.bands)
    cols = list(dict.fromkeys(colmap.values()))
    chunks = reader.chunks(chunk_size, cols)
    first = next(chunks)
    extra_dtypes = {k: _extra_dtype(k, np.asarray(first[colmap[c]])) for k, c in extras.items()}

    def full(shape, dtype, fill):
        return da.full(shape, fill, dtype=dtype, chunks=(chunk_size,) + shape[1:])

    fills = {"flux": np.nan, "flux_err": np.nan, "mask": False, "galaxy_id": -1}
    template = xr.Dataset(
        {"flux": (("galaxy", "band"), full((n, nb), np.float32, np.nan)),
         "flux_err": (("galaxy", "band"), full((n, nb), np.float32, np.nan)),
         "mask": (("galaxy", "band"), full((n, nb), bool, False)),
         **{k: (("galaxy",), full((n,), dt, np.nan if dt.kind == "f" else -1)) for k, dt in extra_dtypes.items()}},
        coords={"galaxy_id": (("galaxy",), full((n,), np.int64, -1))})
    fills.update({k: (np.nan if dt.kind == "f" else -1) for k, dt in extra_dtypes.items()})
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    encoding = {v: {"compressors": [compressor], "fill_value": fills[v]} for v in fills}
    template.attrs = {COMPLETE_ATTR: False}
    template.to_zarr(out, mode="w", compute=False, consolidated=False, encoding=encoding, zarr_format=3)

    group = zarr.open_group(out, mode="r+")
    last_id, ids_increasing = None, True  # strictly increasing ids need no duplicate search
    bar = tqdm(total=n, unit="rows", desc=f"ingest {reader.path.name}", disable=not progress)
    start = 0
    masked = np.zeros(nb, dtype=np.int64)
    for part in _chain(first, chunks):
        m = len(next(iter(part.values())))
        stop = start + m
        flux = np.empty((m, nb), np.float32)
        err = np.empty((m, nb), np.float32)
        mask = np.empty((m, nb), bool)
        for j, b in enumerate(bandset.bands):
            value = _as_float(part[colmap[b.column]], reader.path, b.column, start)
            error = _as_float(part[colmap[b.error]], reader.path, b.error, start)
            flux[:, j], err[:, j], mask[:, j] = _convert_band(value, error, b, bandset, reader.path, start)
        ids = _ids(part, colmap, id_col, reader.path, start, m)
        ids_increasing = ids_increasing and bool(np.all(np.diff(ids) > 0)) and (last_id is None or ids[0] > last_id)
        last_id = ids[-1]
        group["flux"][start:stop] = flux
        group["flux_err"][start:stop] = err
        group["mask"][start:stop] = mask
        group["galaxy_id"][start:stop] = ids
        masked += (~mask).sum(axis=0)
        for k, c in extras.items():
            v = np.asarray(part[colmap[c]])
            if extra_dtypes[k].kind == "f":
                v = _as_float(v, reader.path, c, start)
                v = np.where(np.isfinite(v) & ~_is_sentinel(v, bandset.sentinels), v, np.nan)
            group[k][start:stop] = v.astype(extra_dtypes[k])
        start = stop
        bar.update(m)
    bar.close()
    if start != n:
        raise ValueError(f"{reader.path}: read {start} rows but the table declares {n}")
    if not ids_increasing:  # read the ids back: 8 bytes per row plus the sort, only for unsorted ids
        _check_unique(group["galaxy_id"][:], id_col, reader.path)

    group.attrs.update({
        "bands": list(bandset.band_names), "filters": list(bandset.filters),
        "filter_sha256": [f.sha256 for f in filters], "units_in": [b.unit for b in bandset.bands],
        "band_set": bandset.name, "band_set_definition": json.dumps(bandset.to_dict()),
        "source_file": str(reader.path.resolve()), "source_sha256": _file_sha256(reader.path),
        "source_format": reader.fmt, "id_column": id_col or "(row number)", "flux_unit": "nJy",
        "ab_zero_point_mag": 31.4, "n_galaxies": int(n), "chunk_size": int(chunk_size),
        "masked_per_band": [int(x) for x in masked], "extra_columns": dict(extras),
        "popflow_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    group.attrs[COMPLETE_ATTR] = True  # last: a store without it is half-written


def _chain(first, rest):
    yield first
    yield from rest


def _ids(part, colmap, id_col, path, start, m) -> np.ndarray:
    if not id_col:
        return np.arange(start, start + m, dtype=np.int64)
    raw = np.asarray(part[colmap[id_col]])
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    as_float = _as_float(raw, path, id_col, start)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: id column {id_col!r}, row {start + i}: {raw[i]!r} is not an integer id "
                         "(popflow stores int64 galaxy ids)")
    return as_float.astype(np.int64)


def _check_unique(ids: np.ndarray, id_col, path: Path) -> None:
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        k = dup[0]
        first, second = sorted((int(order[k]), int(order[k + 1])))
        raise ValueError(f"{path}: id column {id_col!r}: duplicate id {ids[first]} in rows {first} and {second} "
                         f"({dup.size} duplicates in all)")


# ----------------------------------------------------------------------------- reading stores

def _check_complete(path: Path):
    import zarr

    if not path.exists():
        raise FileNotFoundError(f"catalogue store {path} does not exist")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # noqa: BLE001 - any failure here means "not a Zarr store"
        raise ValueError(f"{path} is not a Zarr store ({err})") from None
    if not group.attrs.get(COMPLETE_ATTR):
        raise ValueError(f"catalogue store {path} is incomplete (ingest was interrupted or failed); "
                         "re-run `popflow ingest ... --overwrite` to rebuild it")
    return group


def open_catalog(path: str | os.PathLike):
    """Open a catalogue store lazily: an xarray Dataset of dask arrays, dims (galaxy, band).

    The ``band`` coordinate holds the band names (from the ``bands`` attribute).
    Raises ValueError for a half-written store, naming it.
    """
    import xarray as xr

    path = Path(path)
    _check_complete(path)
    ds = xr.open_zarr(path, consolidated=False, chunks={})
    return ds.assign_coords(band=("band", list(ds.attrs["bands"])))


def describe_store(path: str | os.PathLike) -> str:
    """Human-readable description of a catalogue or posterior store (``popflow info``)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"store {path} does not exist")
    group = zarr.open_group(path, mode="r")
    if "posterior" in group:
        return _describe_posterior(path, group)
    if not group.attrs.get(COMPLETE_ATTR):
        return (f"{path}: INCOMPLETE catalogue store (ingest was interrupted or failed); "
                "re-run `popflow ingest ... --overwrite`")
    ds = open_catalog(path)
    a = ds.attrs
    n, nb = ds.sizes["galaxy"], ds.sizes["band"]
    masked = (~ds["mask"]).sum("galaxy").compute().values
    no_band = int((~ds["mask"].any("band")).sum().compute())
    lines = [f"catalogue store {path}",
             f"  dims: galaxy={n}, band={nb}  (chunks of {a.get('chunk_size')} galaxies)",
             f"  source: {a.get('source_file')} ({a.get('source_format')}, sha256 {a.get('source_sha256')})",
             f"  band set: {a.get('band_set')}   id column: {a.get('id_column')}   flux unit: {a.get('flux_unit')}",
             f"  written by popflow {a.get('popflow_version')} at {a.get('created')}",
             "  bands:"]
    w = max(len(b) for b in [*a["bands"], "band"])
    wf = max(len(f) for f in [*a["filters"], "filter"])
    units = a.get("units_in", [""] * nb)
    lines.append(f"    {'band':<{w}}  {'filter':<{wf}}  {'unit in':<12} {'masked':>9} {'%':>6}")
    for b, f, u, k in zip(a["bands"], a["filters"], units, masked):
        lines.append(f"    {b:<{w}}  {f:<{wf}}  {u:<12} {int(k):>9} {100 * k / n:>6.2f}")
    lines.append(f"  masked entries: {int(masked.sum())} of {n * nb}; galaxies with no usable band: {no_band}")
    extra = [v for v in ds.data_vars if v not in ("flux", "flux_err", "mask")]
    if extra:
        lines.append("  extra variables: " + ", ".join(
            f"{v} ({int(ds[v].notnull().sum().compute())} non-missing)" for v in extra))
    return "\n".join(lines)


def _describe_posterior(path: Path, group) -> str:
    a = dict(group.attrs)
    lines = [f"posterior store {path}"]
    post = group["posterior"]
    names = sorted(k for k in post.array_keys() if tuple(post[k].metadata.dimension_names or ()) != (k,))
    if names:
        arr = post[names[0]]
        dims = arr.metadata.dimension_names or tuple(f"dim_{i}" for i in range(arr.ndim))
        lines.append("  dims: " + ", ".join(f"{d}={s}" for d, s in zip(dims, arr.shape)))
    lines.append(f"  parameters: {', '.join(names) if names else '(none written yet)'}")
    for key in ("prior_id", "emulator_id", "catalog_sha256", "seed", "popflow_version"):
        if key in a:
            lines.append(f"  {key}: {a[key]}")
    for key, value in sorted(a.items()):
        if "chunk" not in key:
            continue
        if isinstance(value, Mapping):
            lines.append(f"  {key}: {sum(bool(v) for v in value.values())} of {len(value)} complete")
        elif isinstance(value, (list, tuple)):
            done = sum(bool(v) for v in value)
            lines.append(f"  {key}: {done} of {len(value)}" if all(isinstance(v, bool) for v in value)
                         else f"  {key}: {len(value)} listed")
        else:
            lines.append(f"  {key}: {value}")
    groups = sorted(group.group_keys())
    lines.append(f"  groups: {', '.join(groups)}")
    return "\n".join(lines)
