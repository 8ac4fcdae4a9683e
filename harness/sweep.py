"""Sweeps: a declarative YAML spec -> Ray Tune (grid | Optuna TPE, FIFO | ASHA) -> MLflow.

A spec is validated completely against TrialConfig before Ray or MLflow is touched: every axis key,
every grid/choice value and every range end point is built into a real trial config, and the
metric to optimise must be one the trials will report. Then:

- the trainable is a thin shim: flat overrides -> `build_config` -> `run_trial(report=...)`;
- each trial's folder is <storage>/<sweep>/trials/<trial_id>, so a restarted trial resumes from its
  own checkpoint; running the same sweep again restores the Ray experiment (`Tuner.restore`);
- a Ray callback in the driver writes MLflow (see harness.tracking) and keeps the live table.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import ConfigError, TrialConfig, build_config, leaf_keys
from .paths import PROJECT_ROOT

log = logging.getLogger(__name__)
SWEEPS_DIR = PROJECT_ROOT / "sweeps"
DEFAULT_STORAGE = PROJECT_ROOT / "ray_results"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class SpecError(ValueError):
    """An invalid sweep spec: one line naming the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scheduler(_Strict):
    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(100, ge=1)        # asha: steps before a trial can be stopped
    reduction_factor: float = Field(2, gt=1)    # asha: keep 1/reduction_factor at each rung


class Resources(_Strict):
    cpu: float = Field(1, gt=0)                 # CPUs per trial (also torch's thread count)
    gpu: float = Field(0, ge=0)                 # GPUs per trial; fractions share one GPU


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")   # MLflow experiment and Ray experiment name
    description: str = ""
    preset: Optional[str] = "auto"              # TrialConfig preset under `base` (auto = by data set)
    base: dict[str, Any] = {}                   # flat config keys for every trial
    space: dict[str, dict[str, Any]] = {}       # axis key -> {grid|choice|uniform|loguniform|randint: ...}
    variants: list[dict[str, Any]] = []         # one-factor ablations: each a diff from base (grid only)
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)           # grid: repeats of the grid; optuna: number of trials
    metric: str = "drift_real"                  # what the search and the scheduler optimise
    mode: Literal["min", "max"] = "min"
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    max_concurrent: int = Field(2, ge=1)        # trials at once
    max_failures: int = Field(0, ge=0)          # retries of a failed trial (0 = report it failed)

    @field_validator("space")
    @classmethod
    def _one_distribution(cls, v):
        for key, dist in v.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
        return v


def find_spec(name_or_path: str) -> Path:
    p = Path(name_or_path)
    for cand in (p, SWEEPS_DIR / name_or_path, SWEEPS_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand.resolve()
    names = ", ".join(sorted(q.stem for q in SWEEPS_DIR.glob("*.yaml")))
    raise SpecError(f"sweep: no spec {name_or_path!r}; allowed: a YAML path or one of {names}")


def load_spec(name_or_path: str) -> SweepSpec:
    """Parse and fully validate a spec (see module doc). Raises SpecError with a one-line message."""
    path = find_spec(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path.name}: expected a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(SweepSpec.model_fields)}"
        if msg.startswith(loc + ":") or msg.startswith("space."):
            raise SpecError(msg) from None
        raise SpecError(f"{loc}: {msg}") from None
    validate_against_config(spec)
    return spec


