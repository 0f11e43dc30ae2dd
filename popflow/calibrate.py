"""Data-model calibration on a spectroscopic subset: per-band zero points and error floors.

With the redshift of each galaxy fixed to its spectroscopic value, the galaxies'
SED parameters are fitted (maximum a posteriori under the emulator, the prior and
a robust Student-t likelihood) and per-band multiplicative zero points shared by
all galaxies are measured, as COSMOS (Ilbert et al. 2006, 2009: offsets of the
best-fit templates at z_spec) and pop-cosmos (Alsing et al. 2024: zero points
calibrated on the spectroscopic sample) do. Two methods (:func:`calibrate`):

- ``"median"`` (default): every parameter but the redshift free, zero points fixed
  during the fit, then multiplied by the median observed / model flux ratio per
  band (:func:`zero_point_update`, S/N >= snr_min detections), a few times;
- ``"joint"``: a few SED directions per galaxy (:data:`CALIBRATION_GROUPS`) and the
  zero points optimised together, with a Gaussian prior (0.1 mag) on the offsets.

The overall scale of the zero points is degenerate with stellar mass (the mass
scaling is exact), so they are normalised to a geometric mean of 1.

The fractional error floor of band b is the value that makes the robust scatter
(1.4826 x median absolute deviation) of the normalised residuals
(f - zp F) / sqrt(s^2 + (floor F)^2) equal to one, by default never below the
emulator's measured floor. Best-fit residuals with few free directions are
under-dispersed (the fit absorbs part of the noise), so for ``"joint"`` each
galaxy's residuals are scaled by sqrt(n_bands / (n_bands - n_free)).

A redshift prior n(z) from the same spectroscopic redshifts (:func:`nz_from_redshifts`)
feeds ``AnalyticPrior(nz=...)``.

Functional core: :func:`fit_fixed_z`, :func:`zero_point_update`, :func:`error_floor`,
:func:`nz_from_redshifts` are pure array functions; :func:`calibrate` iterates them;
:func:`calibrate_catalog`, :func:`save_datamodel` and :func:`load_datamodel` are the shell.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from popflow.datamodel import LOG_FLOOR_PER_MAG, DataModel
from popflow.fit import mag_to_njy

__all__ = ["nz_from_redshifts", "CALIBRATION_GROUPS", "CALIBRATION_METHODS", "REST_RANGE", "rest_frame_update", "free_all", "prior_median", "fit_fixed_z", "zero_point_update", "error_floor", "calibrate", "redshift_calibration", "scale_floors", "tune_floor_scale", "calibrate_catalog", "save_datamodel", "load_datamodel"]

NMAD_SCALE = 1.4826
_U_TINY = 1e-6


def _to_latent(space, theta):
    """Physical -> probit latent, clipped so that the bounds map to finite values."""
    from jax.scipy.special import ndtri

    u = (theta - space.lower) / (space.upper - space.lower)
    return ndtri(jnp.clip(u, _U_TINY, 1.0 - _U_TINY))


CALIBRATION_GROUPS = (("log_mass",), ("log_zstar",), ("dust2",), tuple(f"logsfr_ratio_{i}" for i in range(1, 7)))
"""Free directions of the fixed-redshift fit: mass, metallicity, dust and one tied SFH slope (all
log SFR ratios equal: a rising or declining exponential-like history). The other parameters stay at
the prior's median. A few free directions per galaxy, like a template fit, leave the residuals
degrees of freedom to constrain the zero points; with all 13 free, each galaxy's SED absorbs them."""


def _group_matrix(space, groups):
    """(dim, k) 0/1 matrix: column j moves every parameter of group j; checks the names."""
    P = np.zeros((space.dim, len(groups)), np.float32)
    for j, group in enumerate(groups):
        for name in group:
            if name not in space.names:
                raise ValueError(f"calibration group {group}: {name!r} is not a parameter of the space ({', '.join(space.names)})")
            if name == "redshift":
                raise ValueError("calibration groups must not free the redshift (it is fixed to z_spec)")
            P[space.index(name), j] = 1.0
    return P


def prior_median(key, prior, n: int = 4096) -> np.ndarray:
    """Per-parameter median of n prior draws, (dim,) physical."""
    return np.median(np.asarray(prior.sample(key, n)), axis=0)


