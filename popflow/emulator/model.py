"""The :class:`Emulator`: theta -> apparent AB magnitudes, pure JAX.

    m_b(theta) = y_mean_b + y_std_b * net_b((f(theta) - x_mean) / x_std)  [+ DM(z)]  - 2.5 log_mass

``f`` are the transformed inputs of :func:`popflow.emulator.network.features`
(every parameter but ``log_mass``), ``net`` a Speculator MLP (Alsing et al.
2020). With ``target = "m_minus_dm"`` the network predicts the unit-mass
magnitude minus the distance modulus (smooth down to z = 0) and the distance
modulus of :mod:`popflow.cosmology` is added analytically; with ``target =
"m"`` it predicts the unit-mass apparent magnitude itself. The mass scaling is
exact: ``m(log_mass + 1) = m(log_mass) - 2.5``.

Design ``spectral`` (:mod:`popflow.emulator.spectral`) instead emulates the
rest-frame spectrum and integrates it through the filter curves stored in the
artifact; mass scaling, domain and band selection are the same.

At z below ``Z_FLOOR`` the distance modulus is evaluated at ``Z_FLOOR`` (DM(0)
is -inf); such points are outside :meth:`Emulator.in_domain`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from popflow.artifacts import flatten_tree, load_artifact, resolve_artifact, save_artifact, unflatten_tree
from popflow.emulator.network import DESIGNS as NETWORK_DESIGNS
from popflow.emulator.network import features, mlp_apply
from popflow.params import ParameterSpace

__all__ = ["Emulator", "Z_FLOOR", "TARGETS", "DESIGNS"]

TARGETS = ("m_minus_dm", "m", "rest_frame_spectrum")
DESIGNS = (*NETWORK_DESIGNS, "spectral")
_EXACT_PREFIXES = ("grid/wave", "grid/width", "grid/igm_z", "curves/")  # spectral design: grid and curves stay float64
Z_FLOOR = 1e-3  # redshift below which the distance modulus is frozen and points are out of domain


class Emulator:
    """A trained photometric emulator (see the module docstring for the formula).

    Attributes: ``space`` (:class:`ParameterSpace`), ``bands`` and ``filters``
    (tuples, same order), ``id`` (artifact content id, None until saved or
    loaded), ``error_floor`` (np.ndarray (n_bands,), mag), ``meta`` (model.json).
    """

    def __init__(self, meta: dict, weights: dict[str, np.ndarray], id: str | None = None):
        self.meta = meta
        self.space = ParameterSpace.from_dict(meta["space"])
        self.bands = tuple(meta["bands"])
        self.filters = tuple(meta["filters"])
        if len(self.bands) != len(self.filters):
            raise ValueError(f"emulator {id}: {len(self.bands)} bands but {len(self.filters)} filters")
        design = meta["architecture"]["design"]
        if design not in DESIGNS:
            raise ValueError(f"emulator {id}: unknown design {design!r}; known: {', '.join(DESIGNS)}")
        self.target = meta["architecture"]["target"]
        if self.target not in TARGETS:
            raise ValueError(f"emulator {id}: unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        self.id = id
        self.error_floor = np.asarray(meta.get("error_floor", np.zeros(len(self.bands))), np.float32)
        self._weights = {k: np.asarray(v, np.float64 if k.startswith(_EXACT_PREFIXES) else np.float32)
                         for k, v in weights.items()}
        tree = unflatten_tree(self._weights)
        self._photometer = None
        if design == "spectral":
            self._photometer = _spectral_photometer(tree, self.filters, self.space)
        else:
            self._layers = {k: {n: jnp.asarray(a) for n, a in layer.items()} for k, layer in tree["net"]["layers"].items()}
            self._x_mean = jnp.asarray(tree["transform"]["x_mean"])
            self._x_std = jnp.asarray(tree["transform"]["x_std"])
            self._y_mean = jnp.asarray(tree["transform"]["y_mean"])
            self._y_std = jnp.asarray(tree["transform"]["y_std"])
        dom = meta.get("domain", {})
        self._dom_lo = jnp.asarray(np.asarray(dom.get("lower", self.space.lower), np.float32))
        self._dom_hi = jnp.asarray(np.asarray(dom.get("upper", self.space.upper), np.float32))
        self._i_mass = self.space.index("log_mass")
        self._i_z = self.space.index("redshift")

    # --- construction and storage -----------------------------------------
    @classmethod
    def load(cls, name_or_path) -> "Emulator":
        """A shipped emulator by name (``lsst``, ``sdss``, ...) or an artifact folder."""
        meta, arrays, aid = load_artifact(resolve_artifact(name_or_path, "emulators"))
        if meta.get("kind") != "emulator":
            raise ValueError(f"{name_or_path}: model.json kind is {meta.get('kind')!r}, not 'emulator'")
        return cls(meta, arrays, aid)

    def save(self, path) -> str:
        """Write the artifact folder; sets and returns :attr:`id`."""
        self.id = save_artifact(Path(path), self.meta, self._weights)
        return self.id

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """Flat ``{"net/layers/0/W": array, ...}`` weights (a copy): float32, but the spectral
        design's rest-grid wavelengths and filter curves, which stay float64."""
        return {k: v.copy() for k, v in self._weights.items()}

    @staticmethod
    def build_weights(layers: dict, x_mean, x_std, y_mean, y_std) -> dict[str, np.ndarray]:
        """Flatten network layers and standardisation constants into artifact arrays."""
        tree = {
            "net": {"layers": layers},
            "transform": {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std},
        }
        return {k: np.asarray(v, np.float32) for k, v in flatten_tree(tree).items()}

    # --- evaluation (pure jax) --------------------------------------------
    def unit_outputs(self, theta):
        """Network prediction of the target (unit-mass, see module docstring); (..., dim) -> (..., n_bands).
        The spectral design predicts spectra, not band values: there this is the unit-mass magnitude."""
        if self._photometer is not None:
            theta = jnp.asarray(theta, jnp.float32)
            return self._photometer.magnitudes(theta.at[..., self._i_mass].set(0.0))
        x = (features(self.space, theta) - self._x_mean) / self._x_std
        return self._y_mean + self._y_std * mlp_apply(self._layers, x)

    def magnitudes(self, theta):
        """Apparent AB magnitudes; theta (..., dim) physical -> (..., n_bands), float32, jit-able."""
        theta = jnp.asarray(theta, jnp.float32)
        if self._photometer is not None:
            return self._photometer.magnitudes(theta)
        m = self.unit_outputs(theta)
        if self.target == "m_minus_dm":
            from popflow.cosmology import distance_modulus

            z = jnp.maximum(theta[..., self._i_z], Z_FLOOR)
            m = m + distance_modulus(z)[..., None]
        return m - 2.5 * theta[..., self._i_mass, None]

    def in_domain(self, theta):
        """True where theta is inside the parameter box, the training coverage and z >= Z_FLOOR; (..., dim) -> (...)."""
        theta = jnp.asarray(theta, jnp.float32)
        inside = jnp.all((theta >= self._dom_lo) & (theta <= self._dom_hi), axis=-1)
        return inside & self.space.in_bounds(theta) & (theta[..., self._i_z] >= Z_FLOOR)

    # --- band selection ----------------------------------------------------
    def select(self, filters) -> "Emulator":
        """An emulator restricted to / reordered as ``filters`` (filter identifiers or band names)."""
        filters = [filters] if isinstance(filters, str) else list(filters)
        idx = []
        for f in filters:
            if f in self.filters:
                idx.append(self.filters.index(f))
            elif f in self.bands:
                idx.append(self.bands.index(f))
            else:
                raise KeyError(
                    f"emulator {self.meta.get('name', self.id)!r} does not cover filter {f!r}; "
                    f"it covers: {', '.join(self.filters)}"
                )
        idx_a = np.asarray(idx)
        if self.meta["architecture"]["design"] == "spectral":
            # filter curves are numbered in band order; the networks serve every band
            curve = {f"curves/{i}/": f"curves/{j}/" for i, j in enumerate(idx)}
            w = {k: v for k, v in self._weights.items() if not k.startswith("curves/")}
            w.update({new + k[len(old):]: v for new, old in curve.items() for k, v in self._weights.items()
                      if k.startswith(old)})
            pick = None
        elif self.meta["architecture"]["design"] == "per_band":
            # every network array has the band on its leading axis
            pick = lambda k, v: v[idx_a] if k.startswith("net/") else v  # noqa: E731
        else:
            # shared trunk: only the last layer's output columns belong to bands
            last = max(int(k.split("/")[2]) for k in self._weights if k.startswith("net/layers/"))
            pick = lambda k, v: v[..., idx_a] if k.startswith(f"net/layers/{last}/") else v  # noqa: E731
        if pick is not None:
            w = {k: (v[idx_a] if k in ("transform/y_mean", "transform/y_std") else pick(k, v))
                 for k, v in self._weights.items()}
        meta = dict(self.meta)
        meta["bands"] = [self.bands[i] for i in idx]
        meta["filters"] = [self.filters[i] for i in idx]
        meta["error_floor"] = [float(self.error_floor[i]) for i in idx]
        if "filter_sha256" in meta:
            meta["filter_sha256"] = {f: meta["filter_sha256"][f] for f in meta["filters"]}
        if "accuracy" in meta:
            meta["accuracy"] = _select_accuracy(meta["accuracy"], idx)
        meta["selected_from"] = self.id
        return Emulator(meta, w, None)

    def __repr__(self) -> str:
        return f"Emulator(id={self.id!r}, design={self.meta['architecture']['design']!r}, bands={self.bands})"


