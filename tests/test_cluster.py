"""Scale-out with real services: a multi-node Ray cluster and a real `mlflow server`, including the
server going away mid-sweep."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOY_BASE = {"data.dataset": "ring8", "train.steps": 60, "train.log_every": 10, "train.ckpt_every": 30,
            "eval.every": 30, "eval.n_samples": 200, "eval.k": 1, "eval.grid": 64,
            "model.hidden": 64, "model.depth": 2, "train.batch_size": 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(tmp_path, name, trials=4, **over):
    spec = {"name": name, "preset": "toy", "base": dict(TOY_BASE), "metric": "swd_k1",
            "space": {"seed": {"grid": list(range(trials))}}, "resources": {"cpu": 1}, "max_concurrent": 2}
    spec.update(over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def sweep(spec, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sweep_on_a_two_node_ray_cluster(tmp_path):
    port = free_port()
    addr = f"127.0.0.1:{port}"
    import secrets
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "IGN_BENCH_STORAGE": str(tmp_path / "ray"),
                # Ray 2.60 clusters authenticate every node and driver with a shared token
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    ray = str(BIN / "ray")
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
                        "--disable-usage-stats", "--node-ip-address", "127.0.0.1"], check=True, env=env,
                       capture_output=True, timeout=180)
        subprocess.run([ray, "start", "--address", addr, "--num-cpus", "1", "--resources", '{"second": 1}',
                        "--disable-usage-stats", "--node-ip-address", "127.0.0.1"], check=True, env=env,
                       capture_output=True, timeout=180)
        time.sleep(3)
        nodes = json.loads(subprocess.run(
            [sys.executable, "-c", "import ray, json; ray.init(address='%s', logging_level='ERROR');"
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % addr],
            capture_output=True, text=True, env=env, timeout=120).stdout.strip().splitlines()[-1])
        assert len(nodes) == 2
        # the teardown finds this cluster's processes by their token (and nothing else's)
        assert len(processes_with_env("RAY_AUTH_TOKEN", env["RAY_AUTH_TOKEN"])) >= 4
        r = sweep(write_spec(tmp_path, "cluster"), {**env, "RAY_ADDRESS": addr})
        assert r.returncode == 0, r.stderr[-3000:]
        import mlflow
        c = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        runs = c.search_runs([c.get_experiment_by_name("cluster").experiment_id])
        assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
        used = {x.data.tags["node_id"] for x in runs}
        assert used == set(nodes), (used, nodes)  # trials ran on both nodes
    finally:
        # Not `ray stop`: it kills every Ray process on the machine, a user's running sweep included.
        # Every process of this cluster inherited the test's unique token, so stop exactly those.
        left = stop_processes_with_env("RAY_AUTH_TOKEN", env["RAY_AUTH_TOKEN"])
        assert not left, f"cluster processes still alive: {left}"


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment holds key=value (Linux /proc)."""
    want, pids = f"{key}={value}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as fh:
                    if want in fh.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:  # gone, or not ours
                pass
    return pids


def stop_processes_with_env(key: str, value: str, wait_s: float = 20) -> list[int]:
    """SIGTERM, then SIGKILL after wait_s, every process started with key=value; returns survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_env(key, value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait_s
        while processes_with_env(key, value) and time.time() < deadline:
            time.sleep(0.5)
    return processes_with_env(key, value)


class MlflowServer:
    def __init__(self, tmp_path, port):
        self.cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                    "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import urllib.request
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path, free_port()).start()
    yield server
    server.stop()


def check_all_logged(url, name, n, steps=60):
    import mlflow
    c = mlflow.tracking.MlflowClient(tracking_uri=url)
    runs = c.search_runs([c.get_experiment_by_name(name).experiment_id])
    assert len(runs) == n
    assert len({x.data.tags["trial_id"] for x in runs}) == n
    for x in runs:
        assert x.info.status == "FINISHED"
        hist = [h.step for h in c.get_metric_history(x.info.run_id, "train/loss")]
        assert sorted(set(hist)) == list(range(10, steps + 1, 10)), hist
        assert [h.step for h in c.get_metric_history(x.info.run_id, "swd_k1")][-1] == steps
        arts = [a.path for a in c.list_artifacts(x.info.run_id, "samples")]
        assert "samples/samples_k.png" in arts
        assert [a.path for a in c.list_artifacts(x.info.run_id, "checkpoint")]


@pytest.mark.slow
def test_four_concurrent_trials_against_an_mlflow_server(tmp_path, mlflow_server):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MLFLOW_TRACKING_URI": mlflow_server.url, "IGN_BENCH_STORAGE": str(tmp_path / "ray")})
    spec = write_spec(tmp_path, "server", trials=4, resources={"cpu": 0.5}, max_concurrent=4)
    r = sweep(spec, env)
    assert r.returncode == 0, r.stderr[-3000:]
    check_all_logged(mlflow_server.url, "server", 4)


@pytest.mark.slow
def test_tracking_server_down_mid_sweep_loses_nothing(tmp_path, mlflow_server):
    """The server is killed once the first run exists and restarted 15 s later: the driver's MLflow
    calls back off and retry, and afterwards every run, metric and artifact is there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MLFLOW_TRACKING_URI": mlflow_server.url, "IGN_BENCH_STORAGE": str(tmp_path / "ray")})
    spec = write_spec(tmp_path, "outage", trials=2)
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import mlflow
    c = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server.url)
    deadline = time.time() + 600
    while time.time() < deadline:
        exp = c.get_experiment_by_name("outage")
        if exp and c.search_runs([exp.experiment_id]):
            break
        assert proc.poll() is None
        time.sleep(0.5)
    mlflow_server.stop()
    time.sleep(15)
    assert proc.poll() is None  # the outage happened mid-sweep
    mlflow_server.start()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    check_all_logged(mlflow_server.url, "outage", 2)
