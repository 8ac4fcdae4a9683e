"""One trial: train f with IGN, evaluate it at f^1..f^K, checkpoint, and report through a callable.

`run_trial(cfg, out_dir, report)` is the whole trial. `report(dict)` is the only sink: Ray's
`tune.report` in a sweep, MLflow + a JSON-lines file from the CLI, a list in tests (STYLE §9).
Resuming means running the same thing again: the newest good checkpoint in `out_dir` is loaded and
the data order and noise continue exactly, because both are pure functions of (seed, step).
"""
from __future__ import annotations

import functools
import json
import math
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ign import build_model, train_step

from .checkpoint import load_latest, save_checkpoint
from .config import TrialConfig, resolve_device
from .data import Data, load_dataset

log = logging.getLogger(__name__)
Report = Callable[[dict[str, Any]], None]


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at `step`: epochs are seeded permutations with the tail dropped, so the
    batch is a pure function of (seed, step) and a resumed run sees exactly the same data."""
    if batch_size > n:  # tiny data (smoke runs): sample with replacement
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, n, (batch_size,), generator=g)
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return _epoch_perm(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def lr_at(cfg: TrialConfig, step: int) -> float:
    """The learning rate at `step`: a pure function of the step (nanoGPT's get_lr)."""
    if cfg.optim.schedule == "cosine":
        return cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * min(step, cfg.train.steps) / cfg.train.steps))
    return cfg.optim.lr


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 2 + 1)
    return g


