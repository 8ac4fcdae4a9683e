"""Sweeps end to end with real Ray and a real MLflow SQLite store."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.sweep import SpecError, load_spec, param_space, reported_metrics
from harness.config import build_config

ROOT = Path(__file__).resolve().parents[1]


def sweep_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "IGN_BENCH_STORAGE": str(tmp_path / "ray"), "PYTHONUNBUFFERED": "1"}


def run_sweep_cli(spec, tmp_path, timeout=900):
    return subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(spec)], cwd=ROOT,
                          env=sweep_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def runs_of(tmp_path, experiment):
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def write_spec(tmp_path, name, **over):
    spec = {"name": name, "preset": "toy",
            "base": {"data.dataset": "ring8", "train.steps": 60, "train.log_every": 10, "train.ckpt_every": 20,
                     "eval.every": 20, "eval.n_samples": 200, "eval.k": 2, "eval.grid": 64,
                     "model.hidden": 64, "model.depth": 2, "train.batch_size": 128},
            "space": {"seed": {"grid": [0, 1, 2, 3]}}, "metric": "swd_k1", "resources": {"cpu": 1},
            "max_concurrent": 2}
    spec.update(over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.slow
def test_smoke_sweep_end_to_end(smoke_sweep):
    r, tmp_path = smoke_sweep["proc"], smoke_sweep["tmp"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best trial" in r.stdout and "MLflow run" in r.stdout
    assert "== sweep smoke" in r.stderr  # the live table
    spec = load_spec("smoke")
    client, runs = runs_of(tmp_path, "smoke")
    assert len(runs) == 4  # 2 x 2 grid, one run per trial
    combos = set()
    for run in runs:
        assert run.info.status == "FINISHED"
        p, m, tags = run.data.params, run.data.metrics, run.data.tags
        for axis in spec.space:
            assert axis in p
        combos.add((p["loss.lambda_tight"], p["loss.distance"]))
        for k in (1, 2, 3):
            assert f"swd_k{k}" in m and f"idem_k{k}" in m
        assert tags["sweep"] == "smoke" and tags["trial_id"] and tags["git_commit"]
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert "samples/samples_k.png" in arts
        assert any(a.path.endswith(".pt") for a in client.list_artifacts(run.info.run_id, "checkpoint"))
        steps = [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(25, 301, 25))  # every logged step made it, none twice
        assert [h.step for h in client.get_metric_history(run.info.run_id, "swd_k1")] == [150, 300]
    assert len(combos) == 4


def test_invalid_spec_fails_fast_with_exit_2_and_no_experiment(tmp_path):
    bad = write_spec(tmp_path, "bad", space={"loss.lambda_tigth": {"grid": [0.1]}})
    t = time.time()
    r = run_sweep_cli(bad, tmp_path, timeout=60)
    assert time.time() - t < 5 + 5, "validation must be fast"  # + interpreter start-up on a loaded box
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ign-bench sweep: error: loss.lambda_tigth")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("over, key", [
    ({"space": {"loss.distance": {"grid": ["l1", "l7"]}}}, "space.loss.distance"),
    ({"space": {"loss.clamp_ratio": {"grid": [0.5]}}}, "space.loss.clamp_ratio"),
    ({"space": {"loss.lambda_tight": {"uniform": [0.1, 0.5]}}}, "space.loss.lambda_tight"),
    ({"space": {"loss.lambda_tight": {"normal": [0, 1]}}}, "space.loss.lambda_tight"),
    ({"metric": "fid_mnist_k9"}, "metric"),
    ({"search": "bayes"}, "search"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"colour": "blue"}, "colour"),
    ({"base": {"train.steps": 0}}, "base"),
    ({"variants": [{"noise.name": "pink"}]}, "variants[0]"),
])
def test_spec_errors_name_the_key(tmp_path, over, key):
    with pytest.raises(SpecError) as e:
        load_spec(str(write_spec(tmp_path, "x", **over)))
    assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)


def test_gpu_spec_on_a_cpu_machine_is_refused(tmp_path, monkeypatch):
    import torch
    from harness.sweep import check_resources
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = load_spec(str(write_spec(tmp_path, "g", resources={"cpu": 1, "gpu": 0.5})))
    with pytest.raises(SpecError, match="resources.gpu: 0.5 GPUs per trial but this machine has none"):
        check_resources(spec)


def test_shipped_specs_are_valid():
    for name in ("smoke", "default", "optuna", "paper"):
        spec = load_spec(name)
        for v in spec.variants or [{}]:
            assert spec.metric in reported_metrics(build_config({**spec.base, **v}, preset=spec.preset))
    # every ablation axis of the paper has at least two values in the default sweep
    spec = load_spec("default")
    seen = {}
    for v in [{}] + spec.variants:
        c = build_config({**spec.base, **v}, preset=spec.preset)
        for key in ("loss.lambda_tight", "loss.clamp_ratio", "loss.distance", "noise.name",
                    "loss.clamp_reference", "noise.fft_stats", "loss.tight_warmup"):
            seen.setdefault(key, set()).add(str(c.flat()[key]))
    assert all(len(v) >= 2 for v in seen.values()), seen
    assert load_spec("optuna").scheduler.type == "asha"


def test_param_space_kinds():
    from ray import tune
    spec = load_spec("optuna")
    space = param_space(spec)
    assert isinstance(space["loss.lambda_tight"], tune.search.sample.Float)
    spec = load_spec("default")
    assert "variant" in param_space(spec)


@pytest.mark.slow
def test_asha_stops_weak_trials_early(tmp_path):
    # Optuna TPE + ASHA over the tightness weight: huge weights diverge from the ring and are cut
    spec = write_spec(tmp_path, "asha", search="optuna", num_samples=6, metric="swd_k1",
                      space={"loss.lambda_tight": {"loguniform": [0.01, 30.0]}},
                      scheduler={"type": "asha", "grace_period": 20, "reduction_factor": 3},
                      base={"data.dataset": "ring8", "train.steps": 180, "train.log_every": 10,
                            "train.ckpt_every": 60, "eval.every": 20, "eval.n_samples": 200, "eval.k": 1,
                            "eval.grid": 0, "model.hidden": 64, "model.depth": 2, "train.batch_size": 128})
    r = run_sweep_cli(spec, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client, runs = runs_of(tmp_path, "asha")
    assert len(runs) == 6
    last_steps = sorted(max(h.step for h in client.get_metric_history(run.info.run_id, "swd_k1")) for run in runs)
    assert last_steps[-1] == 180          # the best went the distance
    assert last_steps[0] < 180            # and at least one was stopped early
    assert all(run.info.status == "FINISHED" for run in runs)


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates(tmp_path):
    spec = write_spec(tmp_path, "resume", base={
        "data.dataset": "ring8", "train.steps": 120, "train.log_every": 10, "train.ckpt_every": 20,
        "eval.every": 40, "eval.n_samples": 200, "eval.k": 1, "eval.grid": 64,
        "model.hidden": 64, "model.depth": 2, "train.batch_size": 128})
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", str(spec)], cwd=ROOT,
                            env=sweep_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    # wait until the first trial has finished, then kill the driver hard
    deadline = time.time() + 600
    trials = tmp_path / "ray" / "resume" / "trials"
    while time.time() < deadline:
        if any((d / "final.json").exists() for d in trials.glob("*")) if trials.exists() else False:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    client, runs = runs_of(tmp_path, "resume")
    before = len(runs)
    assert before >= 1 and any(r.info.status == "RUNNING" for r in runs) or before < 4
    r = run_sweep_cli(spec, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resuming sweep resume" in r.stderr
    client, runs = runs_of(tmp_path, "resume")
    ids = [run.data.tags["trial_id"] for run in runs]
    assert len(ids) == len(set(ids)) == 4, ids        # no duplicate, no missing run
    assert all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        assert max(h.step for h in client.get_metric_history(run.info.run_id, "swd_k1")) == 120
        # nothing lost: records a killed trial had not yet handed to Ray are sent again on resume
        assert {h.step for h in client.get_metric_history(run.info.run_id, "swd_k1")} == {40, 80, 120}
        assert {h.step for h in client.get_metric_history(run.info.run_id, "train/loss")} == set(range(10, 121, 10))


def test_unsent_records_are_those_up_to_the_resume_checkpoint(tmp_path):
    from harness.sweep import unsent_records
    pending, ckpts = tmp_path / "pending.jsonl", tmp_path / "checkpoints"
    lines = [{"step": 50, "train/loss": 1.0}, {"step": 60, "train/loss": 0.9}, {"step": 60, "swd_k1": 0.3},
             {"step": 70, "train/loss": 0.8}]
    pending.write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 8')  # last line cut by a kill
    assert unsent_records(pending, ckpts) == []          # no checkpoint: the trial starts over
    ckpts.mkdir()
    (ckpts / "ckpt-00000060.pt").write_bytes(b"")
    assert unsent_records(pending, ckpts) == lines[:3]   # step 70 will be trained and reported again


def test_live_table_shows_progress_between_results(tmp_path):
    """A running trial with no result yet (its only evaluation is its last) shows the step and
    loss of its newest unsent record; a finished one its last result."""
    import io
    from types import SimpleNamespace
    from harness.sweep import load_spec
    from harness.sweep_callbacks import LiveTable
    spec = load_spec("smoke")
    cfg = {"loss.lambda_tight": 0.05, "loss.distance": "l1"}
    running = SimpleNamespace(trial_id="abc_00000", status="RUNNING", config=cfg, last_result={})
    done = SimpleNamespace(trial_id="abc_00001", status="TERMINATED", config={**cfg, "loss.distance": "l2"},
                           last_result={"step": 300, "swd_k1": 0.25, "train/rec": 0.125})
    folder = tmp_path / "trials" / "abc_00000"
    folder.mkdir(parents=True)
    (folder / "pending.jsonl").write_text('{"step": 10, "train/rec": 0.5}\n{"step": 20, "train/rec": 0.375}\n{"st')
    out = io.StringIO()
    table = LiveTable(spec, stream=out, sweep_dir=tmp_path, quiet_every_s=0)
    table.on_step_end(1, [running, done])
    rows = out.getvalue().splitlines()
    assert rows[0] == "== sweep smoke: 1 running, 1 terminated"
    assert rows[2].split()[:3] == ["00000", "RUNNING", "20"] and rows[2].split()[3] == "0.375"
    assert rows[3].split()[:5] == ["00001", "TERMINATED", "300", "0.25", "0.125"]
