"""popflow: galaxy properties and photometric redshifts at survey scale.

Emulated stellar population synthesis, learned population priors and a
batched affine-invariant ensemble sampler (the pop-cosmos method), mapped over
chunked Zarr catalogues with Dask.
"""

__version__ = "0.1.0"

from popflow.params import DEFAULT_SPACE, ParameterSpace  # noqa: E402
from popflow.pipeline import open_posterior  # noqa: E402  (light: heavy imports are inside)

__all__ = ["DEFAULT_SPACE", "ParameterSpace", "open_posterior", "__version__"]
