"""MLflow tracking: one experiment per sweep, one run per trial, written by the sweep driver only.

Why the driver: trials report plain dicts to Ray; a Ray Tune callback in the driver turns them into
MLflow calls. There is then exactly one writer per sweep, so SQLite's "database is locked" cannot
come from our own trials racing each other, and trials never hold tracking connections. Every call
goes through `retry`, which backs off and retries a store that is briefly unavailable (a locked
SQLite file shared with another sweep or the UI, a restarting MLflow server) for up to
`IGN_BENCH_MLFLOW_RETRY_S` seconds (default 300) and then fails the sweep loudly; nothing is
dropped silently.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .paths import PROJECT_ROOT

log = logging.getLogger(__name__)
DEFAULT_DB = PROJECT_ROOT / "mlflow.db"
DEFAULT_ARTIFACTS = PROJECT_ROOT / "mlartifacts"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def retry(fn: Callable, *args, what: str = "mlflow call", budget_s: Optional[float] = None, **kw):
    """Call fn, retrying with exponential backoff (0.5 s .. 30 s) while the store is unavailable."""
    budget = float(os.environ.get("IGN_BENCH_MLFLOW_RETRY_S", 300)) if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn(*args, **kw)
        except Exception as e:  # MlflowException, requests/sqlalchemy errors: all transient here
            if not _transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__,
                        str(e).splitlines()[0][:160] if str(e) else "", delay)
            time.sleep(delay)
            delay = min(30.0, delay * 2)


def _transient(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    permanent = ("invalid parameter", "resource_already_exists", "invalid_parameter_value",
                 "changing param values is not allowed", "does not exist")
    if any(p in text for p in permanent):
        return False
    transient = ("locked", "connection", "timed out", "timeout", "temporarily", "max retries",
                 "503", "502", "504", "refused", "unavailable", "operationalerror", "reset by peer")
    return any(t in text for t in transient)


class Tracker:
    """Thin wrapper over MlflowClient for one experiment; every call retried (see module doc)."""

    def __init__(self, experiment: str, uri: Optional[str] = None):
        from mlflow.tracking import MlflowClient
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment
        self.experiment_id = retry(self._get_or_create, experiment, what="create experiment")

    def _get_or_create(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database file, not in the cwd
            db = Path(self.uri[len("sqlite:///"):])
            root = DEFAULT_ARTIFACTS if db.resolve() == DEFAULT_DB.resolve() else db.parent / "mlartifacts"
            location = (root / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def find_run(self, trial_id: str) -> Optional[str]:
        runs = retry(self.client.search_runs, [self.experiment_id],
                     filter_string=f"tags.trial_id = '{trial_id}'", max_results=5, what="search runs")
        return runs[0].info.run_id if runs else None

    def start_run(self, trial_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The run for a trial: reused if it exists (a resumed sweep), else created."""
        from mlflow.entities import Param, RunTag
        run_id = self.find_run(trial_id)
        if run_id is None:
            run = retry(self.client.create_run, self.experiment_id, run_name=name,
                        tags={"trial_id": trial_id, **tags}, what="create run")
            run_id = run.info.run_id
            items = [Param(k, _param(v)) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                retry(self.client.log_batch, run_id, params=items[i:i + 100], what="log params")
        else:
            # A failed attempt's reason stays readable as `previous_error`; `error` then means this attempt.
            old = retry(self.client.get_run, run_id, what="get run").data.tags.get("error")
            if old is not None:
                retry(self.client.set_tag, run_id, "previous_error", old, what="log tags")
                retry(self.client.delete_tag, run_id, "error", what="delete tag")
            retry(self.client.update_run, run_id, status="RUNNING", what="reopen run")
            retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                  what="log tags")
        return run_id

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
        for i in range(0, len(items), 500):
            retry(self.client.log_batch, run_id, metrics=items[i:i + 500], what="log metrics")

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
              what="log tags")

    def log_artifacts(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        for path, sub in files:
            if Path(path).exists():
                retry(self.client.log_artifact, run_id, str(path), sub or None, what="log artifact")

    def end_run(self, run_id: str, status: str) -> None:
        retry(self.client.set_terminated, run_id, status, what="end run")


def _param(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def metric_rows(result: dict[str, Any]) -> list[tuple[str, float, int]]:
    """MLflow rows from one trial report: the per-step loss history plus the numbers at `step`."""
    rows: list[tuple[str, float, int]] = []
    history = result.get("history") or []
    if isinstance(history, str):  # the trainable sends it as JSON (see harness.sweep.trainable)
        history = json.loads(history)
    for rec in history:
        s = rec["step"]
        rows += [(k, v, s) for k, v in rec.items() if k != "step" and _is_number(v)]
    step = int(result.get("step", 0))
    for k, v in result.items():
        if k in ("step", "history") or k in _RAY_KEYS or not _is_number(v):
            continue
        rows.append((k, v, step))
    return rows


_RAY_KEYS = {"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "time_since_restore",
             "iterations_since_restore", "pid", "done", "episodes_total", "timesteps_total",
             "timesteps_since_restore", "date", "hostname", "node_ip", "trial_id", "experiment_tag",
             "checkpoint_dir_name", "should_checkpoint"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cmd_ui(args) -> int:
    """Start the MLflow UI on the project's store (or MLFLOW_TRACKING_URI) and print its URL."""
    uri = tracking_uri()
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri}\n  open {url}  (Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", DEFAULT_ARTIFACTS.as_uri()]
    return subprocess.call(cmd)


def add_cli(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store and print its URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
