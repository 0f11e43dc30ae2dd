"""Trained artifacts on disk: a folder with ``model.json`` and ``weights.npz``.

Emulators and priors share this format (DESIGN.md, "Stores"): ``model.json``
holds the architecture, parameter space, provenance and measured accuracy;
``weights.npz`` holds named float32 arrays. The artifact id is the sha256 of
both files, so any change to weights or description changes the id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["save_artifact", "load_artifact", "artifact_id", "flatten_tree", "unflatten_tree", "resolve_artifact"]

MODEL_JSON = "model.json"
WEIGHTS = "weights.npz"
SHIPPED = Path(__file__).resolve().parent / "models"


def _weights_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    # Sorted keys and no compression: the same arrays always give the same bytes.
    np.savez(buf, **{k: np.ascontiguousarray(arrays[k]) for k in sorted(arrays)})
    return buf.getvalue()


def _json_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in model.json")


def _digest(json_bytes: bytes, weights_bytes: bytes) -> str:
    h = hashlib.sha256()
    h.update(json_bytes)
    h.update(weights_bytes)
    return h.hexdigest()[:16]


def save_artifact(path, meta: dict, arrays: dict[str, np.ndarray]) -> str:
    """Write ``meta`` and ``arrays`` into folder ``path``; return the artifact id.

    Files are written to temporary names and renamed, so an interrupted save
    never leaves a half-written artifact behind.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    jb, wb = _json_bytes(meta), _weights_bytes(arrays)
    for name, blob in ((WEIGHTS, wb), (MODEL_JSON, jb)):
        tmp = path / (name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path / name)
    return _digest(jb, wb)


def resolve_artifact(name_or_path, kind: str) -> Path:
    """A folder path, or the name of a shipped artifact under ``popflow/models/<kind>/``."""
    p = Path(name_or_path)
    if (p / MODEL_JSON).is_file():
        return p
    shipped = SHIPPED / kind / str(name_or_path)
    if (shipped / MODEL_JSON).is_file():
        return shipped
    available = sorted(d.name for d in (SHIPPED / kind).glob("*") if (d / MODEL_JSON).is_file()) if (SHIPPED / kind).is_dir() else []
    raise FileNotFoundError(
        f"no {kind} artifact at {str(p)!r} (a folder with {MODEL_JSON} and {WEIGHTS}) and no shipped one of that name; "
        f"shipped: {', '.join(available) or 'none'}"
    )


def load_artifact(path) -> tuple[dict, dict[str, np.ndarray], str]:
    """Read an artifact folder; returns ``(meta, arrays, id)``."""
    path = Path(path)
    try:
        jb = (path / MODEL_JSON).read_bytes()
        wb = (path / WEIGHTS).read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: not a complete artifact ({err.filename} missing)") from None
    try:
        meta = json.loads(jb)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / MODEL_JSON}: corrupt JSON ({err})") from None
    with np.load(io.BytesIO(wb)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta, arrays, _digest(jb, wb)


def artifact_id(path) -> str:
    """Content id of an artifact folder (sha256 of model.json and weights.npz, 16 hex digits)."""
    return load_artifact(path)[2]


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts/lists of arrays -> ``{"a/b/0": array}`` (for ``weights.npz``)."""
    out: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        out[prefix] = np.asarray(tree)
        return out
    for k, v in items:
        out.update(flatten_tree(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def unflatten_tree(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_tree` (lists come back as dicts keyed by index strings)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