def fit_fixed_z(key, flux, flux_err, mask, z_spec, *, emulator, prior, datamodel: DataModel, reference,
                groups=CALIBRATION_GROUPS, fit_zero_points: bool = True, zp_sigma_mag: float = 0.1, n_cand: int = 256, n_steps: int = 400,
                learning_rate: float = 0.05, batch_size: int = 256):
    """Joint MAP of per-galaxy parameters and shared zero points at redshift fixed to ``z_spec``.

    flux, flux_err (n_gal, n_band) nJy, mask (n_gal, n_band) bool, z_spec (n_gal,);
    ``reference`` (dim,) physical values of the parameters that stay fixed (e.g.
    :func:`prior_median`). In the probit latent space phi = phi_ref + P x with P the
    (dim, k) group matrix; ``n_cand`` candidates x ~ N(0, 1) (shared, mass then set to the
    best flux amplitude) give each galaxy's start; then Adam runs ``n_steps`` on the summed
    log posterior (likelihood with the ``datamodel``'s floors + ``prior.log_prob_latent``) over
    all galaxies' x and the log zero points together (a joint optimum: each galaxy's
    parameters and the shared offsets move at once, so offsets that the SEDs could
    partly mimic are not left half-corrected). Zero points start at ``datamodel.zero_points``,
    are normalised to geometric mean 1, carry a Gaussian prior of ``zp_sigma_mag`` (mag) around
    0 (offsets that every galaxy's SED could mimic together, e.g. a smooth colour tilt
    against a dust or SFH shift, are not constrained by the data and stay near 0 instead of
    drifting), and stay fixed when ``fit_zero_points`` is False.
    Returns (theta (n_gal, dim) physical, model_flux (n_gal, n_band) nJy before zero points (with the data
    model's rest-frame correction),
    log_post (n_gal,), zero_points (n_band,)).
    """
    space = emulator.space
    iz, im = space.index("redshift"), space.index("log_mass")
    P = jnp.asarray(_group_matrix(space, groups))
    k = P.shape[1]
    jm = int(np.argmax(np.asarray(P)[im])) if np.asarray(P)[im].any() else None
    lo_m, hi_m = float(space.lower[im]), float(space.upper[im])
    phi_ref = _to_latent(space, jnp.asarray(reference, jnp.float32))
    flux = jnp.asarray(np.where(mask, flux, 0.0), jnp.float32)
    flux_err = jnp.asarray(np.where(mask, flux_err, 1.0), jnp.float32)
    mask = jnp.asarray(mask, bool)
    z = jnp.clip(jnp.asarray(z_spec, jnp.float32), space.lower[iz], space.upper[iz])
    x_cand = jax.random.normal(key, (n_cand * k,)).reshape(n_cand, k)

    def model_magnitudes(theta):
        """The emulator's magnitudes plus the data model's rest-frame correction."""
        return emulator.magnitudes(theta) + datamodel.rest_correction(theta[..., iz])

    def latent(x, phi_z):
        return (phi_ref + P @ x).at[iz].set(phi_z)

    def log_post(phi, f, s, m):
        theta = space.from_latent(phi)
        model = mag_to_njy(model_magnitudes(theta))
        lp = datamodel.log_likelihood(model, f, s, m) + prior.log_prob_latent(phi)
        return jnp.where(emulator.in_domain(theta) & jnp.isfinite(lp), lp, -jnp.inf)

    def start(f, s, m, phi_z):
        """Best candidate x (k,) for one galaxy at its redshift."""
        phi = jax.vmap(latent, in_axes=(0, None))(x_cand, phi_z)
        if jm is not None:  # mass to the best flux amplitude (exact mass scaling), back to latent
            theta = space.from_latent(phi)
            unit = datamodel.model_flux(mag_to_njy(model_magnitudes(theta)))
            w = jnp.where(m, 1.0 / s**2, 0.0)
            amp = jnp.sum(w * f * unit, -1) / jnp.maximum(jnp.sum(w * unit * unit, -1), 1e-30)
            mass = jnp.clip(theta[:, im] + jnp.log10(jnp.maximum(amp, 1e-30)), lo_m, hi_m)
            phi_m = _to_latent(space, theta.at[:, im].set(mass))[:, im]
            x = x_cand.at[:, jm].set(phi_m - phi_ref[im])
        else:
            x = x_cand
        score = jax.vmap(lambda xi: log_post(latent(xi, phi_z), f, s, m))(x)
        return x[jnp.argmax(jnp.where(jnp.isnan(score), -jnp.inf, score))]

    def total_loss(params, f, s, m, phi_z):
        """-sum_g log posterior of every galaxy at shared zero points exp(u - mean u)."""
        x, u = params
        dm = DataModel(np.ones(len(emulator.bands)), datamodel.error_floor, datamodel.student_t_nu)
        zp = jnp.exp(u - jnp.mean(u))
        phi = jax.vmap(latent)(x, phi_z)
        theta = space.from_latent(phi)
        model = zp * mag_to_njy(model_magnitudes(theta))
        lp = dm.log_likelihood(model, f, s, m) + prior.log_prob_latent(phi)
        lp = jnp.where(emulator.in_domain(theta) & jnp.isfinite(lp), lp, -1e6)
        zp_mag = (2.5 / math.log(10.0)) * (u - jnp.mean(u))
        return -jnp.sum(lp) + 0.5 * jnp.sum((zp_mag / zp_sigma_mag) ** 2), lp

    opt = optax.adam(learning_rate)

    @jax.jit
    def run(f, s, m, zg, u0):
        phi_z = _to_latent(space, jnp.zeros((zg.shape[0], space.dim)).at[:, iz].set(zg))[:, iz]
        x0 = jax.lax.map(lambda a: start(*a), (f, s, m, phi_z), batch_size=batch_size)
        params = (x0, u0)
        grad = jax.grad(lambda p: total_loss(p, f, s, m, phi_z)[0])
        free_u = jnp.asarray(fit_zero_points, jnp.float32)

        def step(carry, _):
            p, st = carry
            gx, gu = grad(p)
            g = (jnp.where(jnp.isfinite(gx), gx, 0.0), jnp.where(jnp.isfinite(gu), gu, 0.0) * free_u)
            upd, st = opt.update(g, st, p)
            return (optax.apply_updates(p, upd), st), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=n_steps)
        x, u = params
        _, lp = total_loss(params, f, s, m, phi_z)
        theta = space.from_latent(jax.vmap(latent)(x, phi_z)).at[:, iz].set(zg)
        return theta, mag_to_njy(model_magnitudes(theta)), lp, jnp.exp(u - jnp.mean(u))

    u0 = jnp.log(jnp.asarray(datamodel.zero_points, jnp.float32))
    theta, model, lp, zp = run(flux, flux_err, mask, z, u0)
    return np.asarray(theta), np.asarray(model, np.float64), np.asarray(lp), np.asarray(zp, np.float64)


