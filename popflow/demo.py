"""``popflow demo``: the embedded default, end to end, on the shipped mock catalogue.

1. ingest the shipped ``lsst_demo.parquet`` (``popflow/data/catalogs/``, linked from the
   repository's ``catalogs/``) with the ``lsst`` band set (LSST ugrizy mock made by :mod:`popflow.mock`
   with the shipped ``lsst`` emulator, the analytic prior, a model error of
   :data:`DEMO_MODEL_ERROR` mag per band and photerr 10-year noise; its true parameters
   are kept, the true redshift is ingested as ``z_spec``);
2. fit it with the shipped ``lsst`` emulator, the :class:`~popflow.priors.AnalyticPrior` and
   an error floor of the model error and the emulator's own in quadrature
   (:func:`demo_datamodel`) on a local Dask cluster (:func:`popflow.pipeline.fit_catalog`, resumable: a second
   demo in the same folder reuses the finished store);
3. print the throughput, photo-z metrics of the posterior median redshift against the
   truth (:mod:`popflow.metrics`) and where the stores are.

The sampler settings (:data:`DEMO_SETTINGS`) are shorter than the defaults so the
demo takes minutes on 2 CPU cores; they are recorded in the store like any others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DEMO_CATALOG", "DEMO_BANDS", "DEMO_EMULATOR", "DEMO_MODEL_ERROR", "demo_settings", "demo_datamodel"]

DEMO_CATALOG = Path(__file__).resolve().parent / "data" / "catalogs" / "lsst_demo.parquet"
DEMO_BANDS = "lsst"
DEMO_EMULATOR = "lsst"
DEMO_SEED = 0
DEMO_CHUNK = 100
DEMO_MODEL_ERROR = 0.03
"""Model error [mag] per band of the demo catalogue (``popflow.mock --model-error``): real galaxies
depart from the SPS model by 0.02-0.06 mag (the floors calibrated on zCOSMOS and DC2, BENCHMARKS.md),
and the sampler's settings are calibrated for floors of that size, not for the emulator's 0.005 mag."""


def demo_settings():
    """The demo's sampler settings: the defaults' init ("laplace", with its independence moves) and convergence
    criterion, cheaper: 56 walkers in 2 ensembles of 28 (the 2 x dim minimum), 4 redshift bins x 2 dust starts x 20
    Newton steps, 400 burn-in steps (the first 200 tempered), 32 draws thinned by 8 (56 x 656 = 36,736 posterior evaluations per galaxy, about
    half the defaults' 75,776)."""
    from popflow.fit import FitSettings

    return FitSettings(n_walkers=56, n_ensembles=2, n_burn=400, n_draws=32, thin=8, n_init=4096, n_starts=4, n_newton=20)


def demo_datamodel(emulator):
    """The demo's data model: unit zero points and a floor of :data:`DEMO_MODEL_ERROR` and the
    emulator's own error (``emulator.error_floor`` [mag]) added in quadrature, per band."""
    from popflow.datamodel import DataModel

    return DataModel.from_magnitude_floor(np.hypot(DEMO_MODEL_ERROR, np.asarray(emulator.error_floor, np.float64)))


def run_demo(workdir="popflow-demo", workers: int | None = None, threads: int | None = None,
             n_galaxies: int | None = None) -> int:
    """Run the demo; returns the process exit code (0 on success)."""
    from popflow.catalog import ingest
    from popflow.emulator import Emulator
    from popflow.metrics import format_metrics, photoz_metrics
    from popflow.pipeline import fit_catalog, open_posterior
    from popflow.priors import AnalyticPrior

    if not DEMO_CATALOG.is_file():
        raise FileNotFoundError(f"the demo catalogue {DEMO_CATALOG} is missing (it ships as package data; "
                                "regenerate it with the command in popflow/mock.py)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cat_path, post_path = workdir / "catalog.zarr", workdir / "posterior.zarr"
    print(f"popflow demo: ingesting {DEMO_CATALOG.name} -> {cat_path}")
    ingest(DEMO_CATALOG, DEMO_BANDS, cat_path, chunk_size=DEMO_CHUNK, overwrite=True,
           extra_columns=["z_spec=true_redshift"], progress=False)
    stats = fit_catalog(cat_path, post_path, emulator=DEMO_EMULATOR, prior=AnalyticPrior(),
                        datamodel=demo_datamodel(Emulator.load(DEMO_EMULATOR)), settings=demo_settings(),
                        seed=DEMO_SEED, chunk_size=DEMO_CHUNK, limit=n_galaxies, workers=workers, threads=threads)

    tree = open_posterior(post_path)
    n = stats["n_galaxies"]
    summary = tree["summary"]
    metrics = photoz_metrics(summary["z_median"].values, _truth(cat_path, n), z_grid=summary["z_grid"].values,
                             pz=summary["pz"].values)
    conv = tree["sample_stats"]["converged"].values
    print()
    print(f"popflow demo: {n} galaxies in {stats['n_chunks']} chunks of {stats['chunk_size']}")
    if stats["chunks_fitted"]:
        print(f"  throughput: {stats['galaxies_per_s']:.2f} galaxies/s ({stats['seconds']:.1f} s wall, "
              "compilation included)")
    else:
        print(f"  nothing to fit: every chunk of {post_path} was already done (delete it to refit)")
    print(f"  converged: {conv.mean():.1%} of galaxies")
    print("  photo-z (posterior median vs true redshift):")
    print("\n".join("    " + line for line in format_metrics(metrics).splitlines()))
    print(f"  catalogue store: {cat_path.resolve()}")
    print(f"  posterior store: {post_path.resolve()}  (open with popflow.pipeline.open_posterior)")
    return 0


def _truth(cat_path: Path, n: int) -> np.ndarray:
    from popflow.catalog import open_catalog

    return open_catalog(cat_path)["z_spec"].values[:n]
