"""Shared test settings: float32 JAX on the CPU, few threads, shared-data discovery."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("POPFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def toy_emulator():
    """An analytic stand-in for a trained emulator (tests/toymodel.py), LSST ugrizy."""
    from tests.toymodel import ToyEmulator

    return ToyEmulator()
