"""Faults inside trials, fuzzed bad input: nothing lost, everything said in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.sweep import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = {"data.dataset": "ring8", "train.steps": 60, "train.log_every": 10, "train.ckpt_every": 20,
            "eval.every": 20, "eval.n_samples": 200, "eval.k": 1, "eval.grid": 0,
            "model.hidden": 64, "model.depth": 2, "train.batch_size": 128}


def env_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "IGN_BENCH_STORAGE": str(tmp_path / "ray"),
                "PYTHONUNBUFFERED": "1"})
    return env


def mlflow_runs(tmp_path, name):
    import mlflow
    c = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_faults_inside_trials(tmp_path):
    """A trial that raises, one whose loss turns NaN, one SIGKILLed: each FAILED with its reason,
    the healthy trial finishes, and the exit code and summary say what failed."""
    spec = {"name": "faults", "preset": "toy", "base": TOY_BASE, "metric": "drift_real",
            "resources": {"cpu": 1}, "max_concurrent": 2,
            "variants": [{},                                                    # healthy
                         {"data.dataset": "folder", "data.root": str(tmp_path / "no-such-folder")},  # raises
                         {"optim.lr": 1e30},                                    # diverges to NaN
                         {"train.steps": 100000, "train.log_every": 1000}]}     # killed below
    p = tmp_path / "faults.yaml"
    p.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", str(p)], cwd=ROOT, env=env_for(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill the long trial once the three others are over (it is then the only trial process)
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        runs = mlflow_runs(tmp_path, "faults")
        done = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
        if len(done) == 3 and len(runs) == 4 and not killed:
            time.sleep(2)
            running = [r for r in runs if r.info.status == "RUNNING"]
            assert len(running) == 1
            worker = Path(running[0].data.tags["trial_dir"]) / "worker.json"
            os.kill(json.loads(worker.read_text())["pid"], signal.SIGKILL)
            killed = True
        time.sleep(1)
    out, err = proc.communicate(timeout=300)
    assert killed, err[-3000:]
    assert proc.returncode == 1, err[-3000:]
    assert out.count("FAILED") == 3, out
    runs = mlflow_runs(tmp_path, "faults")
    status = sorted(r.info.status for r in runs)
    assert status == ["FAILED", "FAILED", "FAILED", "FINISHED"]
    errors = sorted(r.data.tags.get("error", "") for r in runs if r.info.status == "FAILED")
    assert any("FileNotFoundError" in e or "no-such-folder" in e for e in errors), errors
    assert any("FloatingPointError" in e and "non-finite loss" in e for e in errors), errors
    assert any("died" in e.lower() or "actor" in e.lower() or "killed" in e.lower() for e in errors), errors
    assert not [r for r in runs if r.info.status == "RUNNING"]


KEYS = ["loss.lambda_tight", "loss.clamp_ratio", "loss.distance", "noise.name", "optim.lr", "train.steps",
        "seed", "model.name", "data.dataset", "eval.k", "loss.lambda_tigth", "bogus", "noise.fft_stats"]
VALUES = st.one_of(st.integers(-5, 5), st.floats(-10, 10, allow_nan=False), st.sampled_from(
    ["l1", "l2", "l3", "fft", "pink", "mnist", "cifar", "", None, [1, 2], {"a": 1}, True]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES, where=st.sampled_from(["base", "grid", "choice"]))
def test_fuzzed_specs_either_load_or_fail_in_one_line(tmp_path, key, value, where):
    spec = {"name": "fuzz", "preset": "toy", "base": dict(TOY_BASE), "metric": "swd_k1"}
    if where == "base":
        spec["base"][key] = value
    else:
        spec["space"] = {key: {where: [value]}}
    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(spec))
    try:
        load_spec(str(p))
    except SpecError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        first = msg.split(":")[0]
        assert key in msg or first in ("base", "space." + key) or first.startswith("space"), msg


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["--steps", "--dataset", "--loss.clamp_ratio", "--distance", "--lr", "--k",
                                 "--model", "--set", "-1", "0", "0.5", "abc", "l9", "mnist", "ring8",
                                 "loss.x=1", "--bogus", "1e-3"]), min_size=1, max_size=6))
def test_fuzzed_train_arguments_never_traceback(tmp_path_factory, argv):
    """In process: every invalid combination exits 2 with one line; nothing is written."""
    import contextlib
    import io
    from harness.cli import main
    out = tmp_path_factory.mktemp("fz") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", "--dry-run", "--out", str(out), *argv])
        except SystemExit as e:  # argparse usage errors
            code = e.code
    assert code in (0, 2), (argv, err.getvalue())
    if code == 2:
        assert "Traceback" not in err.getvalue()
        assert err.getvalue().strip().splitlines()[-1].startswith(("ign-bench train: error:", "usage:")) \
            or "error:" in err.getvalue()
    assert not out.exists()


def test_a_resumed_failed_trial_keeps_its_run_and_moves_the_stale_error(tmp_path, monkeypatch):
    """A trial that failed (say, its node died) and then finishes on resume: the same MLflow run,
    FINISHED, and its old reason kept as `previous_error` rather than left as `error`."""
    from harness.tracking import Tracker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    t = Tracker("resume-failed")
    rid = t.start_run("abc_00001", "t00001", {"seed": 0}, {"sweep": "resume-failed"})
    t.set_tags(rid, {"error": "ActorDiedError: node lost"})
    t.end_run(rid, "FAILED")
    again = Tracker("resume-failed")
    assert again.start_run("abc_00001", "t00001", {"seed": 0}, {"sweep": "resume-failed"}) == rid
    again.end_run(rid, "FINISHED")
    run = again.client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags and run.data.tags["previous_error"] == "ActorDiedError: node lost"
    assert len(again.client.search_runs([again.experiment_id])) == 1
