"""Ray Tune callbacks that run in the sweep driver: MLflow tracking and the live table of trials."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from .checkpoint import list_checkpoints
from .config import build_config
from .tracking import Tracker, git_commit, metric_rows


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_name(trial_id: str, params: dict[str, Any]) -> str:
    """'t0003 lambda_tight=0.2 distance=l1': readable in MLflow's compare view without renaming."""
    idx = trial_id.split("_")[-1]
    parts = [f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted(params.items())]
    return " ".join([f"t{idx}"] + parts)[:250]


# String values a trial reports that become run tags (what stands behind the numbers).
TEXT_TAGS = ("inception_weights", "mnist_weights", "bn_mode", "node_id", "device")


class MLflowCallback(Callback):
    """One MLflow run per trial, written from the driver only (see harness.tracking)."""

    def __init__(self, spec, sweep_dir: Path):
        self.spec = spec
        self.sweep_dir = Path(sweep_dir)
        self.tracker: Optional[Tracker] = None
        self.run_ids: dict[str, str] = {}
        self.commit = git_commit()

    def setup(self, **info):
        self.tracker = Tracker(self.spec.name)

    def _run(self, trial) -> str:
        from .sweep import swept_params, trial_overrides
        tid = trial.trial_id
        if tid not in self.run_ids:
            cfg = build_config(trial_overrides(self.spec, trial.config), preset=self.spec.preset)
            swept = swept_params(self.spec, trial.config)
            tags = {"sweep": self.spec.name, "git_commit": self.commit, "dataset": cfg.data.dataset,
                    "swept": ",".join(sorted(k for k in swept if k != "variant")), "trial_dir": str(self.sweep_dir / "trials" / tid),
                    "mlflow.note.content": self.spec.description,
                    "sweep_metric": self.spec.metric, "sweep_mode": self.spec.mode}
            self.run_ids[tid] = self.tracker.start_run(tid, run_name(tid, swept), cfg.flat(), tags)
        return self.run_ids[tid]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run(trial)
        self.tracker.log_metrics(run_id, metric_rows(result))
        text = {k: v for k, v in result.items() if k in TEXT_TAGS and isinstance(v, str)}
        if text:
            self.tracker.set_tags(run_id, text)

    def _artifacts(self, trial) -> list[tuple[Path, str]]:
        d = self.sweep_dir / "trials" / trial.trial_id
        files = [(p, "samples") for p in sorted((d / "samples").glob("*.png"))]
        files += [(d / "config.json", ""), (d / "final.json", "")]
        ck = list_checkpoints(d / "checkpoints")
        if ck:
            files.append((ck[-1], "checkpoint"))
        return files

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.log_artifacts(run_id, self._artifacts(trial))
        self.tracker.end_run(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.set_tags(run_id, {"error": error_text(trial)})
        self.tracker.log_artifacts(run_id, self._artifacts(trial))
        self.tracker.end_run(run_id, "FAILED")


def error_text(trial) -> str:
    """The last meaningful line of a trial's error (its exception type and message)."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).exists():
        text = Path(path).read_text(errors="replace")
    text = text or str(getattr(trial, "error_msg", "") or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or ln.startswith("Killed") or "died" in ln:
            return ln[:500]
    return (lines[-1] if lines else "unknown error")[:500]


class LiveTable(Callback):
    """A table of trials and their latest metrics, reprinted at most every `every_s` seconds."""

    def __init__(self, spec, every_s: float = 15.0, stream=None, sweep_dir: Optional[Path] = None,
                 quiet_every_s: float = 60.0):
        self.spec = spec
        self.every_s = every_s
        self.quiet_every_s = quiet_every_s
        self.stream = stream or sys.stderr
        self.sweep_dir = Path(sweep_dir) if sweep_dir else None
        self.last: dict[str, dict[str, Any]] = {}
        self._t = 0.0

    def on_step_end(self, iteration, trials, **info):
        # Between results (a trial whose only evaluation is its last) the table still moves: the
        # step and losses come from the records the trial has not handed to Ray yet.
        if time.monotonic() - self._t >= self.quiet_every_s and any(t.status == "RUNNING" for t in trials):
            self._maybe_print(trials, force=True)

    def _pending(self, trial_id: str) -> dict[str, Any]:
        """The newest record in the trial's pending.jsonl (same machine only; else nothing)."""
        if self.sweep_dir is None:
            return {}
        path = self.sweep_dir / "trials" / trial_id / "pending.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return {}
        for line in reversed(lines):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        self._maybe_print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._maybe_print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._maybe_print(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self._maybe_print(trials, force=True)

    def _maybe_print(self, trials, force: bool = False):
        now = time.monotonic()
        if not force and now - self._t < self.every_s:
            return
        self._t = now
        print(self.render(trials), file=self.stream, flush=True)

    def render(self, trials) -> str:
        from .sweep import swept_params
        m = self.spec.metric
        rows = []
        for t in trials:
            # trials restored from an earlier run of the sweep carry their results in last_result
            r = self.last.get(t.trial_id) or getattr(t, "last_result", None) or {}
            if t.status == "RUNNING":
                newer = self._pending(t.trial_id)
                if int(newer.get("step", 0)) > int(r.get("step", 0) or 0):
                    r = {**r, "step": newer["step"], "train/rec": newer.get("train/rec", r.get("train/rec", ""))}
            params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted(swept_params(self.spec, t.config).items()))
            val = r.get(m)
            rows.append((t.trial_id.split("_")[-1], t.status, str(r.get("step", "")),
                         _short(val) if val is not None else "", _short(r.get("train/rec", "")), params))
        head = ("trial", "status", "step", m, "rec", "params")
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths[:-1]) + "  {}"
        counts = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        lines = [f"== sweep {self.spec.name}: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())),
                 fmt.format(*head)] + [fmt.format(*r) for r in rows]
        return "\n".join(lines)
