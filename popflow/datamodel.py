"""The data model: how emulated fluxes meet observed photometry.

For galaxy g, band b, with model flux ``F_gb`` (nJy, from the emulator) and
observed flux ``f_gb`` with error ``s_gb``:

    mu_gb      = zp_b * F_gb                          (multiplicative zero point; per field optional)
    sigma_gb^2 = s_gb^2 + (floor_b * |mu_gb|)^2       (fractional error floor in quadrature)
    log L_g    = sum_{b usable} log N(f_gb | mu_gb, sigma_gb)     (or a Student-t)

as in COSMOS2020 / pop-cosmos (Alsing et al. 2024, Thorp et al. 2024), fitted
in flux space so that negative fluxes and non-detections are ordinary data and
masked bands contribute nothing.

Optionally a rest-frame correction ``delta(lambda_rest)`` (mag, linear in
log10 wavelength between nodes, constant beyond the end nodes) is added to the
model magnitudes, ``m_gb -> m_gb + delta(lambda_b / (1 + z_g))`` with
``lambda_b`` the band's effective wavelength: the SPS model's systematic
mismatch with real SEDs, which lives in the rest frame where zero points (fixed
in the observed frame) cannot absorb it. It is the counterpart of the template
corrections of EAZY and LePhare (Brammer et al. 2008; Ilbert et al. 2006) and is
calibrated with the zero points (:mod:`popflow.calibrate`).

The floor scales the MODEL flux, not the observed one. It stands for the
emulator's and the SPS model's fractional error, which is a property of the
model prediction; scaling the observed flux instead would give noise-fluctuated
fluxes their own error (an upward fluctuation gets a larger error and is
down-weighted, biasing faint sources bright-ward) and is meaningless for
negative fluxes. Because sigma then depends on the model, the likelihood keeps
its ``log sigma`` normalisation terms (without them the fit would prefer bright
models with inflated errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DataModel", "LOG_FLOOR_PER_MAG"]

LOG_FLOOR_PER_MAG = 0.4 * math.log(10.0)
"""d ln f / d m: a magnitude error sigma_m is a fractional flux error 0.921 sigma_m (first order)."""

_LOG_2PI = math.log(2.0 * math.pi)


def _as_tuple(a, ndim_ok, what):
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim not in ndim_ok:
        raise ValueError(f"DataModel: {what} must have {' or '.join(map(str, ndim_ok))} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"DataModel: {what} contains non-finite values: {arr.tolist()}")
    if arr.ndim == 1:
        return tuple(float(x) for x in arr)
    return tuple(tuple(float(x) for x in row) for row in arr)


@dataclass(frozen=True)
class DataModel:
    """Zero points, error floors and the photometric likelihood.

    Parameters
    ----------
    zero_points : (n_band,) or (n_field, n_band)
        Multiplicative factors applied to the model flux. A 2-D table gives
        per-field (e.g. per-tract) zero points, selected by the ``field`` index
        passed to :meth:`log_likelihood`.
    error_floor : (n_band,)
        Fractional error floor (dimensionless, a fraction of the model flux),
        added in quadrature to the catalogue error.
    student_t_nu : float or None
        ``None`` for a Gaussian likelihood; otherwise the degrees of freedom of
        a Student-t likelihood with scale sigma (robust to outlying bands).
    band_wavelength : (n_band,) or None
        Effective wavelengths of the bands, Angstrom (observed frame); needed
        by a rest-frame correction.
    rest_wavelength, rest_offset : (n_node,) or None
        The rest-frame correction's nodes (Angstrom, increasing) and its value
        there (mag added to the model magnitudes); both None for none.

    The object is frozen and hashable (arrays are stored as tuples). It is
    also a JAX pytree whose leaves are the calibrated numbers (zero points,
    floors, rest-frame offsets) and whose static part is the rest
    (:attr:`structure`), so a jitted function taking it as an argument compiles
    once per structure, not once per set of numbers. Inside such a function
    the fields hold traced arrays (the pure-core methods accept them).
    """

    zero_points: tuple
    error_floor: tuple
    student_t_nu: float | None = None
    band_wavelength: tuple | None = None
    rest_wavelength: tuple | None = None
    rest_offset: tuple | None = None

    def __post_init__(self):
        zp = _as_tuple(self.zero_points, (1, 2), "zero_points")
        floor = _as_tuple(self.error_floor, (1,), "error_floor")
        object.__setattr__(self, "zero_points", zp)
        object.__setattr__(self, "error_floor", floor)
        zpa = np.asarray(zp)
        if zpa.shape[-1] != len(floor):
            raise ValueError(f"DataModel: zero_points has {zpa.shape[-1]} bands but error_floor has {len(floor)}")
        if np.any(zpa <= 0):
            raise ValueError(f"DataModel: zero points must be positive, got {zpa.tolist()}")
        if np.any(np.asarray(floor) < 0):
            raise ValueError(f"DataModel: error floors must be non-negative, got {list(floor)}")
        if self.student_t_nu is not None:
            nu = float(self.student_t_nu)
            if not nu > 0:
                raise ValueError(f"DataModel: student_t_nu must be positive or None, got {self.student_t_nu}")
            object.__setattr__(self, "student_t_nu", nu)
        for name in ("band_wavelength", "rest_wavelength", "rest_offset"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_tuple(getattr(self, name), (1,), name))
        if (self.rest_wavelength is None) != (self.rest_offset is None):
            raise ValueError("DataModel: rest_wavelength and rest_offset come together (both or neither)")
        if self.rest_wavelength is not None:
            nodes = np.asarray(self.rest_wavelength)
            if len(nodes) != len(self.rest_offset) or len(nodes) < 2 or np.any(np.diff(nodes) <= 0) or nodes[0] <= 0:
                raise ValueError(f"DataModel: rest_wavelength must be >= 2 increasing positive nodes matching rest_offset "
                                 f"({len(nodes)} nodes, {len(self.rest_offset)} offsets)")
            if self.band_wavelength is None:
                raise ValueError("DataModel: a rest-frame correction needs band_wavelength (the bands' effective wavelengths)")
        if self.band_wavelength is not None and (len(self.band_wavelength) != len(floor) or min(self.band_wavelength) <= 0):
            raise ValueError(f"DataModel: band_wavelength needs {len(floor)} positive values, got {list(self.band_wavelength)}")

    # --- constructors ------------------------------------------------------
    @classmethod
    def default(cls, n_bands: int, error_floor: float = 0.0) -> "DataModel":
        """Unit zero points and a common fractional floor (default none), Gaussian."""
        return cls((1.0,) * n_bands, (float(error_floor),) * n_bands)

    @classmethod
    def from_magnitude_floor(cls, floor_mag, zero_points=None, student_t_nu=None) -> "DataModel":
        """A data model whose fractional floor is a magnitude scatter ``floor_mag`` (n_band,), mag.

        ``floor = 0.4 ln(10) * sigma_m`` (first-order conversion, SCIENCE.md "Photometry").
        """
        floor_mag = np.asarray(floor_mag, dtype=np.float64)
        if zero_points is None:
            zero_points = np.ones(floor_mag.shape[-1])
        return cls(zero_points, LOG_FLOOR_PER_MAG * floor_mag, student_t_nu)

    @classmethod
    def from_emulator(cls, emulator, zero_points=None, student_t_nu=None) -> "DataModel":
        """A data model whose floor is the emulator's measured residual scatter ``emulator.error_floor`` (mag)."""
        return cls.from_magnitude_floor(emulator.error_floor, zero_points, student_t_nu)

    # --- description -------------------------------------------------------
    @property
    def n_bands(self) -> int:
        return len(self.error_floor)

    @property
    def n_fields(self) -> int | None:
        """Number of fields of a per-field zero-point table, ``None`` for one set of zero points."""
        zp = np.asarray(self.zero_points)
        return zp.shape[0] if zp.ndim == 2 else None

    def to_dict(self) -> dict:
        d = {
            "zero_points": np.asarray(self.zero_points).tolist(),
            "error_floor": list(self.error_floor),
            "student_t_nu": self.student_t_nu,
        }
        for name in ("band_wavelength", "rest_wavelength", "rest_offset"):  # only when set: older dicts stay as they were
            if getattr(self, name) is not None:
                d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataModel":
        return cls(d["zero_points"], d["error_floor"], d.get("student_t_nu"), d.get("band_wavelength"),
                   d.get("rest_wavelength"), d.get("rest_offset"))

    @property
    def structure(self) -> tuple:
        """What code compiled for this data model depends on besides its numbers: the pytree's
        static part and the leaves' shapes (hashable)."""
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return treedef, tuple(np.shape(x) for x in leaves)

    # --- validation (imperative shell side) --------------------------------
    def validate(self, flux, flux_err, mask, field=None, where: str = "catalogue") -> None:
        """Raise a ValueError naming the galaxy (row) and band of the first bad entry.

        Shapes: ``flux``, ``flux_err``, ``mask`` (n_gal, n_band); ``field`` (n_gal,) int.
        Unmasked bands need a finite flux and a finite positive error; masked
        bands may hold anything (NaN included). Galaxies with no usable band are
        allowed (the fit flags them).
        """
        flux, flux_err, mask = np.asarray(flux), np.asarray(flux_err), np.asarray(mask)
        if flux.ndim != 2 or flux.shape != flux_err.shape or flux.shape != mask.shape:
            raise ValueError(
                f"{where}: flux {flux.shape}, flux_err {flux_err.shape} and mask {mask.shape} must share one (n_gal, n_band) shape"
            )
        if flux.shape[1] != self.n_bands:
            raise ValueError(f"{where}: {flux.shape[1]} bands, but the data model has {self.n_bands}")
        if mask.dtype != bool:
            raise ValueError(f"{where}: mask must be boolean, got {mask.dtype}")
        checks = (
            (~np.isfinite(flux), "flux is not finite"),
            (~np.isfinite(flux_err), "flux_err is not finite"),
            (np.isfinite(flux_err) & (flux_err <= 0), "flux_err is not positive"),
        )
        for bad, msg in checks:
            bad = bad & mask
            if bad.any():
                g, b = np.argwhere(bad)[0]
                raise ValueError(
                    f"{where}: {msg} on an unmasked band at galaxy {g}, band {b} "
                    f"(flux={flux[g, b]}, flux_err={flux_err[g, b]}); {int(bad.sum())} such entries in all — mask them or fix the input"
                )
        n_fields = self.n_fields
        if n_fields is not None:
            if field is None:
                raise ValueError(f"{where}: the data model has per-field zero points ({n_fields} fields) but no field index was given")
            field = np.asarray(field)
            if field.shape != (flux.shape[0],) or not np.issubdtype(field.dtype, np.integer):
                raise ValueError(f"{where}: field must be an integer array of shape ({flux.shape[0]},), got {field.dtype} {field.shape}")
            bad = (field < 0) | (field >= n_fields)
            if bad.any():
                g = int(np.argmax(bad))
                raise ValueError(f"{where}: field index {field[g]} at galaxy {g} is outside the zero-point table's {n_fields} fields")

    # --- the pure core -----------------------------------------------------
    def rest_correction(self, redshift):
        """Magnitudes added to the model's, (..., n_band), for redshifts (...); 0.0 without a correction. Pure jax."""
        if self.rest_offset is None:
            return 0.0
        log_rest = jnp.log10(jnp.asarray(self.band_wavelength, jnp.float32)) - jnp.log10(1.0 + jnp.asarray(redshift))[..., None]
        return jnp.interp(log_rest, jnp.log10(jnp.asarray(self.rest_wavelength, jnp.float32)),
                          jnp.asarray(self.rest_offset, jnp.float32))

    def model_flux(self, flux, field=None):
        """Zero-pointed model flux ``zp * F``; ``flux`` (..., n_band) nJy, ``field`` int broadcastable to (...)."""
        zp = jnp.asarray(self.zero_points, dtype=jnp.float32)
        if zp.ndim == 2:
            if field is None:
                raise ValueError("DataModel.model_flux: per-field zero points need a field index")
            zp = zp[jnp.asarray(field)]
        return flux * zp

    def log_likelihood(self, model_flux, flux, flux_err, mask, field=None):
        """Log likelihood summed over usable bands; normalised density of the observed fluxes.

        Shapes broadcast on the leading axes: ``model_flux`` (..., n_band) nJy
        before zero points; ``flux``, ``flux_err`` (..., n_band) nJy; ``mask``
        (..., n_band) bool; ``field`` int (...) when the zero points are per
        field. Returns (...). Masked bands contribute exactly 0 whatever their
        values (NaN included). Pure jax.
        """
        mu = self.model_flux(model_flux, field)
        floor = jnp.asarray(self.error_floor, dtype=jnp.float32)
        # masked entries are replaced before any arithmetic so NaN there cannot leak through gradients or sums
        flux = jnp.where(mask, flux, 0.0)
        flux_err = jnp.where(mask, flux_err, 1.0)
        var = flux_err**2 + (floor * mu) ** 2
        r2 = (flux - mu) ** 2 / var
        log_sigma = 0.5 * jnp.log(var)
        if self.student_t_nu is None:
            lp = -0.5 * r2 - log_sigma - 0.5 * _LOG_2PI
        else:
            nu = self.student_t_nu
            const = math.lgamma(0.5 * (nu + 1.0)) - math.lgamma(0.5 * nu) - 0.5 * math.log(nu * math.pi)
            lp = const - log_sigma - 0.5 * (nu + 1.0) * jnp.log1p(r2 / nu)
        return jnp.sum(jnp.where(mask, lp, 0.0), axis=-1)


_LEAVES = ("zero_points", "error_floor", "rest_offset")  # the numbers calibration changes
_STATIC = ("student_t_nu", "band_wavelength", "rest_wavelength")


def _flatten(dm: DataModel):
    leaves = tuple(None if getattr(dm, n) is None else np.asarray(getattr(dm, n), np.float32) for n in _LEAVES)
    return leaves, tuple(getattr(dm, n) for n in _STATIC)


def _unflatten(static, leaves) -> DataModel:
    # no validation: the leaves may be tracers (inside jit) or anything a tree map returns
    dm = object.__new__(DataModel)
    for name, value in zip(_LEAVES + _STATIC, tuple(leaves) + tuple(static)):
        object.__setattr__(dm, name, value)
    return dm


jax.tree_util.register_pytree_node(DataModel, _flatten, _unflatten)
