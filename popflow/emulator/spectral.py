"""Design "spectral": a rest-frame spectral emulator with exact redshifting, IGM and filter integration.

The network side emulates, per unit stellar mass formed and before the IGM
(Alsing et al. 2020, Speculator's spectral mode):

- the rest-frame continuum ``log10 L_lambda`` [Lsun/A] on the fixed rest grid of
  :mod:`popflow.sps.spectra` (807 pixels of 0.5 %, 424 A - 2.36 micron) as a PCA
  mean plus ``n_pca`` components whose coefficients come from a Speculator MLP;
- the log luminosities [Lsun] of every Cloudy emission line bagpipes puts inside
  that grid, from a second, smaller Speculator MLP, relative to the mass fraction of
  the youngest SFH bin (whose stars ionise the gas).

Both take the 13 transformed parameters of :func:`popflow.emulator.network.features`
(redshift included: the SFH bins depend on t_univ(z)) and the exact log mass fractions
of the seven SFH bins (:func:`spectral_inputs`). Everything after is analytic and pure
JAX (:func:`photometry_mag`):

    f_nu,b = (1+z) Lsun / (4 pi D_L^2 c) * [sum_k L_k I_k lam_k T_b((1+z) lam_k) w_k
                                            + sum_i L_i I_(p_i) lam_(p_i) T_b((1+z) lam_(p_i))]
             / sum_k T_b((1+z) lam_k) w_k / lam_k

with ``I`` bagpipes' Inoue et al. (2014) IGM table interpolated linearly in z (as
bagpipes does), lines as delta functions at their pixel ``p_i`` (where bagpipes puts
them), ``T_b`` the native filter curve (zero outside its ends) read off a table 64x finer
than the grid in ln lambda over the few hundred pixels the filter covers at that z
(:func:`filter_table`; bagpipes' own spectra through it match the simulator to 3.3e-3
mag at most, tests/test_spectral_emulator.py),
``D_L`` from :mod:`popflow.cosmology`: the photon-counting AB photometry of
``BagpipesSimulator``. Unit-mass magnitude ``31.4 - 2.5 log10(f_nu / nJy)``, floored at
``MAG_CAP``; the apparent magnitude adds ``-2.5 log_mass`` exactly. One emulator serves
every filter list: :meth:`SpectralEmulator.photometer` binds one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from popflow.cosmology import luminosity_distance
from popflow.emulator.model import Z_FLOOR
from popflow.emulator.network import features, mlp_apply
from popflow.filters import AB_ZERO_POINT_MAG_NJY, Filter, load_filter
from popflow.params import DEFAULT_SPACE, N_SFR_RATIOS, ParameterSpace
from popflow.sfh import log_mass_fractions

__all__ = ["SpectralEmulator", "SpectralPhotometer", "spectral_inputs", "rest_frame", "filter_table", "photometry_mag", "grid_to_jax", "Z_MAX", "OVERSAMPLE"]

Z_MAX = 6.0
MAG_CAP = 99.0
_LSUN_ERG_S = 3.826e33
_MPC_CM = 3.085677581e24
_C_ANGSTROM_PER_S = 2.99792458e18
# log10 of Lsun / (4 pi c * 1 nJy * Mpc_cm^2): f_nu [nJy] = 10**_LOG_K (1+z) num / den / D_L[Mpc]^2
_LOG_K = float(np.log10(_LSUN_ERG_S / (4.0 * np.pi * _C_ANGSTROM_PER_S * 1e-32 * _MPC_CM**2)))


_LN10 = float(np.log(10.0))
OVERSAMPLE = 64
"""Filter tables are sampled OVERSAMPLE times finer than the rest grid (in ln lambda)."""


def filter_table(curves, wave) -> dict[str, np.ndarray]:
    """Each filter curve tabulated on its own window of rest-grid pixels, for any redshift.

    ``wave`` (n_pix,) Angstrom must be uniform in ln lambda (spacing ``d``). At redshift z the
    first pixel a filter of native ends [lo, hi) sees is ``k0 = ceil(u)``, ``u = (ln(lo / wave[0])
    - ln(1+z)) / d``, and pixel ``k0 + j`` sits at the observed wavelength ``lo exp((j + phi) d)``
    with the phase ``phi = k0 - u`` in [0, 1). Returns ``table`` (n_bands, OVERSAMPLE + 1, W):
    ``table[b, r, j] = T_b(lo_b exp((j + r / OVERSAMPLE) d))`` (native curve interpolated linearly),
    ``W`` the widest filter in pixels plus one; ``u0`` (n_bands,) = ln(lo_b / wave[0]) / d and
    ``span`` (n_bands,) = ln(hi_b / lo_b) / d, in pixels, beyond which the transmission is zero
    (applied exactly by :func:`photometry_mag`).
    """
    d = _log_step(wave)
    lo = np.array([c.wavelength[0] for c in curves], np.float64)
    hi = np.array([c.wavelength[-1] for c in curves], np.float64)
    span = np.log(hi / lo) / d
    n_win = int(np.ceil(span.max())) + 1
    steps = np.arange(n_win)[None, :] + np.arange(OVERSAMPLE + 1)[:, None] / OVERSAMPLE  # (OVERSAMPLE + 1, W)
    table = np.stack([np.interp(lo_b * np.exp(steps * d), c.wavelength, c.transmission, right=0.0)
                      for lo_b, c in zip(lo, curves)])
    return {"table": table, "u0": np.log(lo / wave[0]) / d, "span": span}


def _log_step(wave) -> float:
    steps = np.diff(np.log(np.asarray(wave, np.float64)))
    if not np.allclose(steps, steps[0], rtol=1e-6):
        raise ValueError("spectral emulator: the rest grid must be uniform in ln(wavelength)")
    return float(steps[0])


def grid_to_jax(grid: dict) -> dict:
    """The arrays :func:`photometry_mag` needs, from a spectra store's grid arrays (NumPy).

    ``width / wave`` must be constant (pixels of equal ln-width: ``dlnw``). The IGM table
    (n_pix, n_z) there is cut to the pixels it dims (``igm`` (n_z, n_igm), one redshift per row).
    """
    wave = np.asarray(grid["wave"], np.float64)
    ratio = np.asarray(grid["width"], np.float64) / wave
    if not np.allclose(ratio, ratio[0], rtol=1e-6):
        raise ValueError("spectral emulator: pixel widths must be a constant fraction of the wavelength")
    igm = np.asarray(grid["igm_table"], np.float64)  # (n_pix or fewer: the dimmed pixels, n_z)
    n_igm = int(np.flatnonzero((igm < 1.0).any(axis=1)).max(initial=-1)) + 1
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"wave": f32(wave), "width": f32(grid["width"]), "line_pixel": jnp.asarray(grid["line_pixel"], jnp.int32),
            "igm_z": f32(grid["igm_z"]), "igm": f32(igm[:n_igm].T),
            "dlnw": float(ratio[0]), "log_step": _log_step(wave)}


def photometry_mag(log_cont, log_lines, z, grid: dict, filt: dict):
    """Unit-mass AB magnitudes of rest-frame pieces; one galaxy (vmap for many).

    ``log_cont`` (n_pix,) log10 Lsun/A and ``log_lines`` (n_lines,) log10 Lsun, before the IGM;
    ``z`` scalar in [0, Z_MAX]; ``grid``: :func:`grid_to_jax`; ``filt``: :func:`filter_table` as
    JAX arrays. Each band reads only its own window of pixels (a few dozen), the filter at one
    shared phase interpolated between the table's rows and zeroed exactly beyond its red end.
    Returns (n_bands,) mag, at most MAG_CAP.
    """
    wave = grid["wave"]
    n_win = filt["table"].shape[-1]
    # photons per pixel, lines in theirs: (L_lambda w + L_line) lam (exp, not 10**: a fifth of the cost on CPU)
    energy = (jnp.exp(_LN10 * log_cont) * grid["width"]).at[grid["line_pixel"]].add(jnp.exp(_LN10 * log_lines)) * wave
    zs = grid["igm_z"]
    j = jnp.clip(jnp.searchsorted(zs, z, side="right"), 1, zs.shape[0] - 1)
    frac = (z - zs[j - 1]) / (zs[j] - zs[j - 1])
    n_igm = grid["igm"].shape[1]
    igm = (1.0 - frac) * grid["igm"][j - 1] + frac * grid["igm"][j]
    energy = jnp.concatenate([energy[:n_igm] * igm, energy[n_igm:], jnp.zeros(n_win, energy.dtype)])
    u = filt["u0"] - jnp.log1p(z) / grid["log_step"]
    k0 = jnp.ceil(u)
    phase = (k0 - u) * OVERSAMPLE
    r0 = jnp.clip(jnp.floor(phase), 0, OVERSAMPLE - 1).astype(jnp.int32)
    f = (phase - r0)[:, None]
    steps = jnp.arange(n_win)[None, :] + (k0 - u)[:, None]
    rows = jax.vmap(lambda tab, r: jax.lax.dynamic_slice_in_dim(tab, r, 2, 0))(filt["table"], r0)  # (n_bands, 2, W)
    t = jnp.where(steps < filt["span"][:, None], (1.0 - f) * rows[:, 0] + f * rows[:, 1], 0.0)
    seg = jax.vmap(lambda k: jax.lax.dynamic_slice_in_dim(energy, k, n_win))(k0.astype(jnp.int32))
    num = jnp.sum(t * seg, axis=-1)
    den = grid["dlnw"] * jnp.sum(t, axis=-1)
    dl = luminosity_distance(jnp.maximum(z, Z_FLOOR))
    log_f = _LOG_K + jnp.log10(1.0 + z) - 2.0 * jnp.log10(dl) + jnp.log10(jnp.maximum(num, 1e-38) / den)
    return jnp.minimum(AB_ZERO_POINT_MAG_NJY - 2.5 * log_f, MAG_CAP)


def spectral_inputs(space: ParameterSpace, theta):
    """Network inputs and the line baseline; theta (..., dim) physical ->
    (x (..., dim - 1 + 7), log_young (...)).

    ``x``: the transformed parameters of :func:`popflow.emulator.network.features` followed by
    the exact log10 mass fractions of the seven SFH bins (:func:`popflow.sfh.log_mass_fractions`,
    a closed function of the SFR ratios and t_univ(z) that the network would otherwise have to
    learn). ``log_young``: the youngest bin's log10 fraction. bagpipes' nebular lines come from
    stars younger than 10 Myr, a fixed third of that bin, so log L_line - log_young depends on
    metallicities, ionisation and dust only: the line network predicts that difference.
    """
    theta = jnp.asarray(theta, jnp.float32)
    idx = [space.index(f"logsfr_ratio_{i}") for i in range(1, N_SFR_RATIOS + 1)]
    log_frac = log_mass_fractions(theta[..., idx], theta[..., space.index("redshift")])
    return jnp.concatenate([features(space, theta), log_frac], axis=-1), log_frac[..., 0]


def rest_frame(w: dict, space: ParameterSpace, theta):
    """The networks of weights ``w`` (:class:`SpectralEmulator`) as a pure function of ``w``:
    theta (..., dim) physical -> (log_cont (..., n_pix), log_lines (..., n_lines)), pre-IGM, unit mass."""
    x, log_young = spectral_inputs(space, theta)
    x = (x - w["x_mean"]) / w["x_std"]
    coeff = mlp_apply(w["cont"], x) * w["c_std"] + w["c_mean"]
    log_cont = w["pca_mean"] + coeff @ w["pca_basis"]
    log_lines = log_young[..., None] + mlp_apply(w["lines"], x) * w["l_std"] + w["l_mean"]
    return log_cont, log_lines


class SpectralEmulator:
    """Rest-frame continuum (PCA + MLP) and line (MLP) emulator; see the module docstring.

    ``weights``: ``cont`` and ``lines`` layer trees (:func:`mlp_apply`), ``x_mean``, ``x_std`` (13,),
    ``c_mean``, ``c_std`` (n_pca,), ``pca_mean`` (n_pix,), ``pca_basis`` (n_pca, n_pix),
    ``l_mean``, ``l_std`` (n_lines,); ``grid``: the arrays of
    :meth:`popflow.sps.spectra.RestFrameSimulator.grid_arrays`.
    """

    def __init__(self, weights: dict, grid: dict, space: ParameterSpace = DEFAULT_SPACE):
        self.space = space
        self.w = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), weights)
        self.wave = np.asarray(grid["wave"], np.float64)
        self.grid = grid_to_jax(grid)

    def rest_frame(self, theta):
        """theta (..., dim) physical -> (log_cont (..., n_pix), log_lines (..., n_lines)), pre-IGM, unit mass."""
        return rest_frame(self.w, self.space, theta)

    def photometer(self, filters, search_path=None) -> "SpectralPhotometer":
        """Bind a filter list (identifiers as :func:`popflow.filters.load_filter`, or :class:`Filter` objects)."""
        return SpectralPhotometer(self, list(filters), search_path)


class SpectralPhotometer:
    """A :class:`SpectralEmulator` bound to filters: ``magnitudes(theta)`` like :class:`Emulator`'s."""

    def __init__(self, emulator: SpectralEmulator, filters, search_path=None):
        self.emulator = emulator
        self.space = emulator.space
        curves = [f if isinstance(f, Filter) else load_filter(f, search_path) for f in filters]
        self.filters = tuple(c.name for c in curves)
        self.bands = self.filters
        table = filter_table(curves, emulator.wave)
        self._filt = {k: jnp.asarray(v, jnp.float32) for k, v in table.items()}
        self._i_mass = self.space.index("log_mass")
        self._i_z = self.space.index("redshift")

    def magnitudes(self, theta, weights: dict | None = None):
        """Apparent AB magnitudes, (..., dim) -> (..., n_bands); ``weights`` replaces the emulator's
        (a pure function of them, for training through the photometry)."""
        theta = jnp.asarray(theta, jnp.float32)
        log_cont, log_lines = rest_frame(self.emulator.w if weights is None else weights, self.space, theta)
        z = theta[..., self._i_z]
        flat = jax.vmap(lambda c, l, zz: photometry_mag(c, l, zz, self.emulator.grid, self._filt))(
            log_cont.reshape(-1, log_cont.shape[-1]), log_lines.reshape(-1, log_lines.shape[-1]), z.reshape(-1))
        return flat.reshape(theta.shape[:-1] + (-1,)) - 2.5 * theta[..., self._i_mass, None]

    def in_domain(self, theta):
        """Mask (...,): inside the box with Z_FLOOR <= z <= Z_MAX."""
        theta = jnp.asarray(theta)
        z = theta[..., self._i_z]
        return self.space.in_bounds(theta) & (z >= Z_FLOOR) & (z <= Z_MAX)