def _check(spec: SweepSpec, overrides: dict[str, Any], where: str) -> TrialConfig:
    try:
        return build_config({**spec.base, **overrides}, preset=spec.preset)
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def validate_against_config(spec: SweepSpec) -> None:
    known = leaf_keys()
    for key in list(spec.base) + list(spec.space) + [k for v in spec.variants for k in v]:
        if key not in known:
            raise SpecError(f"{key}: unknown config key; see `ign-bench train --help` for the keys")
    base_cfg = _check(spec, {}, "base")
    for key, dist in spec.space.items():
        kind, values = next(iter(dist.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise SpecError(f"space.{key}.{kind}: expected a non-empty list, got {values!r}")
            for v in values:
                _check(spec, {key: v}, f"space.{key}")
        else:
            if not (isinstance(values, list) and len(values) == 2
                    and all(isinstance(v, (int, float)) for v in values) and values[0] < values[1]):
                raise SpecError(f"space.{key}.{kind}: expected [low, high] numbers with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise SpecError(f"space.{key}.loguniform: needs low > 0, got {values[0]}")
            for v in values:
                _check(spec, {key: v}, f"space.{key}")
            if spec.search == "grid":
                raise SpecError(f"space.{key}: {kind} needs search: optuna (grid search takes grid/choice)")
    if spec.variants:
        if spec.search != "grid":
            raise SpecError("variants: only with search: grid")
        for i, v in enumerate(spec.variants):
            _check(spec, v, f"variants[{i}]")
    if spec.search == "optuna" and any(next(iter(d)) == "grid" for d in spec.space.values()):
        raise SpecError("space: optuna takes choice/uniform/loguniform/randint, not grid")
    if spec.preset not in (None, "auto"):
        from .config import PRESETS
        if spec.preset not in PRESETS:
            raise SpecError(f"preset: unknown value {spec.preset!r}; allowed: auto, {', '.join(PRESETS)}")
    # the metric must be reported by every trial (variants may change data set or extractors)
    cfgs = [_check(spec, v, "variants") for v in spec.variants] or [base_cfg]
    allowed = [m for m in reported_metrics(cfgs[0]) if all(m in reported_metrics(c) for c in cfgs[1:])]
    if spec.metric not in allowed:
        raise SpecError(f"metric: {spec.metric!r} is not reported by these trials; allowed: {', '.join(allowed)}")
    if spec.scheduler.type == "asha" and not base_cfg.eval.every:
        raise SpecError("scheduler.type: asha needs intermediate results; set base eval.every (steps)")


def check_resources(spec: SweepSpec) -> None:
    """What this machine (or the cluster at RAY_ADDRESS) can run: a GPU spec on a CPU-only machine
    would wait forever for a GPU, so it fails now instead."""
    if spec.resources.gpu > 0 and not os.environ.get("RAY_ADDRESS"):
        import torch
        if not torch.cuda.is_available():
            raise SpecError(f"resources.gpu: {spec.resources.gpu} GPUs per trial but this machine has none; "
                            "allowed: 0 (or set RAY_ADDRESS to a cluster with GPUs)")


def reported_metrics(cfg: TrialConfig) -> list[str]:
    """The evaluation metric names a trial with this config reports (harness.evaluate's naming)."""
    ks = range(1, cfg.eval.k + 1)
    names = ["drift_real"] + [f"idem_k{k}" for k in ks]
    if cfg.data.dataset in ("ring8", "moons"):
        names += [f"{m}_k{k}" for m in ("swd", "energy", "modes", "near_frac") for k in ks]
        return names
    for ext in cfg.eval.extractors:
        ms = ["fid", "kid", "precision", "recall"]
        if ext == "mnist":
            ms += ["is", "modes", "modes_entropy"]
        names += [f"{m}_{ext}_k{k}" for m in ms for k in ks]
    return names


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune
    space: dict[str, Any] = {}
    for key, dist in spec.space.items():
        kind, v = next(iter(dist.items()))
        space[key] = {"grid": tune.grid_search, "choice": tune.choice}.get(kind, lambda x: None)(v) \
            if kind in ("grid", "choice") else {"uniform": tune.uniform, "loguniform": tune.loguniform,
                                                 "randint": tune.randint}[kind](*v)
    if spec.variants:
        space["variant"] = tune.grid_search([json.dumps(v, sort_keys=True) for v in spec.variants])
    return space


def trial_overrides(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """Flat config overrides for one trial: base, then its variant, then its sampled axes."""
    over = dict(spec.base)
    if "variant" in config:
        over.update(json.loads(config["variant"]))
    over.update({k: v for k, v in config.items() if k != "variant"})
    return over


def swept_params(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The values that distinguish this trial (for run names and the live table)."""
    out = {k: v for k, v in config.items() if k != "variant"}
    if "variant" in config:
        variant = json.loads(config["variant"])
        out.update(variant or {"variant": "baseline"})  # the base config itself, named as such
    return out


def trainable(config: dict[str, Any], spec_json: str, sweep_dir: str) -> None:
    """The Ray trainable: build the config, run the trial, report dicts. Nothing else lives here."""
    import torch
    from ray import tune
    from .trial import run_trial
    spec = SweepSpec.model_validate_json(spec_json)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    cfg = build_config(trial_overrides(spec, config), preset=spec.preset)
    trial_id = tune.get_context().get_trial_id()
    import ray
    node = ray.get_runtime_context().get_node_id()  # recorded as a tag: where the trial ran
    out = Path(sweep_dir) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    # where this trial runs, for operators (and the fault-injection tests)
    (out / "worker.json").write_text(json.dumps({"pid": os.getpid(), "node_id": node}))
    # Every record is also appended to pending.jsonl until Ray has taken it, so that records the
    # driver never got (it or the trial died in between) are sent again when the trial resumes.
    pending = out / "pending.jsonl"
    buffer: list[dict[str, Any]] = []

    def send(m: dict[str, Any]) -> None:
        # Ray's searchers need the metric in every result, so losses are buffered and sent with the
        # next evaluation (as a JSON string: Ray's TensorBoard logger skips strings silently, whereas
        # a list makes it print the whole list as an "invalid value" warning); the MLflow callback
        # unpacks them into per-step metrics.
        tune.report({**m, "history": json.dumps(buffer), **(buffer[-1] if buffer else {}), "step": m["step"],
                     "node_id": node})
        buffer.clear()
        pending.write_text("")

    def report(m: dict[str, Any]) -> None:
        with open(pending, "a") as fh:
            fh.write(json.dumps(m, default=_plain) + "\n")
        if any(k.startswith("train/") for k in m):
            buffer.append(m)
        else:
            send(m)

    unsent = unsent_records(pending, out / "checkpoints")
    pending.write_text("".join(json.dumps(m, default=_plain) + "\n" for m in unsent))
    for m in unsent:
        if any(k.startswith("train/") for k in m):
            buffer.append(m)
        else:
            send(m)
    run_trial(cfg, out, report=report, progress=False)


def _plain(v: Any) -> Any:
    """JSON for numpy/torch scalars in a record (anything else as text)."""
    return v.item() if hasattr(v, "item") else str(v)


def unsent_records(pending: Path, ckpt_dir: Path) -> list[dict[str, Any]]:
    """Records a previous attempt of this trial reported but Ray never took, up to the step the
    trial resumes from (its newest checkpoint); later ones will be produced again."""
    from .checkpoint import checkpoint_step, list_checkpoints
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts or not pending.exists():
        return []
    resume = checkpoint_step(ckpts[-1])
    out = []
    for line in pending.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if int(m.get("step", 0)) <= resume:
            out.append(m)
    return out


def run_sweep(spec: SweepSpec, storage: Optional[Path] = None, fresh: bool = False,
              verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) a sweep; returns a summary dict (best trial, failures, where things are)."""
    import ray
    from ray import tune
    from .sweep_callbacks import MLflowCallback, LiveTable

    storage = Path(storage or os.environ.get("IGN_BENCH_STORAGE", DEFAULT_STORAGE)).resolve()
    sweep_dir = storage / spec.name
    started = time.time()
    _prepare(spec)  # classifier, Inception weights, reference features: once, before any trial
    if not ray.is_initialized():
        # No RAY_ADDRESS: always a private local instance ("local"), never a cluster that some
        # other `ray start` on this machine happens to be running.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=verbose > 1)
    fn = tune.with_resources(tune.with_parameters(trainable, spec_json=spec.model_dump_json(),
                                                  sweep_dir=str(sweep_dir)),
                             {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callbacks = [MLflowCallback(spec, sweep_dir), LiveTable(spec, sweep_dir=sweep_dir)]
    run_config = tune.RunConfig(name=spec.name, storage_path=str(storage), callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                verbose=0)
    if not fresh and tune.Tuner.can_restore(str(sweep_dir)):
        print(f"resuming sweep {spec.name} from {sweep_dir}", file=sys.stderr)
        tuner = tune.Tuner.restore(str(sweep_dir), fn, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(spec))
        # callbacks and the progress table are not part of the saved state: give them again
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tuner = tune.Tuner(fn, param_space=param_space(spec), tune_config=_tune_config(spec),
                           run_config=run_config)
    results = tuner.fit()
    return summarize(spec, results, callbacks[0], time.time() - started, sweep_dir)


def _tune_config(spec: SweepSpec):
    from ray import tune
    search_alg, scheduler = None, None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        import optuna
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0))
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler
        max_t = build_config(spec.base, preset=spec.preset).train.steps
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent)


def _prepare(spec: SweepSpec) -> None:
    """Build what every trial shares (digit classifier, Inception weights, reference features) once,
    in the driver, so parallel trials never compute them twice."""
    from . import evaluate
    if hasattr(evaluate, "prepare"):
        evaluate.prepare(build_config(spec.base, preset=spec.preset))


def summarize(spec, results, tracker_cb, wall_s: float, sweep_dir: Path) -> dict[str, Any]:
    rows, failed = [], []
    for r in results:
        tid = r.metrics.get("trial_id") if r.metrics else None
        tid = tid or Path(r.path).name
        if r.error is not None:
            failed.append({"trial_id": tid, "error": str(r.error).splitlines()[0][:200]})
        rows.append({"trial_id": tid, "metric": (r.metrics or {}).get(spec.metric), "config": r.config})
    done = [x for x in rows if isinstance(x["metric"], (int, float))]
    best = (min if spec.mode == "min" else max)(done, key=lambda x: x["metric"]) if done else None
    summary = {"sweep": spec.name, "trials": len(rows), "failed": failed, "wall_time_s": round(wall_s, 1),
               "metric": spec.metric, "mode": spec.mode, "sweep_dir": str(sweep_dir),
               "tracking_uri": tracker_cb.tracker.uri if tracker_cb.tracker else None}
    if best:
        tid = best["trial_id"]
        summary["best"] = {"trial_id": tid, spec.metric: best["metric"],
                           "params": swept_params(spec, best["config"]),
                           "run_id": tracker_cb.run_ids.get(tid),
                           "artifacts": str(sweep_dir / "trials" / tid)}
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nsweep {s['sweep']}: {s['trials']} trials, {len(s['failed'])} failed, {s['wall_time_s']:.0f} s")
    if "best" in s:
        b = s["best"]
        print(f"best trial {b['trial_id']}: {s['metric']} = {b[s['metric']]:.5g} ({s['mode']})")
        print(f"  params: {json.dumps(b['params'])}")
        print(f"  MLflow run: {b['run_id']} in experiment {s['sweep']!r} at {s['tracking_uri']}")
        print(f"  artifacts: {b['artifacts']}")
    for f in s["failed"]:
        print(f"FAILED {f['trial_id']}: {f['error']}")


def cmd_sweep(args) -> int:
    t = time.time()
    spec = load_spec(args.spec)
    if args.dry_run:
        print(json.dumps(spec.model_dump(), indent=2))
        return 0
    check_resources(spec)
    log.debug("spec validated in %.2f s", time.time() - t)
    summary = run_sweep(spec, storage=args.storage, fresh=args.fresh, verbose=2 if args.verbose else 1)
    print_summary(summary)
    out = Path(summary["sweep_dir"]) / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    return 1 if summary["failed"] else 0


def add_cli(sub) -> None:
    p = sub.add_parser("sweep", help="run (or resume) a sweep spec with Ray Tune, tracked in MLflow",
                       description="Run a sweep: SPEC is a name in sweeps/ (smoke, default, optuna, paper) "
                                   "or a YAML path. Running it again resumes an interrupted sweep. "
                                   "MLFLOW_TRACKING_URI and RAY_ADDRESS are respected.")
    p.add_argument("spec", nargs="?", default="default", help="sweep name or YAML path [default: default]")
    p.add_argument("--storage", help=f"Ray results folder [default: {DEFAULT_STORAGE}]")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--dry-run", action="store_true", help="validate and print the spec, run nothing")
    p.set_defaults(func=cmd_sweep)
