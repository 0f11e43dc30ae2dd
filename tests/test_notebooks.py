"""Execute every notebooks/*.ipynb with nbclient, each in its own temporary working folder."""

import signal
from pathlib import Path

import pytest

from conftest import SHARED_DATA

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 600


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    # the kernel inherits the environment: CPU JAX (conftest) and where the shared data are, if anywhere
    monkeypatch.setenv("POPFLOW_SHARED_DATA", str(SHARED_DATA))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=NOTEBOOK_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})

    def too_slow(signum, frame):
        raise TimeoutError(f"{path.name} ran longer than {NOTEBOOK_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(NOTEBOOK_TIMEOUT_S)
    try:
        client.execute()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