def build_trial(cfg: TrialConfig, data: Optional[Data] = None, device: Optional[torch.device] = None):
    """Data, model, optimizer and noise source for a config (no training, no I/O besides data)."""
    from .evaluate import make_noise  # the evaluation noise and the training noise are one source
    device = device or cfg.resolved_device()
    if data is None:
        data = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.image_size, cfg.seed)
        if cfg.data.limit:
            data.train = data.train[:cfg.data.limit]
            if data.train_labels is not None:
                data.train_labels = data.train_labels[:cfg.data.limit]
    seed_all(cfg.seed)
    f = build_model(cfg.model_name(), **shape_kwargs(cfg, data), **cfg.model_kwargs()).to(device)
    check_shape(f, data)
    opt = torch.optim.Adam(f.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    noise = make_noise(cfg, data, device)
    return data, f, opt, noise


def shape_kwargs(cfg: TrialConfig, data: Data) -> dict[str, int]:
    if cfg.model_name() == "mlp2d":
        return {"dim": data.shape[0]}
    return {"channels": data.shape[0]}


def check_shape(f: torch.nn.Module, data: Data) -> None:
    want = tuple(getattr(f, "shape", data.shape))
    if want != data.shape:
        raise ValueError(f"model.name: {type(f).__name__} maps {want} but the data are {data.shape}; "
                         "allowed: dcgan28 for 28x28, dcgan64 for 64x64, mlp2d for 2-D points")


def run_trial(cfg: TrialConfig, out_dir: str | Path, report: Optional[Report] = None,
              progress: bool = True, data: Optional[Data] = None,
              should_stop: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Train (or resume) one trial in `out_dir` and return its final evaluation metrics.

    Args:
        cfg: the resolved trial config (saved in every checkpoint and as out_dir/config.json).
        out_dir: the trial's folder: checkpoints/, samples/ and metrics.jsonl live here.
        report: called with {"step": s, ...} for losses every `train.log_every` steps and with
            evaluation metrics (`eval/...`-free names, see harness.evaluate) at evaluation points.
        progress: show a tqdm bar.
        data: an already loaded data set (tests, sweeps that share it).
    Returns the last evaluation's metrics plus `step`, `train_time_s`, `eval_time_s`.
    """
    from tqdm import tqdm
    from .evaluate import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.resolved_device()
    data, f, opt, noise = build_trial(cfg, data, device)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    report = report or (lambda m: None)

    start = 0
    ck = load_latest(out / "checkpoints", map_location=device)
    if ck is not None:
        if _trajectory(ck["config"]) != cfg.run_key():
            raise ValueError(f"out_dir: {out} holds a run with a different config; use another --out")
        f.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["step"]
        log.info("resumed from %s at step %d", ck["path"], start)

    def checkpoint(step: int) -> None:
        save_checkpoint(out / "checkpoints", step, {
            "model": f.state_dict(), "optimizer": opt.state_dict(),
            "config": cfg.model_dump(mode="json"), "shape": list(data.shape), "dataset": data.name})

    def run_eval(step: int, final: bool = False) -> dict[str, Any]:
        t = time.perf_counter()
        metrics = evaluate(f, data, cfg, device=device, noise=noise)
        if final and cfg.eval.project:  # the global-projector measures: once, at the end
            from .project import project, projection_metrics
            metrics.update(projection_metrics(project(f, data, cfg, tasks=cfg.eval.project, k=cfg.eval.k,
                                                      n=cfg.eval.project_n, device=device)))
        metrics["eval_time_s"] = time.perf_counter() - t
        metrics["device"] = str(device)
        if "mnist" in cfg.eval.extractors:
            from .fidelity import extractor_hash
            metrics["mnist_weights"] = extractor_hash("mnist")
        report({"step": step, **metrics})
        return metrics

    n, bs = len(data.train), cfg.train.batch_size
    train_time, eval_time, last, done = 0.0, 0.0, {}, start
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=not progress,
               desc=f"train {cfg.data.dataset}", dynamic_ncols=True)
    for step in bar:
        t = time.perf_counter()
        x = data.batch(batch_indices(n, bs, cfg.seed, step), device=device)
        z = noise.sample(bs, batch=x, generator=step_generator(cfg.seed, step, device))
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        losses = train_step(f, opt, x, z, cfg.loss, step)
        train_time += time.perf_counter() - t
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            report({"step": done, **{f"train/{k}": v for k, v in losses.items()}})
            bar.set_postfix({k: f"{losses[k]:.4f}" for k in ("rec", "idem", "tight")}, refresh=False)
        if done % cfg.train.ckpt_every == 0 and done != cfg.train.steps:
            checkpoint(done)
        if cfg.eval.every and done % cfg.eval.every == 0 and done != cfg.train.steps:
            last = run_eval(done)
            eval_time += last["eval_time_s"]
        if should_stop is not None and should_stop():
            break
    bar.close()
    final_step = done
    checkpoint(final_step)
    last = run_eval(final_step, final=True)
    eval_time += last["eval_time_s"]
    save_samples(f, noise, data, cfg, out / "samples", device)
    final = {**last, "step": final_step, "train_time_s": train_time, "eval_time_s": eval_time}
    (out / "final.json").write_text(json.dumps(final, indent=2))
    return final


def _trajectory(cfg_json: dict) -> str:
    return TrialConfig.model_validate(cfg_json).run_key()


@torch.no_grad()
def save_samples(f, noise, data: Data, cfg: TrialConfig, folder: Path, device) -> list[Path]:
    """PNG grids of f^1..f^K(z) for fixed noise (one per k, plus z, f(z), ..., f^K(z) in rows).
    Toy data: a scatter plot of the data and f^k(z)."""
    from .evaluate import generate_k
    n = cfg.eval.grid
    if n == 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(cfg.eval.seed)
    z = noise.sample(max(n, 2), generator=g)
    outs = generate_k(f, z, cfg.eval.k, cfg.eval.bn_mode if cfg.eval.bn_mode != "both" else "train",
                      cfg.eval.batch_size)
    if not data.is_image:
        return [plot_toy(data, z, outs, folder / "samples_k.png")]
    from torchvision.utils import save_image
    paths = []
    nrow = int(round(n ** 0.5))
    for k, y in enumerate(outs, 1):
        p = folder / f"samples_k{k}.png"
        save_image((y[:n].cpu() + 1) / 2, p, nrow=nrow, padding=1, pad_value=1.0)
        paths.append(p)
    cols = min(n, 16)  # rows: z, f(z), f²(z), ... for the same 16 noise samples (paper Figs. 4, 7, 8)
    rows = torch.cat([z[:cols].clamp(-1, 1)] + [y[:cols] for y in outs])
    p = folder / "samples_k.png"
    save_image((rows.cpu() + 1) / 2, p, nrow=cols, padding=1, pad_value=1.0)
    paths.append(p)
    return paths


def plot_toy(data: Data, z: torch.Tensor, outs: list[torch.Tensor], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("z", z)] + [(f"f^{k}(z)" if k > 1 else "f(z)", y) for k, y in enumerate(outs, 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), sharex=True, sharey=True)
    ref = data.test[:2000]
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8", label="data")
        p = pts.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=2, c="C3", label=title)
        ax.set_title(title)
        ax.set_xlabel("x1")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
    axes[0].set_ylabel("x2")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_trained(path: str | Path, device=None) -> tuple[torch.nn.Module, TrialConfig, dict[str, Any]]:
    """A trained model from a checkpoint file or run folder: (f in eval-ready state, its config,
    the raw checkpoint dict). The model is rebuilt from the config saved inside the checkpoint."""
    from .checkpoint import read_checkpoint, resolve_checkpoint
    ck = read_checkpoint(resolve_checkpoint(path), map_location="cpu")
    cfg = TrialConfig.model_validate(ck["config"])
    device = torch.device(device) if device is not None else resolve_device("auto")
    shape = tuple(ck.get("shape") or ())
    kw = {"dim": shape[0]} if cfg.model_name() == "mlp2d" else {"channels": shape[0]}
    f = build_model(cfg.model_name(), **kw, **cfg.model_kwargs())
    f.load_state_dict(ck["model"])
    return f.to(device), cfg, ck