def _spectral_photometer(tree: dict, filters, space: ParameterSpace):
    """The :class:`popflow.emulator.spectral.SpectralPhotometer` of a spectral artifact's arrays:
    ``spectral`` (network weights), ``grid`` (rest grid, IGM, line pixels) and ``curves`` ({i: wavelength,
    transmission}, in band order)."""
    from popflow.emulator.spectral import SpectralEmulator
    from popflow.filters import Filter

    curves = tree["curves"]
    if sorted(curves, key=int) != [str(i) for i in range(len(filters))]:
        raise ValueError(f"spectral emulator: {len(curves)} stored filter curves for {len(filters)} filters")
    bound = [Filter(f, curves[str(i)]["wavelength"], curves[str(i)]["transmission"], source="artifact")
             for i, f in enumerate(filters)]
    return SpectralEmulator(tree["spectral"], tree["grid"], space).photometer(bound)


def _select_accuracy(acc, idx):
    """Pick entries ``idx`` from every per-band list inside an accuracy block (nested dicts/lists)."""
    if isinstance(acc, dict):
        return {k: _select_accuracy(v, idx) if k != "by_z" else [_select_accuracy(s, idx) for s in v]
                for k, v in acc.items()}
    if isinstance(acc, list) and acc and not isinstance(acc[0], dict):
        return [acc[i] for i in idx]
    return acc
