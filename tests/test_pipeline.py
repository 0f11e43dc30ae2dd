"""The bulk-fit pipeline: store layout, resume after kill -9, worker loss, external scheduler, lock, bad input.

Every run uses the toy emulator and uniform prior of tests/toymodel.py and tiny
sampler settings, so a chunk fits in a fraction of a second; the cost is starting
processes and loading the compiled kernel in each (the persistent JAX compilation
cache in a shared temporary folder saves recompiling it). To start few processes,
one external cluster (`dask scheduler` + 2 `dask worker` over TCP) serves every
in-process run, and only the kill-and-resume test starts `popflow fit` with its own
LocalCluster. Stores are compared array by array against one uninterrupted
reference run; all runs use one XLA thread per worker so the compiled code, and
hence every bit, is the same.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from popflow.catalog import ingest
from popflow.fit import FitSettings
from popflow.mock import simulate_catalog
from popflow.pipeline import (StoreLockedError, StoreMismatchError, fit_catalog, open_posterior, store_lock,
                              worker_env)
from tests.toymodel import ToyEmulator, UniformPrior

REPO = Path(__file__).resolve().parents[1]
# "top" initialisation: the cheapest kernel to compile (compiling it is most of this file's cost)
SETTINGS = FitSettings(n_walkers=28, n_burn=20, n_draws=8, thin=2, init="top", n_init=256)
SETTINGS_ARGS = ["--walkers", "28", "--burn", "20", "--draws", "8", "--thin", "2", "--init", "top", "--n-init", "256"]
TOY_ARGS = ["--emulator", "tests.toymodel:ToyEmulator", "--prior", "tests.toymodel:UniformPrior"]
N_GAL, CHUNK = 96, 8  # 12 chunks: a kill after the first marker lands mid-run
SEED = 7


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of every process these tests start: CPU JAX, one XLA thread, a shared compile cache."""
    cache = tmp_path_factory.mktemp("jax-cache")
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    e.update(worker_env(1) | {"JAX_COMPILATION_CACHE_DIR": str(cache)})
    return e


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A toy mock catalogue (mock.simulate_catalog -> Parquet -> popflow ingest), N_GAL galaxies."""
    d = tmp_path_factory.mktemp("catalog")
    df = simulate_catalog(3, N_GAL, emulator=ToyEmulator(), prior=UniformPrior())
    df.to_parquet(d / "toy.parquet")
    return ingest(d / "toy.parquet", "lsst", d / "cat.zarr", chunk_size=32, extra_columns=["z_spec=true_redshift"],
                  progress=False)


class ExternalCluster:
    """`dask scheduler` + `dask worker` processes (no nanny: a killed worker stays dead) over TCP on localhost."""

    def __init__(self, env, folder):
        self.env, self.sched_file = env, folder / "scheduler.json"
        self.procs, self.workers = [], []
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(self.sched_file)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0 = time.monotonic()
        while not self.sched_file.exists():
            assert time.monotonic() - t0 < 60, "dask scheduler did not start"
            time.sleep(0.1)
        self.address = self.add_worker()

    def add_worker(self) -> str:
        """Start one more worker (1 thread) and wait for it; returns the scheduler address."""
        from distributed import Client

        w = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                              str(self.sched_file), "--nthreads", "1", "--no-nanny", "--name", f"w{len(self.workers)}"],
                             env=self.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(w)
        self.workers.append(w)
        with Client(scheduler_file=str(self.sched_file)) as c:
            c.wait_for_workers(len(self.workers), timeout=120)
            return c.scheduler.address

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def external_cluster(env, tmp_path_factory):
    """An external cluster, one worker at first; :func:`reference` adds the second once the kernel is compiled.

    The worker-loss test, which kills a worker, is the last in this file.
    """
    cluster = ExternalCluster(env, tmp_path_factory.mktemp("scheduler"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def client(external_cluster):
    """A client of the external cluster, for the in-process runs."""
    from distributed import Client

    with Client(external_cluster.address) as c:
        yield c


def _fit(catalog, out, client, **kw):
    kw.setdefault("seed", SEED)
    return fit_catalog(catalog, out, emulator=ToyEmulator(), prior=UniformPrior(), settings=SETTINGS,
                       chunk_size=CHUNK, client=client, progress=False, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def reference(catalog, client, external_cluster, tmp_path_factory):
    """An uninterrupted run: the store every other run must reproduce.

    It runs on the cluster's single worker, which compiles the kernel into the shared cache; the
    second worker starts only then and loads it (two workers compiling at once would double the
    most expensive step of this file on 2 cores).
    """
    out = tmp_path_factory.mktemp("ref") / "post.zarr"
    stats = _fit(catalog, out, client)
    assert stats["chunks_fitted"] == N_GAL // CHUNK
    external_cluster.add_worker()
    return out


def assert_same_store(a, b):
    """Every array of every group equal (NaN == NaN), identity attrs equal."""
    ta, tb = open_posterior(a), open_posterior(b)
    assert sorted(ta.groups) == sorted(tb.groups)
    for g in ta.groups:
        da, db = ta[g].to_dataset(inherit=False), tb[g].to_dataset(inherit=False)
        assert set(da.variables) == set(db.variables), g
        for v in da.variables:
            np.testing.assert_array_equal(da[v].values, db[v].values, err_msg=f"{g}/{v}")
    for k in ("prior_id", "emulator_id", "settings", "seed", "chunk_size"):
        assert ta.attrs[k] == tb.attrs[k]


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "popflow", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _done(store) -> np.ndarray:
    try:
        return xr.open_zarr(store, consolidated=False, chunks=None)["chunk_done"].values
    except Exception:  # noqa: BLE001 - layout not written yet
        return np.zeros(0)


def _wait_for_chunks(store, proc, at_least=1, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = _done(store)
        if done.sum() >= at_least:
            return done
        if proc.poll() is not None:
            pytest.fail(f"run ended before {at_least} chunk(s) were done:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail(f"no chunk done within {timeout} s")


# ----------------------------------------------------------------------------- layout and summaries

def test_reference_store_layout(reference, catalog):
    tree = open_posterior(reference)
    n_chunks = N_GAL // CHUNK
    assert tree["chunk_done"].values.tolist() == [1] * n_chunks
    post = tree["posterior"]
    assert set(post.data_vars) == set(UniformPrior().space.names)
    assert post["redshift"].dims == ("galaxy", "chain", "draw")
    assert post["redshift"].shape == (N_GAL, SETTINGS.n_walkers, SETTINGS.n_draws)
    assert post["redshift"].data.chunks[0] == (CHUNK,) * n_chunks
    stats = tree["sample_stats"]
    assert stats["log_likelihood"].shape == (N_GAL, SETTINGS.n_walkers, SETTINGS.n_draws)
    assert bool(stats["usable"].all())
    s = tree["summary"]
    assert s["redshift_q"].dims == ("galaxy", "quantile")
    np.testing.assert_allclose(s["quantile"].values, [0.025, 0.16, 0.5, 0.84, 0.975])
    # p(z) is normalised on the 0.01 grid and z_median is the 50% quantile of the stored draws
    np.testing.assert_allclose(s["pz"].values.sum(axis=1) * 0.01, 1.0, rtol=1e-4)
    z = post["redshift"].values.reshape(N_GAL, -1)
    np.testing.assert_allclose(s["z_median"].values, np.quantile(z, 0.5, axis=1, method="hazen"), rtol=1e-5)
    # galaxy ids copied from the catalogue; the fit recovers redshift (toy model, S/N high at these depths):
    # loose bound, the tiny sampler settings are far from converged
    cat = xr.open_zarr(catalog, consolidated=False)
    np.testing.assert_array_equal(tree["galaxy_id"].values, cat["galaxy_id"].values)
    err = np.abs(s["z_median"].values - cat["z_spec"].values) / (1 + cat["z_spec"].values)
    assert np.median(err) < 0.15
    for k in ("prior_id", "emulator_id", "datamodel", "settings", "popflow_version", "catalog_sha256", "seed"):
        assert k in tree.attrs


def test_rerun_skips_completed_store(reference, catalog):
    stats = _fit(catalog, reference, client=None)  # no cluster is started when nothing is pending
    assert stats["chunks_fitted"] == 0 and stats["chunks_skipped"] == N_GAL // CHUNK


def test_changed_inputs_refused(reference, catalog, client):
    with pytest.raises(StoreMismatchError, match="seed: store has 7, this run has 8"):
        _fit(catalog, reference, client, seed=8)
    with pytest.raises(StoreMismatchError, match="settings"):
        fit_catalog(catalog, reference, emulator=ToyEmulator(), prior=UniformPrior(),
                    settings=FitSettings(n_walkers=30, n_burn=20, n_draws=8, thin=2, init="top", n_init=256), seed=SEED,
                    chunk_size=CHUNK, client=client, progress=False, log=lambda *a: None)
    with pytest.raises(StoreMismatchError, match="known_redshift: store has null, this run has \"z_spec\""):
        _fit(catalog, reference, client, known_redshift="z_spec")
    assert_same_store(reference, reference)  # the refusals left it readable


def test_known_redshift_from_the_catalogue(catalog, client, tmp_path):
    """--known-redshift z_spec: every galaxy is fitted at its catalogue redshift, and the store records it."""
    with pytest.raises(ValueError, match="'z_photo'.*has no such variable"):
        _fit(catalog, tmp_path / "bad.zarr", client, known_redshift="z_photo")
    out = tmp_path / "known.zarr"
    _fit(catalog, out, client, known_redshift="z_spec", limit=2 * CHUNK)
    tree = open_posterior(out)
    assert tree.attrs["known_redshift"] == "z_spec"
    z = tree["posterior"]["redshift"].values.reshape(2 * CHUNK, -1)
    z_spec = xr.open_zarr(catalog, consolidated=False)["z_spec"].values[: 2 * CHUNK]
    np.testing.assert_allclose(z, np.broadcast_to(z_spec[:, None], z.shape), rtol=1e-4)


# ----------------------------------------------------------------------------- resume after kill -9

def test_kill_and_resume_equals_uninterrupted(reference, catalog, env, tmp_path):
    out = tmp_path / "post.zarr"
    args = ["fit", str(catalog), "--out", str(out), "--seed", str(SEED), "--chunk-size", str(CHUNK),
            "--workers", "1", "--threads", "1", "--no-progress", *TOY_ARGS, *SETTINGS_ARGS]
    proc = _cli(args, env, start_new_session=True)
    done = _wait_for_chunks(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the client, its scheduler and its workers, mid-run
    proc.wait()
    assert 0 < done.sum() < N_GAL // CHUNK, "the kill did not land mid-run"
    assert Path(str(out) + ".lock").exists()  # the killed run's lock is left behind ...

    proc = _cli(args, env)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "clearing stale lock" in log  # ... and cleared by the resumed run
    assert "already done" in log
    assert_same_store(reference, out)


# ----------------------------------------------------------------------------- lock

def test_second_run_refused_while_locked(reference, catalog, capsys):
    from popflow.cli import main

    with store_lock(reference):  # this (live) process holds the lock: a second `popflow fit` must not start
        code = main(["fit", str(catalog), "--out", str(reference), "--no-progress", *TOY_ARGS])
        assert code == 2
        err = capsys.readouterr().err
        assert "is being written by pid" in err and str(os.getpid()) in err
        with pytest.raises(StoreLockedError):
            _fit(catalog, reference, client=None)


def test_stale_lock_is_cleared(reference, catalog, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = Path(str(reference) + ".lock")
    lock.write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", "started": "earlier"}}')
    stats = _fit(catalog, reference, client=None)
    assert stats["chunks_skipped"] == N_GAL // CHUNK
    assert "clearing stale lock" in capsys.readouterr().err
    assert not lock.exists()


# ----------------------------------------------------------------------------- bad input

def test_unusable_galaxies_are_flagged(client, tmp_path):
    df = simulate_catalog(5, 20, emulator=ToyEmulator(), prior=UniformPrior())
    flux_cols = [c for c in df.columns if c.endswith("_cModelFlux") or c.endswith("_cModelFluxErr")]
    bad = [2, 11]
    df.loc[bad, flux_cols] = np.nan  # every band missing: value and error NaN
    df.loc[5, ["u_cModelFlux", "u_cModelFluxErr"]] = np.nan  # one band missing: still usable
    df.to_csv(tmp_path / "bad.csv", index=False)
    cat = ingest(tmp_path / "bad.csv", "lsst", tmp_path / "cat.zarr", progress=False)
    stats = _fit(cat, tmp_path / "post.zarr", client)
    assert stats["chunks_fitted"] == 3
    tree = open_posterior(tmp_path / "post.zarr")
    usable = tree["sample_stats"]["usable"].values
    assert usable.tolist() == [i not in bad for i in range(20)]
    assert not tree["sample_stats"]["converged"].values[bad].any()
    z = tree["posterior"]["redshift"].values
    assert np.isnan(z[bad]).all() and np.isfinite(np.delete(z, bad, axis=0)).all()
    s = tree["summary"]
    assert np.isnan(s["z_median"].values[bad]).all() and np.isfinite(np.delete(s["z_median"].values, bad)).all()
    assert np.isnan(s["pz"].values[bad]).all()


# ----------------------------------------------------------------------------- external scheduler, worker loss

def test_cli_against_external_scheduler(reference, catalog, env, external_cluster, tmp_path):
    address = external_cluster.address
    assert address.startswith("tcp://127.0.0.1:")
    out = tmp_path / "post.zarr"
    proc = _cli(["fit", str(catalog), "--out", str(out), "--seed", str(SEED), "--chunk-size", str(CHUNK),
                 "--scheduler", address, "--no-progress", *TOY_ARGS, *SETTINGS_ARGS], env)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert f"connecting to scheduler {address}" in log and "dashboard" in log
    assert_same_store(reference, out)


def test_worker_loss_mid_run(reference, catalog, external_cluster, tmp_path):  # last: it kills a worker
    address, workers = external_cluster.address, external_cluster.workers
    assert len(workers) == 2
    out = tmp_path / "post.zarr"
    result = {}
    import threading

    def run():
        result["stats"] = _fit(catalog, out, client=None, scheduler=address)

    t = threading.Thread(target=run)
    t.start()
    t0 = time.monotonic()
    while _done(out).sum() < 1:
        assert time.monotonic() - t0 < 240 and t.is_alive(), "no chunk finished"
        time.sleep(0.02)
    workers[0].kill()  # SIGKILL one of the two workers while chunks are in flight
    n_done_at_kill = int(_done(out).sum())
    t.join(timeout=300)
    assert n_done_at_kill < N_GAL // CHUNK, "the worker was killed after the run ended"
    stats = result["stats"]
    # every chunk written exactly once by a completed task (a task re-run after the loss finds no marker
    # and writes; one whose marker exists is skipped), and the store is the uninterrupted one
    assert stats["chunks_fitted"] + stats["chunks_skipped"] == N_GAL // CHUNK
    assert_same_store(reference, out)


def test_local_workers_keep_glibc_adaptive_malloc(monkeypatch):
    """Dask's nanny would export MALLOC_TRIM_THRESHOLD_=65536, freezing glibc's mmap threshold (fits 18 % slower,
    BENCHMARKS.md); popflow's LocalCluster leaves it unset."""
    from distributed import Client

    from popflow.pipeline import local_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_cluster(1, 1) as cluster, Client(cluster) as client:
        values = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(values.values()) == [None]