def zero_point_update(flux, flux_err, mask, model_flux, zero_points, *, snr_min: float = 5.0, min_galaxies: int = 20):
    """Multiplicative correction per band: median of f / (zp F) over S/N >= snr_min detections.

    flux, flux_err, mask, model_flux (n_gal, n_band); zero_points (n_band,). Returns
    (ratio (n_band,), n_used (n_band,)). A band with fewer than ``min_galaxies`` usable
    galaxies keeps ratio 1.
    """
    flux = np.asarray(flux, np.float64)
    zp = np.asarray(zero_points, np.float64)
    pred = zp * np.asarray(model_flux, np.float64)
    good = np.asarray(mask) & (flux >= snr_min * np.asarray(flux_err)) & (pred > 0)
    ratio = np.ones(flux.shape[1])
    n_used = good.sum(axis=0)
    for b in range(flux.shape[1]):
        if n_used[b] >= min_galaxies:
            ratio[b] = float(np.median(flux[good[:, b], b] / pred[good[:, b], b]))
    return ratio, n_used


def error_floor(flux, flux_err, mask, model_flux, zero_points, *, n_free: int = 0, minimum=None, max_floor: float = 0.5):
    """Fractional floor per band that makes the NMAD of the normalised residuals one.

    Residuals r = (f - zp F) / sqrt(s^2 + (floor zp F)^2) over unmasked bands, scaled by
    sqrt(n_g / (n_g - n_free)) for a galaxy with n_g usable bands fitted with ``n_free``
    free parameters (best-fit residuals are under-dispersed by that factor); the NMAD
    decreases monotonically with the floor, so bisection finds it (0 when the catalogue
    errors alone already give NMAD <= 1; ``max_floor`` caps it). ``minimum`` (n_band,) is a
    lower bound (the emulator's measured floor). Returns (floor (n_band,), nmad_before (n_band,)).
    """
    flux = np.asarray(flux, np.float64)
    err = np.asarray(flux_err, np.float64)
    mu = np.asarray(zero_points, np.float64) * np.asarray(model_flux, np.float64)
    n_band = flux.shape[1]
    n_g = np.asarray(mask).sum(axis=1)
    dof = np.sqrt(n_g / np.maximum(n_g - n_free, 1))
    floor = np.zeros(n_band)
    nmad0 = np.full(n_band, np.nan)
    for b in range(n_band):
        m = np.asarray(mask)[:, b] & np.isfinite(flux[:, b]) & (err[:, b] > 0)
        if m.sum() < 2:
            continue
        d, s, f = dof[m] * (flux[m, b] - mu[m, b]), err[m, b], mu[m, b]

        def nmad(fl):
            r = d / np.sqrt(s**2 + (fl * f) ** 2)
            return NMAD_SCALE * np.median(np.abs(r - np.median(r)))

        nmad0[b] = nmad(0.0)
        if nmad0[b] <= 1.0:
            continue
        lo, hi = 0.0, max_floor
        if nmad(hi) > 1.0:
            floor[b] = hi
            continue
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if nmad(mid) > 1.0 else (lo, mid)
        floor[b] = hi
    if minimum is not None:
        floor = np.maximum(floor, np.asarray(minimum, np.float64))
    return floor, nmad0


