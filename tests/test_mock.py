"""Mock catalogues (popflow.mock): the model error adds the scatter it promises, and only that."""

import numpy as np
import pytest

from popflow.mock import simulate_catalog
from tests.toymodel import ToyEmulator, UniformPrior

BANDS = "grizy"  # u is left out: at i < 22 many toy galaxies are still faint (S/N < 5) in u


def _residual_mag(df):
    """Observed minus true magnitude per galaxy and band, (n, 5), from the nJy fluxes."""
    flux = np.stack([df[f"{b}_cModelFlux"].to_numpy(np.float64) for b in BANDS], axis=1)
    true = np.stack([df[f"true_mag_{b}"].to_numpy(np.float64) for b in BANDS], axis=1)
    return -2.5 * np.log10(np.clip(flux, 1e-30, None)) + 31.4 - true


def test_model_error_adds_its_scatter_in_quadrature():
    n = 2000
    exact = simulate_catalog(4, n, emulator=ToyEmulator(), prior=UniformPrior(), mag_limit=22.0)
    scattered = simulate_catalog(4, n, emulator=ToyEmulator(), prior=UniformPrior(), mag_limit=22.0, model_error=0.05)
    # same seed: same galaxies and truths, only the photometry differs
    np.testing.assert_array_equal(exact["true_redshift"], scattered["true_redshift"])
    sd_exact = np.std(_residual_mag(exact), axis=0)
    sd_scattered = np.std(_residual_mag(scattered), axis=0)
    # bright (i < 22) galaxies: photerr's errors are ~0.005-0.03 mag; with 2000 galaxies the standard deviation
    # of each band's residual is known to ~1.6 % (1 / sqrt(2 n)), so a 10 % tolerance on the quadrature sum is safe
    np.testing.assert_allclose(sd_scattered, np.hypot(sd_exact, 0.05), rtol=0.10)
    assert np.all(sd_scattered > sd_exact + 0.02)


def test_negative_model_error_is_refused():
    with pytest.raises(ValueError, match="model_error"):
        simulate_catalog(1, 10, emulator=ToyEmulator(), prior=UniformPrior(), model_error=-0.1)
