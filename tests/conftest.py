import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `ign-bench ARGS` in a fresh process; returns CompletedProcess (text)."""
    import subprocess
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd or ROOT)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def no_network(monkeypatch):
    """Everything that uses it must work offline: any attempt to open a connection fails the test.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("no_network")` (Ray and MLflow-server
    tests need sockets)."""
    import socket

    def refuse(*a, **k):
        raise RuntimeError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def mnist():
    """MNIST from ../shared/data (harness.data.Data: train/test images and labels)."""
    from harness.data import load_dataset
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """sweeps/smoke.yaml run once per test session with real Ray and a real MLflow SQLite store.

    Returns a dict: tmp (folder), uri (MLflow tracking URI), proc (the CompletedProcess of
    `ign-bench sweep smoke`). Tests of the sweep runner and of the reports share it."""
    import subprocess
    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MLFLOW_TRACKING_URI": uri, "IGN_BENCH_STORAGE": str(tmp / "ray"), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", "smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    return {"tmp": tmp, "uri": uri, "proc": proc, "env": env}