REST_RANGE = (900.0, 25_000.0)  # Angstrom: the rest-frame correction's default node range (Lyman limit to K band)


def rest_frame_update(flux, flux_err, mask, model_flux, zero_points, redshift, band_wavelength, nodes, *,
                      snr_min: float = 5.0, min_count: int = 20):
    """Rest-frame correction step: median residual data - model (mag) per rest-wavelength node.

    flux, flux_err, mask, model_flux (n_gal, n_band) (model before zero points, with the current
    correction); zero_points, band_wavelength (n_band,) Angstrom; redshift (n_gal,); nodes (n_node,)
    increasing, Angstrom. Each S/N >= snr_min detection goes to the node nearest (in log wavelength)
    to its rest wavelength band_wavelength / (1 + z). Returns (offsets (n_node,) mag, 0 where fewer
    than ``min_count`` detections, the overall count-weighted mean removed (degenerate with mass),
    counts (n_node,)).
    """
    flux = np.asarray(flux, np.float64)
    pred = np.asarray(zero_points, np.float64) * np.asarray(model_flux, np.float64)
    good = np.asarray(mask) & (flux >= snr_min * np.asarray(flux_err)) & (pred > 0)
    resid = -2.5 * np.log10(np.where(good, flux, 1.0) / np.where(good, pred, 1.0))
    log_rest = np.log10(np.asarray(band_wavelength, np.float64))[None, :] - np.log10(1.0 + np.asarray(redshift, np.float64))[:, None]
    log_nodes = np.log10(np.asarray(nodes, np.float64))
    nearest = np.argmin(np.abs(log_rest[..., None] - log_nodes), axis=-1)
    offsets, counts = np.zeros(len(log_nodes)), np.zeros(len(log_nodes), int)
    for k in range(len(log_nodes)):
        sel = good & (nearest == k)
        counts[k] = int(sel.sum())
        if counts[k] >= min_count:
            offsets[k] = float(np.median(resid[sel]))
    used = counts >= min_count
    if used.any():
        offsets[used] -= np.average(offsets[used], weights=counts[used])
    return offsets, counts


def free_all(space) -> tuple:
    """Calibration groups that free every parameter but the redshift, one group each."""
    return tuple((n,) for n in space.names if n != "redshift")


CALIBRATION_METHODS = ("median", "joint")


