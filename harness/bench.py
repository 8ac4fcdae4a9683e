"""`ign-bench bench`: one run, one table (stdout and reports/bench.md).

What is measured, and how (every figure side by side in the same run):

- **Training throughput**: our `ign.train_step` against `paper_train_step`, a transcription of the
  paper's Source Code 1 (`f_copy.load_state_dict(f.state_dict())` every step, four forward
  passes), from the same weights, on the same batch, with the same LossConfig and optimizer, in
  the same process. The steps alternate (ours, paper, paper, ours, ...) so that load from other
  processes hits both alike; the figure is the median over the timed steps after warm-up.
- **Peak memory of a training step**: on CUDA `torch.cuda.max_memory_allocated` around one step;
  on CPU the peak growth of the resident anonymous memory (RssAnon, sampled by a thread) over one
  step, in a fresh process per loop (torch's CPU allocator has no peak counter).
- **Evaluation**: images/s through each feature extractor (harness.fidelity.extract, in memory,
  batched), and the wall time of `harness.evaluate.evaluate` at k = 1..3 with a cold and then a
  warm reference cache, in a fresh process whose cache dir (IGN_BENCH_CACHE) is a temporary folder
  holding links to the real extractor weights and digit classifier, so only the reference
  statistics are cold. The reference images that pass through an extractor are counted.
- **Sweep overhead**: `ign-bench sweep smoke` into a temporary storage and MLflow store; its wall
  time split into training and evaluation (the trials' own `train_time_s`, `eval_time_s` from
  final.json) and everything else, in trial-slot seconds (slots = the spec's max_concurrent).

Subprocesses get the glibc allocator settings of shared/notes/offline-inception.md (MALLOC_*),
as the Makefile exports them to `make bench` itself.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

from .paths import DEFAULT_CACHE, PROJECT_ROOT

# glibc's allocator settings from shared/notes/offline-inception.md (the Makefile exports the same).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}
BF16_LOSS_RTOL = 5e-2   # bf16 autocast may change each loss term (rec, idem, tight) by at most 5 % (relative)
DEFAULT_OUT = PROJECT_ROOT / "reports" / "bench.md"
RESULT_TAG = "BENCH_RESULT "  # the line a worker process prints its JSON result on

# Loss configs of the two training benchmarks: Source Code 1 verbatim (MNIST) and Table 1 (CelebA).
LOSSES = {
    "listing": {"lambda_rec": 1.0, "lambda_idem": 1.0, "lambda_tight": 0.1, "distance": "l2", "clamp_ratio": None},
    "table1": {},  # LossConfig defaults are Table 1: L1, λ = 20 / 20 / 2.5, clamp a = 1.5
}

# Sizes: the figures, and a --quick setting for tests and CI (seconds, not minutes).
SIZES = {
    "full": {
        "train": [("dcgan28", 256, "listing"), ("dcgan64", 64, "table1")],  # (model, batch, losses)
        "warmup": 1,               # untimed steps per loop before timing (allocations, oneDNN primitives)
        "repeats": 5,              # timed steps per loop; the median is reported
        "extract_n": {"mnist": 2000, "inception": 192},   # images per timed extraction
        "extract_repeats": 3,
        "eval_n": 250,             # generated (and reference) samples of the timed evaluation
        "eval_extractors": ["mnist", "inception"],
    },
    "quick": {
        "train": [("dcgan28", 16, "listing"), ("dcgan64", 4, "table1")],
        "warmup": 1,
        "repeats": 2,
        "extract_n": {"mnist": 256, "inception": 4},
        "extract_repeats": 1,
        "eval_n": 32,
        "eval_extractors": ["mnist"],
    },
}
TRAIN_TARGET = {"cpu": 1.2, "cuda": 2.0}   # ours / paper images/s for dcgan28, batch 256
INCEPTION_TARGET = 25.0                    # images/s on 2 CPU cores
OTHER_TARGET = 0.10                        # share of the smoke sweep that is neither training nor evaluation


# ---------------------------------------------------------------------------------------------
# The paper's training step, transcribed.

def paper_train_step(f, f_copy, opt, x, z, cfg, step: Optional[int] = None) -> dict[str, float]:
    """One iteration of Source Code 1 (lines 7-23), generalised only in what LossConfig sets: the
    distance D (the listing: MSE), the weights λ (the listing: 1, 1, 0.1), the smooth clamp of
    eq. 14 (the listing has none) and the linear λt warm-up. With LOSSES["listing"] it is the
    listing verbatim. f_copy is a separate module (the listing's argument), refreshed from f every
    step; as in the listing its parameters keep requires_grad, so backward also computes their
    (unused) gradients. Written independently of ign.losses on purpose: it is the reference."""
    import torch

    f_copy.load_state_dict(f.state_dict())
    fx = f(x)
    fz = f(z)
    f_z = fz.detach()
    ff_z = f(f_z)
    f_fz = f_copy(fz)

    def dist(a, b):  # per sample: mean over everything but the batch dimension
        e = a - b
        return (e.pow(2) if cfg.distance == "l2" else e.abs()).flatten(1).mean(1)

    loss_rec = dist(fx, x).mean()
    loss_idem = dist(f_fz, fz).mean()
    tight = -dist(ff_z, f_z)
    tight_raw = tight.mean()
    if cfg.clamp_ratio is not None:  # eq. 14: tanh(L / (a r)) a r, the reference r detached
        r = loss_rec.detach() if cfg.clamp_reference == "rec" else dist(f_z, z)
        tight = torch.tanh(tight / (cfg.clamp_ratio * r)) * (cfg.clamp_ratio * r)
    loss_tight = tight.mean()
    lambda_tight = cfg.lambda_tight
    if cfg.tight_warmup and step is not None:
        lambda_tight *= min(1.0, step / cfg.tight_warmup)

    loss = cfg.lambda_rec * loss_rec + cfg.lambda_idem * loss_idem + lambda_tight * loss_tight
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "rec": loss_rec.item(), "idem": loss_idem.item(), "tight": loss_tight.item(),
            "tight_raw": tight_raw.item()}


# ---------------------------------------------------------------------------------------------
# Training throughput and memory.

def _adam(f):
    import torch
    return torch.optim.Adam(f.parameters(), lr=1e-4, betas=(0.5, 0.999))  # Table 1


def _batch(model: str, batch: int, device, real: bool, seed: int = 0):
    """(x, z): a real batch in [-1, 1] (MNIST digits for dcgan28, CelebA-64 faces for dcgan64;
    random images when `real` is False or the data are missing) and z = randn_like(x) (line 4)."""
    import torch
    from .data import load_images, to_model_range
    shape = {"dcgan28": (1, 28, 28), "dcgan64": (3, 64, 64)}[model]
    x, source = None, "random"
    if real:
        name = "mnist-train" if model == "dcgan28" else "celeba64-train"
        try:
            x, source = to_model_range(load_images(name, batch, seed)), name
        except (FileNotFoundError, ValueError):
            pass
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.rand(batch, *shape, generator=g) * 2 - 1
    z = torch.randn(x.shape, generator=g)
    return x.to(device), z.to(device), source


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_runners(model: str, x, z, loss: str, device, variants: tuple[str, ...] = ()) -> dict[str, Callable]:
    """name -> step(i) for our train_step and the paper's loop (and optional variants of ours),
    each on its own copy of the same initial weights (seed 0) with its own Adam."""
    import torch
    from ign import LossConfig, build_model, train_step
    cfg = LossConfig(**LOSSES[loss])
    torch.manual_seed(0)
    f0 = build_model(model).to(device)

    def ours(f, xx, zz, ctx=nullcontext):
        opt = _adam(f)

        def run(i):
            with ctx():
                return train_step(f, opt, xx, zz, cfg, i)
        return run

    def paper(f):
        f_copy, opt = copy.deepcopy(f), _adam(f)
        return lambda i: paper_train_step(f, f_copy, opt, x, z, cfg, i)

    runners = {"ours": ours(copy.deepcopy(f0), x, z), "paper": paper(copy.deepcopy(f0))}
    for v in variants:
        if v == "channels_last":
            cl = torch.channels_last
            runners[v] = ours(copy.deepcopy(f0).to(memory_format=cl), x.contiguous(memory_format=cl),
                              z.contiguous(memory_format=cl))
        elif v == "compile":
            # our backward runs the outer f's graph twice (retain_graph), which AOTAutograd's donated
            # buffers forbid; its own error message names this switch
            import torch._functorch.config as functorch_config
            functorch_config.donated_buffer = False
            runners[v] = ours(torch.compile(copy.deepcopy(f0)), x, z)
        elif v == "bf16":
            runners[v] = ours(copy.deepcopy(f0), x, z,
                              lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        else:
            raise ValueError(f"--try: unknown variant {v!r}; allowed: channels_last, compile, bf16")
    return runners


def time_loops(runners: dict[str, Callable], batch: int, device, warmup: int, repeats: int) -> dict[str, dict]:
    """Interleaved timing: every round runs each loop once, the order reversed every other round.
    Returns name -> {images_per_s (median), median_s, times_s, first_s (the first, untimed step)}."""
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in names}
    first: dict[str, float] = {}
    for rnd in range(warmup + repeats):
        for k in (names if rnd % 2 == 0 else names[::-1]):
            _sync(device)
            t = time.perf_counter()
            runners[k](rnd)
            _sync(device)
            dt = time.perf_counter() - t
            if rnd < warmup:
                first.setdefault(k, dt)
            else:
                times[k].append(dt)
    out = {}
    for k in names:
        med = statistics.median(times[k])
        out[k] = {"images_per_s": batch / med, "median_s": med, "times_s": [round(t, 4) for t in times[k]],
                  "first_s": first.get(k)}
    return out


def cuda_peak_memory(runner: Callable, device) -> int:
    """Bytes allocated by torch above the level before one more step, at the step's peak."""
    import torch
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner(10_000)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _anon_rss_bytes() -> int:
    """Resident anonymous memory (heap and anonymous mappings: tensors), without the file-backed
    pages of the shared libraries, whose residency has nothing to do with the step."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("bench: /proc/self/status has no RssAnon (Linux only)")


def _memory_worker(p: dict) -> dict:
    """In a fresh process: build one loop, then the peak growth of its resident anonymous memory
    over one step, sampled every 0.2 ms by a thread (torch releases the GIL inside its kernels).
    With the MALLOC_* settings freed memory is not returned to the system either, so the level
    right after the step bounds the peak from below as well; the larger of the two is reported."""
    import threading
    import torch
    device = torch.device(p["device"])
    x, z, _ = _batch(p["model"], p["batch"], device, real=False)
    run = loop_runners(p["model"], x, z, p["loss"], device)[p["loop"]]
    before = _anon_rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss_bytes())
            time.sleep(0.0002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run(0)
    done.set()
    t.join()
    after = _anon_rss_bytes()
    return {"peak_bytes": max(peak[0], after) - before}


def bf16_loss_check(model: str, x, z, loss: str, device) -> dict:
    """Relative change of each loss term under bf16 autocast, from the same weights and batch."""
    import torch
    from ign import LossConfig, build_model
    from ign.losses import ign_losses_shared
    cfg = LossConfig(**LOSSES[loss])
    torch.manual_seed(0)
    f = build_model(model).to(device)
    ref, _ = ign_losses_shared(copy.deepcopy(f), x, z, cfg)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low, _ = ign_losses_shared(copy.deepcopy(f), x, z, cfg)
    rel = {k: abs(float(low[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-12) for k in ("rec", "idem", "tight")}
    return {"max_rel": max(rel.values()), "per_term": rel, "tol": BF16_LOSS_RTOL}


# ---------------------------------------------------------------------------------------------
# Evaluation (a worker process with a temporary reference cache).

def _eval_worker(p: dict) -> dict:
    """Extractor throughput, then evaluate() twice: cold reference cache, then warm."""
    import torch
    from . import fidelity
    from .config import build_config
    from .data import load_images
    from .evaluate import evaluate
    from .trial import build_trial

    device = torch.device(p["device"])
    out: dict[str, Any] = {"extract": {}}
    imgs = load_images("mnist-test", max(p["extract_n"].values()), seed=0)
    for name, n in p["extract_n"].items():
        fidelity.get_extractor(name, device)                        # build once (not timed)
        fidelity.extract(imgs[:min(n, fidelity.EXTRACT_BATCH)], name, device)  # warm-up batch
        ts = []
        for _ in range(p["extract_repeats"]):
            _sync(device)
            t = time.perf_counter()
            fidelity.extract(imgs[:n], name, device)
            _sync(device)
            ts.append(time.perf_counter() - t)
        out["extract"][name] = {"images_per_s": n / statistics.median(ts), "n": n}

    cfg = build_config({"data.dataset": "mnist", "eval.k": 3, "eval.n_samples": p["eval_n"],
                        "eval.extractors": p["eval_extractors"], "device": str(device)}, preset="mnist-code")
    data, f, _, noise = build_trial(cfg, device=device)
    passes = [0]
    f.register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    ref_images = [0]
    inner = fidelity.extract  # reference_features calls fidelity.extract; generated images do not

    def counting_extract(images, *a, **kw):
        ref_images[0] += len(images)
        return inner(images, *a, **kw)

    fidelity.extract = counting_extract
    runs = []
    for label in ("cold", "warm"):
        passes[0] = ref_images[0] = 0
        lines: list[str] = []
        t = time.perf_counter()
        m = evaluate(f, data, cfg, device=device, noise=noise, log=lines.append)
        runs.append({"label": label, "seconds": time.perf_counter() - t, "f_passes": passes[0],
                     "reference_images": ref_images[0], "log": lines, "metrics": m})
    fidelity.extract = inner
    cold, warm = runs
    same = all(cold["metrics"][k] == warm["metrics"][k] for k in cold["metrics"])
    for r in runs:
        r.pop("metrics")
    out["evaluate"] = {"cold": cold, "warm": warm, "identical_metrics": same, "n": p["eval_n"], "k": 3,
                       "extractors": p["eval_extractors"], "eval_batch": cfg.eval.batch_size}
    return out


def _cold_cache(tmp: Path) -> Path:
    """A cache dir with no reference statistics, linking the real extractor weights and digit
    classifier (built there on first use), so only the reference pass is cold."""
    cache = tmp / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for sub in ("inception", "classifier"):
        real = DEFAULT_CACHE / sub
        real.mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real, target_is_directory=True)
    return cache


# ---------------------------------------------------------------------------------------------
# Sweep overhead.

def sweep_overhead(tmp: Path, env: dict[str, str], spec_name: str = "smoke", timeout: int = 3600) -> dict:
    """Run the smoke sweep into temporary storage and MLflow store; split its wall time.

    Shares are of trial-slot seconds (wall time x the spec's max_concurrent): training and
    evaluation are the trials' own train_time_s and eval_time_s; everything else (interpreter and
    Ray start-up, trial scheduling and start, checkpoints, sample grids, MLflow logging, idle slots)
    is the rest. The rest is broken down further by the trials' file timestamps."""
    from .sweep import load_spec
    spec = load_spec(spec_name)
    storage = tmp / "ray"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "IGN_BENCH_STORAGE": str(storage)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", spec_name, "--storage", str(storage),
                           "--fresh"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    t1 = time.time()
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"sweep {spec_name} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return split_sweep_time(storage / spec.name, spec.max_concurrent, t0, t1)


def split_sweep_time(sweep_dir: Path, slots: int, t0: float, t1: float) -> dict:
    """The split of a finished sweep that ran from t0 to t1 (epoch seconds) with `slots` trials at
    once, from its trials' final.json (train_time_s, eval_time_s), the times config.json (trial
    start, after its data and model are built) and final.json (trial end) were written, and
    summary.json (run_sweep's own wall time)."""
    wall = t1 - t0
    trials = []
    for final in sorted((Path(sweep_dir) / "trials").glob("*/final.json")):
        d = json.loads(final.read_text())
        trials.append({"train": d["train_time_s"], "eval": d["eval_time_s"],
                       "start": (final.parent / "config.json").stat().st_mtime, "end": final.stat().st_mtime})
    if not trials:
        raise RuntimeError(f"sweep: no finished trials under {sweep_dir}")
    capacity = slots * wall
    train = sum(t["train"] for t in trials)
    ev = sum(t["eval"] for t in trials)
    summary = json.loads((Path(sweep_dir) / "summary.json").read_text())
    first_start = min(t["start"] for t in trials)
    last_end = max(t["end"] for t in trials)
    return {
        "wall_s": wall, "trials": len(trials), "slots": slots, "train_s": train, "eval_s": ev,
        "other_s": capacity - train - ev, "train_share": train / capacity, "eval_share": ev / capacity,
        "other_share": 1 - (train + ev) / capacity,
        "breakdown": {
            # interpreter, imports, spec, Ray start, trial actors, torch import, data and model
            "before_first_trial_s": first_start - t0,
            "cli_before_run_sweep_s": wall - summary["wall_time_s"],  # the part before run_sweep
            # checkpoints, sample grids, report calls (slot-seconds, summed over trials)
            "inside_trials_s": sum(t["end"] - t["start"] - t["train"] - t["eval"] for t in trials),
            "after_last_trial_s": t1 - last_end,  # last results, MLflow, summary, Ray shutdown
            "trial_span_s": last_end - first_start,
        },
    }


# ---------------------------------------------------------------------------------------------
# The run.

def _worker_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {**os.environ, **MALLOC_ENV, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _spawn(kind: str, params: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.bench", "worker", kind, json.dumps(params)],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen, what: str, timeout: int = 3600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = " | ".join(err.strip().splitlines()[-3:])
    raise RuntimeError(f"bench {what} worker failed (exit {proc.returncode}): {tail}")


def run_bench(quick: bool = False, device: str = "auto", skip_sweep: bool = False, skip_eval: bool = False,
              bf16: bool = False, variants: tuple[str, ...] = (), repeats: Optional[int] = None,
              sweep: str = "smoke", skip_train: bool = False, log: Callable[[str], None] = lambda m: None) -> dict:
    """Measure everything; returns a dict (rendered by `render`). See the module doc."""
    import torch
    from .config import resolve_device
    dev = resolve_device(device)
    size = dict(SIZES["quick" if quick else "full"])
    if repeats:
        size["repeats"] = repeats
    res: dict[str, Any] = {
        "quick": quick, "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "malloc_env_in_process": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
        "train": [],
    }
    variants = tuple(variants) + (("bf16",) if bf16 else ())
    for model, batch, loss in ([] if skip_train else size["train"]):
        log(f"bench: training {model} batch {batch} ({loss} losses): ours vs the paper's loop")
        x, z, source = _batch(model, batch, dev, real=not quick)
        runners = loop_runners(model, x, z, loss, dev, variants)
        timing = time_loops(runners, batch, dev, size["warmup"], size["repeats"])
        row = {"model": model, "batch": batch, "loss": loss, "data": source, "timing": timing,
               "ratio": timing["ours"]["images_per_s"] / timing["paper"]["images_per_s"]}
        if dev.type == "cuda":
            row["memory"] = {k: {"peak_bytes": cuda_peak_memory(r, dev)} for k, r in runners.items()}
        if bf16:
            row["bf16"] = bf16_loss_check(model, x, z, loss, dev)
        del runners
        res["train"].append(row)

    tmp_root = Path(tempfile.mkdtemp(prefix="ign-bench-"))
    procs: dict[str, subprocess.Popen] = {}
    if dev.type != "cuda" and res["train"]:  # CPU peak memory: one fresh process per loop
        log("bench: peak memory (one process per loop)")
        for row in res["train"]:
            row["memory"] = {}
            for loop in ("ours", "paper"):
                params = {"model": row["model"], "batch": row["batch"], "loss": row["loss"], "loop": loop,
                          "device": str(dev)}
                p = _spawn("memory", params, _worker_env())
                if quick:  # tiny steps: start-up dominates, so run the workers side by side
                    procs[f"memory:{row['model']}:{loop}"] = p
                else:
                    row["memory"][loop] = _collect(p, "memory")
    if not skip_eval:
        log("bench: evaluation (extractors, evaluate with a cold then warm reference cache)")
        cache = _cold_cache(tmp_root)
        params = {k: size[k] for k in ("extract_n", "extract_repeats", "eval_n", "eval_extractors")}
        params["device"] = str(dev)
        procs["eval"] = _spawn("eval", params, _worker_env({"IGN_BENCH_CACHE": str(cache)}))
    for key, p in procs.items():
        r = _collect(p, key.split(":")[0])
        if key == "eval":
            res["eval"] = r
        else:
            _, model, loop = key.split(":")
            next(row for row in res["train"] if row["model"] == model)["memory"][loop] = r
    if not skip_sweep:
        log(f"bench: sweep {sweep} (Ray + MLflow into a temporary folder)")
        res["sweep"] = {**sweep_overhead(tmp_root / "sweep", _worker_env(), sweep), "spec": sweep}
    res["load_end"] = os.getloadavg()
    return res


# ---------------------------------------------------------------------------------------------
# The table.

def _mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(res: dict) -> str:
    """One markdown table (with a short header) from run_bench's dict."""
    on_cuda = res["device"].startswith("cuda")
    lines = [
        "# ign-bench bench" + (" (--quick: sizes for tests, not the issue's figures)" if res["quick"] else ""),
        "",
        f"{res['started']} · device {res['device']} · torch {res['torch']} · {res['threads']} threads on "
        f"{res['cores']} cores · load average {res['load_start'][0]:.2f} at start, {res['load_end'][0]:.2f} at end · "
        f"MALLOC_* settings in the bench process: {'yes' if res['malloc_env_in_process'] else 'no'} (workers: yes)",
        "",
        "| section | measurement | ours | paper's loop | ratio or share | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in res["train"]:
        t = row["timing"]
        sec = f"train {row['model']} batch {row['batch']}"
        n = len(t["ours"]["times_s"])
        target = ""
        if row["model"] == "dcgan28" and row["batch"] == 256:
            need = TRAIN_TARGET["cuda" if on_cuda else "cpu"]
            target = f"≥ {need:g}×: {_check(row['ratio'] >= need)}"
        lines.append(f"| {sec} | images/s, median of {n} steps ({row['loss']} losses, {row['data']} data) | "
                     f"{t['ours']['images_per_s']:.1f} | {t['paper']['images_per_s']:.1f} | {row['ratio']:.2f}× | {target} |")
        for v in [k for k in t if k not in ("ours", "paper")]:
            r = t[v]["images_per_s"] / t["ours"]["images_per_s"]
            first = t[v]["first_s"]
            lines.append(f"| {sec} | images/s, ours with {v} (first step {first:.1f} s) | {t[v]['images_per_s']:.1f} | | "
                         f"{r:.2f}× of ours | |")
        mem = row.get("memory", {})
        if "ours" in mem and "paper" in mem:
            how = "torch.cuda.max_memory_allocated" if on_cuda else "peak growth of resident anonymous memory over one step"
            o, p = mem["ours"], mem["paper"]
            lines.append(f"| {sec} | peak memory ({how}) | "
                         f"{_mib(o['peak_bytes'])} | {_mib(p['peak_bytes'])} | "
                         f"{o['peak_bytes'] / max(p['peak_bytes'], 1):.2f}× | |")
        if "bf16" in row:
            b = row["bf16"]
            lines.append(f"| {sec} | bf16 autocast: largest relative change of rec, idem, tight | {b['max_rel']:.2g} | | | "
                         f"≤ {b['tol']:g}: {_check(b['max_rel'] <= b['tol'])} |")
    if "eval" in res:
        e = res["eval"]
        for name, x in e["extract"].items():
            target = f"≥ {INCEPTION_TARGET:g}: {_check(x['images_per_s'] >= INCEPTION_TARGET)}" \
                if name == "inception" and not on_cuda else ""
            lines.append(f"| evaluation | {name} features, images/s ({x['n']} MNIST digits, batch 64) | "
                         f"{x['images_per_s']:.1f} | | | {target} |")
        ev = e["evaluate"]
        what = f"evaluate k=1..{ev['k']}, {ev['n']} samples, {'+'.join(ev['extractors'])}"
        for label in ("cold", "warm"):
            r = ev[label]
            detail = (f"{r['seconds']:.1f} s; reference images extracted: {r['reference_images']}; "
                      f"forward passes of f: {r['f_passes']}")
            target = ""
            if label == "warm":
                ok = r["reference_images"] == 0 and ev["identical_metrics"]
                target = f"reference pass skipped, same metrics: {_check(ok)}"
            share = f"{r['seconds'] / ev['cold']['seconds']:.2f}× of cold" if label == "warm" else ""
            lines.append(f"| evaluation | {what}, {label} reference cache | {detail} | | {share} | {target} |")
    if "sweep" in res:
        s = res["sweep"]
        b = s["breakdown"]
        sec = f"sweep {s.get('spec', 'smoke')}"
        lines.append(f"| {sec} | wall time ({s['trials']} trials, {s['slots']} slots) | {s['wall_s']:.1f} s | | | |")
        lines.append(f"| {sec} | training (Σ train_time_s) | {s['train_s']:.1f} slot-s | | {s['train_share']:.0%} | |")
        lines.append(f"| {sec} | evaluation (Σ eval_time_s) | {s['eval_s']:.1f} slot-s | | {s['eval_share']:.0%} | |")
        lines.append(f"| {sec} | everything else: start-up to first trial {b['before_first_trial_s']:.1f} s "
                     f"(CLI imports {b['cli_before_run_sweep_s']:.1f} s), inside trials {b['inside_trials_s']:.1f} slot-s, "
                     f"after last trial {b['after_last_trial_s']:.1f} s | {s['other_s']:.1f} slot-s | | "
                     f"{s['other_share']:.0%} | ≤ {OTHER_TARGET:.0%}: {_check(s['other_share'] <= OTHER_TARGET)} |")
    return "\n".join(lines) + "\n"


def cmd_bench(args: argparse.Namespace) -> int:
    variants = tuple(v for v in (args.try_ or "").split(",") if v)
    res = run_bench(quick=args.quick, device=args.device, skip_sweep=args.skip_sweep, skip_eval=args.skip_eval,
                    bf16=args.bf16, variants=variants, repeats=args.repeats, sweep=args.sweep,
                    skip_train=args.skip_train,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    table = render(res)
    print(table, end="")
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(f"written: {out}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    """Register `bench [--quick] [--device] [--skip-sweep] [--skip-eval] [--bf16] [--try V,..] [--out]`."""
    p = subparsers.add_parser(
        "bench", help="training, evaluation and sweep speed: ours vs the paper's loop, one table",
        description="Measure training throughput of train_step against the paper's Source Code 1 (same weights, "
                    "batch and losses, interleaved in one process), peak memory, feature-extractor throughput, "
                    "evaluation with a cold and warm reference cache, and the smoke sweep's overhead. Prints one "
                    f"markdown table and writes it to {DEFAULT_OUT.relative_to(PROJECT_ROOT)}.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; tests and CI), not the issue's figures")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N [default: auto]")
    p.add_argument("--skip-sweep", action="store_true", help="do not run the sweep (see --sweep)")
    p.add_argument("--skip-eval", action="store_true", help="do not measure evaluation")
    p.add_argument("--skip-train", action="store_true", help="do not measure training steps or their memory")
    p.add_argument("--sweep", default="smoke", metavar="SPEC",
                   help="the sweep whose wall time is split into training, evaluation and the rest [default: smoke]")
    p.add_argument("--bf16", action="store_true",
                   help=f"also time our step under bf16 autocast and check each loss term moves ≤ {BF16_LOSS_RTOL:g} (relative)")
    p.add_argument("--try", dest="try_", metavar="V[,V]",
                   help="extra variants of our step to time: channels_last, compile (CPU: both measured slower, see the report)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per loop [default: 5, quick: 2]")
    p.add_argument("--out", help=f"markdown file [default: {DEFAULT_OUT.relative_to(PROJECT_ROOT)}]")
    p.add_argument("--json", help="also write every raw figure to this JSON file")
    p.set_defaults(func=cmd_bench)


def _worker_main(argv: list[str]) -> int:
    kind, params = argv[1], json.loads(argv[2])
    fn = {"memory": _memory_worker, "eval": _eval_worker}[kind]
    print(RESULT_TAG + json.dumps(fn(params)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
