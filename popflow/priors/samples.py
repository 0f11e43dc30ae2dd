"""Reading training samples for ``popflow prior train`` (the imperative shell of the priors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from popflow.params import ParameterSpace

__all__ = ["read_samples", "smooth_redshift"]


def read_samples(path, space: ParameterSpace, *, max_samples: int | None = None, seed: int = 0) -> np.ndarray:
    """Physical samples (n, dim) float32 from a file.

    Accepted: ``.npy`` with an (n, dim) array; ``.npz`` with an array named ``samples``
    or ``theta`` (or its only array); a posterior store (``.zarr`` folder with a
    ``posterior`` group, one variable per parameter with dims (galaxy, chain, draw)):
    the draws of all galaxies are pooled, draws with NaN (unusable galaxies) dropped.
    Columns follow ``space.names``. ``max_samples`` keeps a random subset.
    """
    path = Path(path)
    if path.is_dir():
        import xarray as xr

        try:
            post = xr.open_zarr(path, group="posterior", consolidated=False)
        except (FileNotFoundError, KeyError, OSError) as err:
            raise ValueError(f"{path}: not a posterior store with a 'posterior' group ({err})") from None
        missing = [n for n in space.names if n not in post]
        if missing:
            raise ValueError(f"{path}: posterior group lacks parameters {', '.join(missing)}")
        x = np.stack([post[n].values.reshape(-1) for n in space.names], axis=-1)
    elif path.suffix == ".npy":
        x = np.load(path)
    elif path.suffix == ".npz":
        with np.load(path) as npz:
            names = [k for k in ("samples", "theta") if k in npz.files] or (npz.files if len(npz.files) == 1 else [])
            if not names:
                raise ValueError(f"{path}: expected an array named 'samples' or 'theta' (found {', '.join(npz.files)})")
            x = npz[names[0]]
    else:
        raise ValueError(f"{path}: samples must be a .npy/.npz file or a posterior .zarr store")
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != space.dim:
        raise ValueError(f"{path}: samples have shape {x.shape}; expected (n, {space.dim}) with columns {', '.join(space.names)}")
    x = x[np.all(np.isfinite(x), axis=-1)]
    if max_samples is not None and len(x) > max_samples:
        x = x[np.random.default_rng(seed).choice(len(x), max_samples, replace=False)]
    return space.check(x, str(path))


def smooth_redshift(theta, space: ParameterSpace, bandwidth: float, *, seed: int = 0) -> np.ndarray:
    """Samples (n, dim) physical with each redshift moved by a Gaussian kernel of ``bandwidth (1 + z)``.

    For draws of fits at known redshifts (``popflow fit --known-redshift``): every galaxy's draws share one
    redshift, so without a kernel the prior's redshift marginal would be a spike per galaxy. The kernel makes it
    a kernel density estimate of n(z), as :func:`popflow.calibrate.nz_from_redshifts` does; values are clipped
    to the parameter box. Returns a new array; the other columns are unchanged.
    """
    if not bandwidth >= 0:
        raise ValueError(f"redshift bandwidth {bandwidth} must be >= 0")
    x = np.array(theta, np.float32)
    i = space.index("redshift")
    z = x[:, i] + bandwidth * (1.0 + x[:, i]) * np.random.default_rng(seed).standard_normal(len(x))
    x[:, i] = np.clip(z, space.lower[i], space.upper[i])
    return x