def calibrate(key, flux, flux_err, mask, z_spec, *, emulator, prior, base: DataModel | None = None, method: str = "median",
              n_iter: int | None = None, tol: float = 0.002, snr_min: float = 5.0, robust_nu: float | None = 4.0,
              emulator_floor: bool = True, rest_frame: bool = False, band_wavelength=None, rest_nodes: int = 24,
              fit_kwargs: dict | None = None, log=None):
    """Zero points and error floors from a spectroscopic subset (module docstring).

    Inputs as :func:`fit_fixed_z`. ``base``: the starting data model (default the
    emulator's floor, unit zero points); its Student-t setting is what the result keeps.
    Every iteration fits the galaxies at z_spec with a Student-t likelihood of ``robust_nu``
    degrees of freedom (a few galaxies with bad photometry or missing physics do not pull
    the zero points; None: Gaussian), then re-measures the floors from the residuals.

    ``method="median"`` (default; Ilbert et al. 2006, 2009): every parameter but the redshift is
    free (:func:`free_all`), the zero points stay fixed during the fit and are then multiplied by
    the median observed / model ratio of each band (:func:`zero_point_update`); ``n_iter``
    default 2. A colour tilt shared by all bands is nearly degenerate with the population's
    dust and SFH, so the joint optimum drifts along it; a few median steps stay close to the
    smallest offsets that explain the residuals (on zCOSMOS-bright the joint fit with four free
    directions moved u and J by -0.5 and +0.6 mag, the median steps by +0.03 and +0.22; see
    BENCHMARKS.md). Floors use ``n_free=0`` (the prior holds most of the 13 directions).
    ``method="joint"``: zero points and :data:`CALIBRATION_GROUPS` fitted jointly
    (:func:`fit_fixed_z`); ``n_iter`` default 3.
    ``rest_frame``: also calibrate a rest-frame correction (:class:`~popflow.datamodel.DataModel`) on
    ``rest_nodes`` log-spaced nodes over :data:`REST_RANGE` (or on the nodes of ``base``'s correction,
    starting from its values); every iteration adds the median residual
    per node (:func:`rest_frame_update`) after the zero-point step. Needs ``band_wavelength``
    (n_band,) Angstrom, the bands' effective wavelengths (or a ``base`` that has them).
    Stops after ``n_iter`` iterations or when no zero point moved by more than ``tol``
    (fractional) and no rest-frame offset by more than ``tol`` mag. ``emulator_floor``: floors never
    go below the emulator's measured one.
    Returns (DataModel, report: method, zero points in mag, per-iteration values, per-band
    counts, residual scatter and the median observed/model ratio left per band).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate: method={method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    n_band = len(emulator.bands)
    base = base if base is not None else DataModel.from_emulator(emulator)
    if base.n_fields is not None:
        raise ValueError("calibrate fits one set of zero points; the base data model has per-field zero points")
    emu_floor = LOG_FLOOR_PER_MAG * np.asarray(emulator.error_floor, np.float64)
    flux = np.asarray(flux, np.float32)
    flux_err = np.asarray(flux_err, np.float32)
    mask = np.asarray(mask, bool)
    z_spec = np.asarray(z_spec, np.float32)
    if flux.shape[1] != n_band:
        raise ValueError(f"calibrate: {flux.shape[1]} bands in the photometry but the emulator has {n_band} ({', '.join(emulator.bands)})")
    if not np.all(np.isfinite(z_spec)):
        raise ValueError(f"calibrate: {int(np.sum(~np.isfinite(z_spec)))} galaxies have no finite z_spec; select the spectroscopic subset first")
    zp = np.asarray(base.zero_points, np.float64)
    zp = zp / math.exp(float(np.mean(np.log(zp))))
    band_wavelength = base.band_wavelength if band_wavelength is None else band_wavelength
    if rest_frame and band_wavelength is None:
        raise ValueError("calibrate: rest_frame=True needs band_wavelength (the bands' effective wavelengths, Angstrom)")
    nodes, offsets = base.rest_wavelength, base.rest_offset  # a base's correction is kept (and refined with rest_frame)
    if rest_frame and offsets is None:
        nodes, offsets = np.geomspace(*REST_RANGE, rest_nodes), np.zeros(rest_nodes)
    counts = None
    minimum = emu_floor if emulator_floor else None
    floor = np.asarray(base.error_floor, np.float64) if minimum is None else np.maximum(np.asarray(base.error_floor, np.float64), minimum)
    history = []
    fit_kwargs = dict(fit_kwargs or {})
    if "reference" not in fit_kwargs:
        fit_kwargs["reference"] = prior_median(jax.random.fold_in(key, 10_000), prior)
    if method == "median":
        fit_kwargs.setdefault("groups", free_all(emulator.space))
        fit_kwargs["fit_zero_points"] = False
        n_free = 0
    else:
        fit_kwargs.setdefault("groups", CALIBRATION_GROUPS)
        n_free = len(fit_kwargs["groups"])
    n_iter = (2 if method == "median" else 3) if n_iter is None else n_iter
    for it in range(n_iter):
        dm = DataModel(zp, floor, robust_nu, band_wavelength, nodes, offsets)
        _, model, lp, new_zp = fit_fixed_z(jax.random.fold_in(key, it), flux, flux_err, mask, z_spec,
                                           emulator=emulator, prior=prior, datamodel=dm, **fit_kwargs)
        if method == "median":
            ratio, _ = zero_point_update(flux, flux_err, mask, model, zp, snr_min=snr_min)
            new_zp = zp * ratio
            new_zp = new_zp / math.exp(float(np.mean(np.log(new_zp))))
        change = new_zp / zp
        zp = new_zp
        step = np.zeros(1)
        if rest_frame:
            step, counts = rest_frame_update(flux, flux_err, mask, model, zp, z_spec, band_wavelength, nodes, snr_min=snr_min)
            offsets = offsets + step
        floor, nmad0 = error_floor(flux, flux_err, mask, model, zp, n_free=n_free, minimum=minimum)
        ratio, n_used = zero_point_update(flux, flux_err, mask, model, zp, snr_min=snr_min)
        history.append({"iteration": it, "zero_points": zp.tolist(), "error_floor": floor.tolist(),
                        "residual_median_ratio": ratio.tolist(), "median_log_post": float(np.median(lp)),
                        **({"rest_offset_mag": np.asarray(offsets).tolist()} if rest_frame else {})})
        if log is not None:
            log(f"calibrate: iteration {it}: zero points [mag] " + " ".join(f"{b}={-2.5 * np.log10(z):+.4f}" for b, z in zip(emulator.bands, zp))
                + "; floors " + " ".join(f"{f:.3f}" for f in floor))
        if np.all(np.abs(change - 1.0) < tol) and np.all(np.abs(step) < tol):
            break
    report = {
        "method": method,
        "n_galaxies": int(flux.shape[0]),
        "n_used_snr_min": n_used.tolist(),
        "snr_min": snr_min,
        "residual_nmad_no_floor": nmad0.tolist(),
        "residual_median_ratio": ratio.tolist(),
        "zero_point_mag": (-2.5 * np.log10(zp)).tolist(),
        "robust_nu": robust_nu,
        "emulator_floor": emulator_floor,
        "groups": [list(g) for g in fit_kwargs["groups"]],
        "iterations": history,
    }
    if rest_frame:
        report |= {"rest_wavelength": np.asarray(nodes).tolist(), "rest_offset_mag": np.asarray(offsets).tolist(), "rest_counts": counts.tolist()}
    return DataModel(zp, floor, base.student_t_nu, band_wavelength, nodes, offsets), report


COVERAGE_TARGET = 0.68  # central credible interval whose coverage the floor scale is tuned to
FLOOR_SCALE_STEP = math.sqrt(2.0)  # ratio between successive floor scales tried by :func:`tune_floor_scale`
FLOOR_SCALE_TRIES = 5  # scales tried at most, counting 1


def redshift_calibration(key, flux, flux_err, mask, z_spec, *, emulator, prior, datamodel: DataModel, settings, chunk: int = 64) -> dict:
    """How well free-redshift fits of galaxies with known redshifts are calibrated.

    The galaxies are fitted with their redshift free (:func:`popflow.fit.fit_chunk`, ``chunk``
    galaxies at a time) and their spectroscopic redshifts ``z_spec`` (n_gal,) scored against the
    redshift draws. Returns coverage of the central 68 % and 95 % intervals, the PIT KS distance,
    sigma_NMAD and the bias of the median redshift, and ``n``, the galaxies scored.
    """
    from popflow import metrics
    from popflow.fit import fit_chunk

    i_z = emulator.space.index("redshift")
    draws = []
    n_gal = flux.shape[0]
    for start in range(0, n_gal, chunk):
        sl = slice(start, start + chunk)
        out = fit_chunk(jax.random.fold_in(key, start), flux[sl], flux_err[sl], mask[sl], emulator=emulator, prior=prior,
                        datamodel=datamodel, settings=settings, pad_to=min(chunk, n_gal))
        draws.append(out["samples"][..., i_z].reshape(out["samples"].shape[0], -1))
    z = np.concatenate(draws)
    ok = np.isfinite(z).any(axis=1)
    pit = metrics.pit_from_samples(z[ok], z_spec[ok])
    e = metrics.scaled_errors(np.nanmedian(z[ok], axis=1), z_spec[ok])
    return {"coverage_68": metrics.coverage(pit, 0.68), "coverage_95": metrics.coverage(pit, 0.95), "pit_ks": metrics.ks_uniform(pit),
            "sigma_nmad": metrics.sigma_nmad(e), "bias": metrics.bias(e), "n": int(ok.sum())}


def scale_floors(datamodel: DataModel, scale: float, minimum=None) -> DataModel:
    """``datamodel`` with its error floors times ``scale``, never below ``minimum`` (n_band,) when given."""
    floor = scale * np.asarray(datamodel.error_floor, np.float64)
    if minimum is not None:
        floor = np.maximum(floor, minimum)
    return dataclasses.replace(datamodel, error_floor=tuple(floor.tolist()))


def tune_floor_scale(key, flux, flux_err, mask, z_spec, *, emulator, prior, datamodel: DataModel, settings=None,
                     target: float = COVERAGE_TARGET, emulator_floor: bool = True, chunk: int = 64, log=None):
    """Scale the error floors so that free-redshift fits of spectroscopic galaxies are calibrated.

    Floors measured at z_spec are per-band residual scatter. The SPS model's mismatch with real
    galaxies is smooth in wavelength, so it moves the colours that set the redshift less than
    independent per-band errors of that size would: with the floors as measured, the redshift
    posteriors are too wide (on zCOSMOS-bright 0.81 of the 68 % intervals held z_spec; BENCHMARKS.md).
    This chooses one scale for all floors from the galaxies given here (keep them apart from the
    test galaxies; :func:`calibrate_catalog` takes them apart from the calibration subset): it fits
    them with the redshift free (:func:`redshift_calibration`) at floor scales 1, then
    1/:data:`FLOOR_SCALE_STEP`, 1/2, ... while the 68 % coverage exceeds ``target`` (or upward
    while it falls short), at most :data:`FLOOR_SCALE_TRIES` scales, and interpolates the scale
    at which the coverage equals ``target`` linearly in log scale between the two that bracket it.
    The error of the chosen scale is set by the binomial error of the coverage, sqrt(0.68 x 0.32 / n)
    (0.027 for 300 galaxies). Floors never go below the emulator's measured floor with ``emulator_floor``.
    ``prior``: the prior the catalogue will be fitted with (its n(z) shapes the redshift posteriors).
    ``settings``: :class:`popflow.fit.FitSettings` (default: its defaults).
    Returns (DataModel with the scaled floors, report: chosen scale, whether it is bracketed, and the
    scores at every scale tried).
    """
    from popflow.fit import FitSettings

    settings = FitSettings() if settings is None else settings
    flux, flux_err = np.asarray(flux, np.float32), np.asarray(flux_err, np.float32)
    mask, z_spec = np.asarray(mask, bool), np.asarray(z_spec, np.float64)
    minimum = LOG_FLOOR_PER_MAG * np.asarray(emulator.error_floor, np.float64) if emulator_floor else None
    tried = []

    def score(scale):
        res = redshift_calibration(key, flux, flux_err, mask, z_spec, emulator=emulator, prior=prior,
                                   datamodel=scale_floors(datamodel, scale, minimum), settings=settings, chunk=chunk)
        tried.append({"scale": scale, **res})
        if log is not None:
            log(f"tune_floor_scale: floors x {scale:.3f}: coverage 68% {res['coverage_68']:.3f}, 95% {res['coverage_95']:.3f}, "
                f"PIT KS {res['pit_ks']:.3f}, sigma_NMAD {res['sigma_nmad']:.4f} ({res['n']} galaxies)")
        return res["coverage_68"]

    c0 = score(1.0)
    step = 1.0 / FLOOR_SCALE_STEP if c0 > target else FLOOR_SCALE_STEP  # wide posteriors: smaller floors
    prev, c_prev, chosen, bracketed = 1.0, c0, 1.0, c0 == target
    for _ in range(FLOOR_SCALE_TRIES - 1):
        if bracketed:
            break
        scale = prev * step
        c = score(scale)
        if (c - target) * (c_prev - target) <= 0:  # crossed: interpolate in log scale
            t = 0.0 if c == c_prev else (target - c_prev) / (c - c_prev)
            chosen, bracketed = float(math.exp(math.log(prev) + t * (math.log(scale) - math.log(prev)))), True
        prev, c_prev, chosen = scale, c, (chosen if bracketed else scale)
    report = {"floor_scale": chosen, "bracketed": bool(bracketed), "target_coverage_68": target, "n_galaxies": int(flux.shape[0]),
              "settings": settings.to_dict(), "tried": tried}
    return scale_floors(datamodel, chosen, minimum), report


def calibrate_catalog(catalog, *, emulator, prior=None, z_var: str = "z_spec", z_min: float = 0.01, max_galaxies: int | None = 2000,
                      seed: int = 0, method: str = "median", n_iter: int | None = None, snr_min: float = 5.0,
                      emulator_floor: bool = True, rest_frame: bool = False, filter_path=None, tune_floors: int = 0,
                      settings=None, log=print):
    """Calibrate on the galaxies of a catalogue store that have ``z_var`` > ``z_min``.

    ``emulator`` / ``prior``: objects or specs accepted by :func:`popflow.pipeline.load_model`
    (prior default: the AnalyticPrior). A seeded random subset of ``max_galaxies`` is used.
    ``rest_frame``: also a rest-frame correction (:func:`calibrate`); the bands' effective
    wavelengths come from the catalogue's filter curves (``filter_path``: where to find them).
    ``tune_floors``: that many other spectroscopic galaxies (set aside before the calibration
    subset is drawn) then scale the floors (:func:`tune_floor_scale`, free-redshift fits under
    ``prior`` with :class:`~popflow.fit.FitSettings` ``settings``).
    Returns (DataModel, metadata dict ready for :func:`save_datamodel`).
    """
    from popflow.catalog import open_catalog
    from popflow.pipeline import load_model

    ds = open_catalog(catalog)
    if z_var not in ds:
        raise ValueError(f"{catalog}: no variable {z_var!r} to calibrate on (it has: {', '.join(ds.data_vars)})")
    if isinstance(emulator, (str, Path)):
        emulator = load_model(emulator, "emulator")
    if prior is None:
        from popflow.priors import AnalyticPrior

        prior = AnalyticPrior(space=emulator.space)
    elif isinstance(prior, (str, Path)):
        prior = load_model(prior, "prior")
    filters = list(ds.attrs["filters"])
    emulator = emulator.select(filters)
    z = np.asarray(ds[z_var].values, np.float64)
    rows = np.flatnonzero(np.isfinite(z) & (z > z_min))
    if rows.size == 0:
        raise ValueError(f"{catalog}: no galaxy has {z_var} > {z_min}")
    rng = np.random.default_rng(seed)
    tune_rows = np.zeros(0, int)
    if tune_floors:
        if rows.size < tune_floors + 20:
            raise ValueError(f"{catalog}: {rows.size} galaxies with {z_var} > {z_min}: too few to set {tune_floors} aside "
                             "for tune_floors and calibrate on the rest")
        perm = rng.permutation(rows)
        tune_rows, rows = np.sort(perm[:tune_floors]), np.sort(perm[tune_floors:])
    if max_galaxies is not None and rows.size > max_galaxies:
        rows = np.sort(rng.choice(rows, max_galaxies, replace=False))
    sub = ds.isel(galaxy=rows)
    flux, err, mask = (np.asarray(sub[v].values) for v in ("flux", "flux_err", "mask"))
    log(f"calibrate: {rows.size} galaxies with {z_var} from {catalog}, bands {', '.join(ds.attrs['bands'])}")
    band_wavelength = None
    if rest_frame:
        from popflow.filters import load_filter

        band_wavelength = [load_filter(f, search_path=filter_path).effective_wavelength for f in filters]
    dm, report = calibrate(jax.random.PRNGKey(seed), flux, err, mask, z[rows], emulator=emulator, prior=prior,
                           method=method, n_iter=n_iter, snr_min=snr_min, emulator_floor=emulator_floor,
                           rest_frame=rest_frame, band_wavelength=band_wavelength, log=log)
    if tune_floors:
        tune = ds.isel(galaxy=tune_rows)
        log(f"calibrate: scaling the floors on free-redshift fits of {tune_rows.size} other galaxies")
        dm, report["floor_tuning"] = tune_floor_scale(jax.random.PRNGKey(seed + 1), *(np.asarray(tune[v].values) for v in ("flux", "flux_err", "mask")),
                                                      z[tune_rows], emulator=emulator, prior=prior, datamodel=dm, settings=settings,
                                                      emulator_floor=emulator_floor, log=log)
    meta = {
        "bands": list(ds.attrs["bands"]),
        "filters": filters,
        "band_set": ds.attrs.get("band_set"),
        "emulator_id": str(emulator.id),
        "prior_id": str(prior.id),
        "catalog": str(catalog),
        "catalog_sha256": ds.attrs.get("source_sha256"),
        "z_var": z_var,
        "seed": seed,
        "calibration": report,
    }
    return dm, meta


def save_datamodel(path, datamodel: DataModel, meta: dict | None = None) -> Path:
    """Write ``datamodel.to_dict()`` (top level, so ``DataModel.from_dict(json)`` reads it) plus ``meta``."""
    path = Path(path)
    out = dict(meta or {})
    out.update(datamodel.to_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return path


def nz_from_redshifts(z, *, z_max: float = 6.0, dz: float = 0.01, bandwidth: float = 0.03, floor: float = 0.01):
    """A smooth redshift prior n(z) from known redshifts (a training part's z_spec), for ``AnalyticPrior(nz=...)``.

    A Gaussian kernel density with a width ``bandwidth * (1 + z)`` (the photo-z error scale, so the
    tails are not sharper than the data can tell), mixed with a uniform density of weight ``floor``
    over [0, z_max] so that no redshift is excluded outright. z (n,) finite redshifts. Returns
    (grid (m,), density (m,)) on [0, z_max] with step ``dz``, normalised to unit integral.
    """
    z = np.asarray(z, np.float64)
    z = z[np.isfinite(z)]
    if z.size < 10:
        raise ValueError(f"nz_from_redshifts: need at least 10 finite redshifts, got {z.size}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"nz_from_redshifts: floor must lie in [0, 1), got {floor}")
    grid = np.arange(0.0, z_max + 0.5 * dz, dz)
    width = bandwidth * (1.0 + z)
    dens = np.zeros_like(grid)
    for start in range(0, z.size, 4096):  # bounded memory: (4096, m) at a time
        zc, wc = z[start:start + 4096, None], width[start:start + 4096, None]
        dens += np.sum(np.exp(-0.5 * ((grid - zc) / wc) ** 2) / wc, axis=0)
    dens /= np.trapezoid(dens, grid)
    dens = (1.0 - floor) * dens + floor / z_max
    return grid, dens / np.trapezoid(dens, grid)


def load_datamodel(path, filters=None) -> DataModel:
    """Read a data-model JSON; with ``filters`` given, check they match the calibrated ones in order."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a data-model JSON ({err})") from None
    if filters is not None and "filters" in d and list(d["filters"]) != list(filters):
        raise ValueError(f"{path}: calibrated for filters {d['filters']}, but the catalogue has {list(filters)}")
    return DataModel.from_dict(d)
