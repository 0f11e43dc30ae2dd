"""The simulator side: bagpipes model galaxies and emulator training sets.

- :mod:`popflow.sps.bagpipes_model`: :class:`BagpipesSimulator`, theta -> unit-mass
  AB magnitudes (every mapping and approximation is documented there).
- :mod:`popflow.sps.proposal`: where in the parameter box models are drawn.
- :mod:`popflow.sps.generate`: ``popflow sps simulate``, parallel, chunked,
  resumable generation into a Zarr store (layout documented there).

This is the only part of popflow that needs bagpipes (``pip install 'popflow[sps]'``);
fits never do. The cosmology shared with the emulators is :mod:`popflow.cosmology`.
"""

import importlib.util

if importlib.util.find_spec("bagpipes") is None:
    raise ImportError("popflow.sps needs bagpipes, which is not installed: pip install 'popflow[sps]'")

from popflow.sps.bagpipes_model import MAG_CAP, Z_MIN, BagpipesSimulator, sfh_bin_edges  # noqa: E402
from popflow.sps.generate import BAND_SETS, open_training_set, simulate  # noqa: E402

__all__ = ["BagpipesSimulator", "sfh_bin_edges", "Z_MIN", "MAG_CAP", "BAND_SETS", "simulate", "open_training_set"]
