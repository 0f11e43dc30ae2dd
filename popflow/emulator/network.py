"""Speculator-style networks: pure forward functions and their flax nnx modules.

The Speculator activation (Alsing et al. 2020, eq. 8) is applied per hidden
unit with trainable ``gamma`` and ``beta``::

    a(x) = [gamma + (1 - gamma) * sigmoid(beta * x)] * x

Two designs share one forward function, :func:`mlp_apply`, whose layers carry a
leading "network" axis ``B``:

- ``per_band``: ``B = n_bands`` independent networks (pop-cosmos: 4 x 128 per
  band), each with one output; evaluated with one batched einsum per layer, so
  all bands cost one XLA call, never a Python loop over bands.
- ``trunk``: ``B = 1`` shared network whose last layer has ``n_bands`` outputs.

Weights are plain pytrees ``{"layers": {i: {"W", "b", "gamma"?, "beta"?}}}``
(``W`` (B, d_in, d_out), ``b`` (B, d_out), ``gamma``/``beta`` (B, d_out) on
hidden layers), float32. The nnx modules only hold those arrays as
``nnx.Param`` for training; inference calls :func:`mlp_apply` on plain arrays.

Input features (functions of theta without ``log_mass``) follow the issue's
transforms: arcsinh of the SFR ratios, sqrt(dust2), log(1 + z); everything else
as is; then standardised with training-set mean and standard deviation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "speculator_activation",
    "mlp_apply",
    "init_mlp",
    "SpeculatorMLP",
    "feature_names",
    "features",
    "DESIGNS",
]

DESIGNS = ("per_band", "trunk")


def speculator_activation(x, gamma, beta):
    """``[gamma + (1 - gamma) sigmoid(beta x)] x`` elementwise (Alsing et al. 2020, eq. 8)."""
    return (gamma + (1.0 - gamma) * jax.nn.sigmoid(beta * x)) * x


def mlp_apply(layers: dict, x):
    """Forward pass of a stack of ``B`` Speculator MLPs.

    ``layers``: ``{i: {"W": (B, d_in, d_out), "b": (B, d_out), "gamma", "beta": (B, d_out)}}``
    with ``gamma``/``beta`` on every layer but the last. ``x``: (..., d_in), shared by
    all ``B`` networks. Returns (..., B * d_out_last): the outputs of network 0, then 1, ...
    """
    keys = sorted(layers, key=int)
    h = None
    for k in keys:
        layer = layers[k]
        if h is None:  # first layer: the input is shared by every network
            h = jnp.einsum("...i,bio->...bo", x, layer["W"]) + layer["b"]
        else:
            h = jnp.einsum("...bi,bio->...bo", h, layer["W"]) + layer["b"]
        if "gamma" in layer:
            h = speculator_activation(h, layer["gamma"], layer["beta"])
    return h.reshape(h.shape[:-2] + (-1,))


def init_mlp(key, n_in: int, hidden: tuple[int, ...], n_out: int, n_nets: int) -> dict:
    """Random weights for ``n_nets`` MLPs ``n_in -> hidden... -> n_out`` (LeCun-normal W, zero b,
    standard-normal gamma and beta as in Speculator's reference code)."""
    sizes = (n_in, *hidden, n_out)
    layers = {}
    keys = jax.random.split(key, 3 * (len(sizes) - 1))
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        kw, kg, kb = keys[3 * i : 3 * i + 3]
        layer = {
            "W": jax.random.normal(kw, (n_nets, d_in, d_out), jnp.float32) / np.sqrt(d_in),
            "b": jnp.zeros((n_nets, d_out), jnp.float32),
        }
        if i < len(sizes) - 2:
            layer["gamma"] = jax.random.normal(kg, (n_nets, d_out), jnp.float32)
            layer["beta"] = jax.random.normal(kb, (n_nets, d_out), jnp.float32)
        layers[str(i)] = layer
    return layers


class SpeculatorMLP(nnx.Module):
    """Trainable ``design`` network (``per_band`` or ``trunk``): (..., n_in) -> (..., n_bands)."""

    def __init__(self, n_in: int, n_bands: int, hidden: tuple[int, ...], design: str, *, rngs: nnx.Rngs):
        if design not in DESIGNS:
            raise ValueError(f"unknown emulator design {design!r}; known: {', '.join(DESIGNS)}")
        n_nets, n_out = (n_bands, 1) if design == "per_band" else (1, n_bands)
        layers = init_mlp(rngs.params(), n_in, tuple(hidden), n_out, n_nets)
        self.layers = nnx.Dict({k: nnx.Dict({n: nnx.Param(v) for n, v in layer.items()}) for k, layer in layers.items()})

    def __call__(self, x):
        return mlp_apply(nnx.to_pure_dict(nnx.state(self, nnx.Param))["layers"], x)


def feature_names(space) -> tuple[str, ...]:
    """Names of the network inputs: every parameter except ``log_mass``, transformed."""
    out = []
    for name in space.names:
        if name == "log_mass":
            continue
        if name.startswith("logsfr_ratio"):
            out.append(f"arcsinh({name})")
        elif name == "dust2":
            out.append("sqrt(dust2)")
        elif name == "redshift":
            out.append("log(1+redshift)")
        else:
            out.append(name)
    return tuple(out)


def features(space, theta):
    """Unstandardised network inputs; theta (..., dim) physical -> (..., dim - 1).

    ``log_mass`` is dropped (the mass scaling is applied exactly outside the network).
    """
    theta = jnp.asarray(theta, jnp.float32)
    cols = []
    for i, name in enumerate(space.names):
        if name == "log_mass":
            continue
        t = theta[..., i]
        if name.startswith("logsfr_ratio"):
            t = jnp.arcsinh(t)
        elif name == "dust2":
            t = jnp.sqrt(jnp.maximum(t, 0.0))
        elif name == "redshift":
            t = jnp.log1p(jnp.maximum(t, 0.0))
        cols.append(t)
    return jnp.stack(cols, axis=-1)
