"""The "global projector", measured (paper §4): zero-shot projection of degraded images, and the
latent-space operations, quantified at every k.

Projection. Held-out real test images x are degraded with the appendix-C degradations (noise
σ = 0.15, grayscale, sketch; and the noise box of Fig. 9, `mask`) into y, then projected with
f^1..f^K. Each is compared with two baselines: the degraded input itself (`k0`, "identity") and one
classical method per task (BASELINES). Every measure is a flat key

    proj_<task>_<measure>_<method>      method: k0 (the degraded input), k1..kK (IGN f^k(y)),
                                        base (the task's classical baseline)
    proj_clean_<measure>_real           the clean held-out images (the floor for fid/kid/drift/acc)

with measure in MEASURES:
    psnr, ssim  against the clean image, both in [0, 1] (model range [-1, 1] clamped, then mapped);
                SSIM is Wang et al. (2004): 11x11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
                no padding, averaged over channels; both are means over images.
    drift       δ(u) = D(f(u), u) of the image u that the row shows (D = cfg.loss.distance, mean per
                sample): for k0 the degraded input as fed to f, for kK f^K(y), i.e. D(f^(K+1)(y), f^K(y)).
                Small = f treats u as already on its manifold.
    fid, kid    of the set against the training split (fidelity.reference_features; extractor
                "mnist" for 1x28x28 digits, "inception" otherwise).
    acc         (1x28x28 digits only) the cached digit classifier's accuracy against the true labels.
All images a row is measured on are what a saved PNG would show: clamped to [-1, 1]; f itself is fed
the degraded input unclipped, as in the paper.

Latent operations. `interpolation_smoothness`: for paths f^k(interp(z0, z1)), the distances between
consecutive frames in feature space, relative to the uniform step (end-point distance / (frames-1)):
the mean is path length / chord (1 = a straight, evenly paced path), the max the largest jump.
`latent_arithmetic` (CelebA): the fraction of edits f^k(z_pos - z_neg + z) that a small Eyeglasses
classifier (trained once on the celeba64 training split, cached, held-out accuracy recorded) judges
to wear eyeglasses, against the same judge's rate on f^k(z).

f is never changed: every forward pass goes through harness.evaluate.generate_k (see `isolated`).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from ign.degrade import DEGRADATIONS, degrade, random_box
from ign.losses import per_sample_distance
from ign.sampling import interpolate

from .config import TrialConfig
from .data import CELEBA_SPLITS, DEFAULT_CACHE, DEFAULT_DATA_ROOT, Data, list_images, to_model_range, to_uint8

TASKS = tuple(DEGRADATIONS)                              # noise, grayscale, sketch, mask
MEASURES = ("psnr", "ssim", "drift", "fid", "kid", "acc")
DEFAULTS = {
    "k": 3,                 # project with f^1 .. f^k
    "n_cpu_mnist": 1000,    # held-out images per task on CPU with the digit extractor (it is fast)
    "n_cpu_inception": 200, # ... with Inception on CPU (~20 images/s on 2 cores; FID is biased high at this n)
    "n_gpu": 5000,          # ... on a GPU (capped at the test split's size)
    "seed": 0,              # seeds the degradations (noise, mask boxes and fills)
    "ssim_window": 11,      # Wang et al. 2004
    "ssim_sigma": 1.5,
    "interp_paths": 16,     # interpolation paths
    "interp_frames": 10,    # frames per path, end points included
    "arith_pool": 256,      # noise samples whose f(z) are labelled by their nearest training face
    "arith_n": 256,         # edits f(z_pos - z_neg + z)
}
PIXEL_EPS = 1e-10           # MSE floor: identical images give PSNR 100 dB, not inf


# ---------------------------------------------------------------------------------------------
# Image measures (pure; images in model range [-1, 1], (N, C, H, W)).

def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model range -> [0, 1], clamped (what a saved image shows), float64 for the measures."""
    return ((x.detach().double().clamp(-1, 1) + 1) / 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of a against b (both [-1, 1]; compared in [0, 1], peak 1)."""
    mse = (to_unit(a) - to_unit(b)).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(PIXEL_EPS))


def gaussian_window(size: int = DEFAULTS["ssim_window"], sigma: float = DEFAULTS["ssim_sigma"]) -> torch.Tensor:
    """(size, size) Gaussian window summing to 1, float64."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = DEFAULTS["ssim_window"],
         sigma: float = DEFAULTS["ssim_sigma"]) -> torch.Tensor:
    """Per-image SSIM of a against b (both [-1, 1]; compared in [0, 1], data range 1).

    Wang et al. (2004): Gaussian-weighted local statistics (population, not sample, covariance),
    C1 = (0.01)^2, C2 = (0.03)^2, the SSIM map over the valid region (no padding), averaged over
    pixels and channels."""
    x, y = to_unit(a), to_unit(b)
    c = x.shape[1]
    if min(x.shape[2:]) < size:
        raise ValueError(f"images: SSIM needs at least {size}x{size} pixels, got {tuple(x.shape[2:])}")
    w = gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Classical baselines, one per task: (name, fn(y, ctx) -> image in [-1, 1]).
# ctx: `mean` = the training mean image (1, C, H, W) in [-1, 1]; `boxes` = the mask boxes.

BLUR_KERNEL, BLUR_SIGMA = 3, 0.5   # noise/sketch baseline; σ = 0.5 beat 0.7 and 1.0 on MNIST test PSNR
HARMONIC_ITERS = 400               # Jacobi sweeps of the Laplace fill (converged for a 26x26 box)


def _blur(y: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Gaussian blur (3x3, σ = 0.5) of the clamped image."""
    return gaussian_blur(y.clamp(-1, 1), [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])


def _mean_chroma(y: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Colourise a grayscale image with the training set's mean colour: g(x) + (μ − mean_c μ),
    μ the per-pixel, per-channel training mean. Channel replication plus the average chroma; on
    1-channel data the offset is 0, so this is the degraded input itself (= identity)."""
    mu = ctx["mean"].to(y)
    return (y + (mu - mu.mean(1, keepdim=True))).clamp(-1, 1)


def _harmonic_fill(y: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Inpaint each image's box by harmonic (Laplace) interpolation from the pixels around it:
    start from the mean of the surrounding ring, then Jacobi sweeps of the 4-neighbour average."""
    out = y.clamp(-1, 1).clone()
    n, c, h, w = out.shape
    inside = torch.zeros(n, 1, h, w, dtype=torch.bool, device=y.device)
    for i, (t, l, bh, bw) in enumerate(ctx["boxes"]):
        inside[i, :, t:t + bh, l:l + bw] = True
        ring = out[i, :, max(t - 1, 0):t + bh + 1, max(l - 1, 0):l + bw + 1]
        ring_mask = ~inside[i, 0, max(t - 1, 0):t + bh + 1, max(l - 1, 0):l + bw + 1]
        fill = ring[:, ring_mask].mean(1) if ring_mask.any() else torch.zeros(c, device=y.device)
        out[i, :, t:t + bh, l:l + bw] = fill.view(c, 1, 1)
    k = torch.tensor([[0, .25, 0], [.25, 0, .25], [0, .25, 0]], dtype=out.dtype, device=y.device)
    k = k.expand(c, 1, 3, 3)
    for _ in range(HARMONIC_ITERS):
        avg = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        out = torch.where(inside, avg, out)
    return out


BASELINES: dict[str, tuple[str, Callable[[torch.Tensor, dict], torch.Tensor]]] = {
    "noise": ("gblur", _blur),
    "grayscale": ("meanchroma", _mean_chroma),
    "sketch": ("gblur", _blur),
    "mask": ("harmonic", _harmonic_fill),
}


def register_baseline(task: str, name: str, fn: Callable[[torch.Tensor, dict], torch.Tensor]) -> None:
    """The classical baseline for a (newly registered) degradation."""
    BASELINES[task] = (name, fn)


# ---------------------------------------------------------------------------------------------
# Degrade and project.

def parse_tasks(tasks: Optional[Sequence[str] | str]) -> tuple[str, ...]:
    """Task names from a sequence or comma list (None/empty = all), in order, without repeats.
    Raises ValueError (one line) on an unknown name."""
    if tasks is None:
        return TASKS
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in items:
        for t in str(item).split(","):
            t = t.strip()
            if not t:
                continue
            if t not in DEGRADATIONS:
                raise ValueError(f"task: unknown value {t!r}; allowed: {', '.join(DEGRADATIONS)}")
            if t not in out:
                out.append(t)
    return tuple(out) or TASKS


def degrade_set(task: str, x: torch.Tensor, seed: int = DEFAULTS["seed"]) -> tuple[torch.Tensor, dict]:
    """(degraded y, ctx) for clean x in [-1, 1] on the CPU, seeded. `mask` draws one box per image
    (ign.degrade.mask draws one per call) and returns them in ctx["boxes"] for the baseline."""
    g = torch.Generator().manual_seed(seed * 7919 + TASKS.index(task) if task in TASKS else seed)
    if task != "mask":
        return degrade(task, x, generator=g), {}
    h, w = x.shape[2:]
    boxes, out = [], []
    for i in range(len(x)):
        box = random_box(h, w, generator=g)
        boxes.append(box)
        out.append(degrade("mask", x[i:i + 1], generator=g, box=box))
    return torch.cat(out), {"boxes": boxes}


def _check_shape(f: nn.Module, data: Data) -> None:
    if not data.is_image:
        raise ValueError(f"data: projection needs image data; {data.name} is {data.shape[0]}-D points")
    want = tuple(getattr(f, "shape", data.shape))
    if want != tuple(data.shape):
        raise ValueError(f"checkpoint: the model maps {'x'.join(map(str, want))} but {data.name} images are "
                         f"{'x'.join(map(str, data.shape))}")


def default_n(data: Data, device, extractor: str) -> int:
    """DEFAULTS' sample count for the device and extractor, capped at the test split."""
    if torch.device(device).type == "cuda":
        n = DEFAULTS["n_gpu"]
    else:
        n = DEFAULTS["n_cpu_mnist"] if extractor == "mnist" else DEFAULTS["n_cpu_inception"]
    return min(n, len(data.test))


def default_extractor(data: Data) -> str:
    return "mnist" if tuple(data.shape) == (1, 28, 28) else "inception"


def _bn_modes(cfg: TrialConfig, bn_mode: Optional[str]) -> list[tuple[str, str]]:
    """[(mode, key suffix)]: "both" gives batch statistics unsuffixed and running ones `_bneval`."""
    mode = bn_mode or cfg.eval.bn_mode
    if mode == "both":
        return [("train", ""), ("eval", "_bneval")]
    if mode not in ("train", "eval"):
        raise ValueError(f"bn_mode: unknown value {mode!r}; allowed: train, eval, both")
    return [(mode, "")]


@torch.no_grad()
def projections(f: nn.Module, data: Data, task: str, k: int, n: int, device=None, bn_mode: str = "train",
                seed: int = DEFAULTS["seed"], batch_size: Optional[int] = None,
                mean_image: Optional[torch.Tensor] = None) -> dict:
    """The images of one task: the first n test images, degraded, projected and baselined.

    Returns a dict of tensors on `device`: `clean` x, `degraded` y (unclipped, as fed to f),
    `outs` [f(y), ..., f^(k+1)(y)] (one past k for the drift of f^k), `base` (the classical
    baseline), `f_base` f(base); `labels` (or None); `baseline` (its name)."""
    from .evaluate import generate_k
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    device = torch.device(device) if device is not None else next(f.parameters()).device
    x = to_model_range(data.test[:n])
    y, ctx = degrade_set(task, x, seed)
    ctx["mean"] = mean_image if mean_image is not None else training_mean(data)
    name, fn = BASELINES[task]
    base = fn(y, ctx)
    x, y, base = x.to(device), y.to(device), base.to(device)
    outs = generate_k(f, y, k + 1, bn_mode, batch_size)
    f_base = generate_k(f, base, 1, bn_mode, batch_size)[0]
    labels = data.test_labels[:n] if data.test_labels is not None else None
    return {"clean": x, "degraded": y, "outs": outs, "base": base, "f_base": f_base,
            "labels": labels, "baseline": name}


def training_mean(data: Data, limit: int = 20000) -> torch.Tensor:
    """The mean training image (1, C, H, W) in [-1, 1], over the first `limit` images."""
    return to_model_range(data.train[:limit]).mean(0, keepdim=True)


def _shown(u: torch.Tensor) -> torch.Tensor:
    return u.clamp(-1, 1)


def project(f: nn.Module, data: Data, cfg: TrialConfig, tasks: Optional[Sequence[str] | str] = TASKS,
            k: int = DEFAULTS["k"], n: Optional[int] = None, device=None, extractor: Optional[str] = None,
            n_reference: Optional[int] = None, bn_mode: Optional[str] = None, seed: int = DEFAULTS["seed"],
            fid: bool = True, log: Optional[Callable[[str], None]] = None) -> dict:
    """Project degraded held-out images with f^1..f^k and measure them against the baselines.

    Args:
        f: the model (on `device`); its parameters, buffers and train/eval flags are left as they were.
        data: the data set (harness.data.Data, images); its test split is degraded, its training
            split is the FID/KID reference and gives the mean image for the grayscale baseline.
        cfg: the trial config: cfg.loss.distance is D (drift), cfg.eval.bn_mode the BN mode
            (unless `bn_mode`), cfg.eval.batch_size the forward batch; cfg.data names the
            reference set (harness.evaluate.reference_set).
        tasks: degradations (names of ign.DEGRADATIONS, or a comma list); default all.
        k: project with f^1..f^k (k >= 1).
        n: test images per task (default: DEFAULTS by device and extractor, capped at the test split).
        device: where f runs and features are extracted (default: f's device).
        extractor: "mnist" or "inception" (default: mnist for 1x28x28, else inception).
        n_reference: reference images (default cfg.eval.n_reference, else n); features are cached.
        bn_mode: "train", "eval" or "both" (default cfg.eval.bn_mode); "both" adds `_bneval` keys.
        seed: seeds the degradations.
        fid: False skips fid/kid (and the reference), for quick looks.
        log: optional callable for a few progress lines.
    Returns a flat dict. Floats: `proj_<task>_<measure>_<method>` for measure in MEASURES (acc only
    for 1x28x28 digits with labels; fid/kid only with fid=True) and method in k0 (the degraded
    input: "identity"), k1..k<k> (IGN), base (the task's classical baseline);
    `proj_clean_<measure>_real` for the clean test images (fid, kid, drift, acc). With bn_mode
    "both" each of these again with the suffix `_bneval`. Other keys: `proj_n`, `proj_k`
    (ints), `proj_extractor`, `proj_bn_mode` (str), `proj_baselines` ({task: name}),
    `proj_flags` ({task: note}, e.g. grayscale on 1-channel data is the identity on its input),
    `proj_time_s`.
    """
    from .evaluate import generate_k, reference_set
    from .fidelity import extract, metrics_from_features, reference_features
    t0 = time.perf_counter()
    say = log or (lambda m: None)
    tasks = parse_tasks(tasks)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    _check_shape(f, data)
    device = torch.device(device) if device is not None else next(f.parameters()).device
    extractor = extractor or default_extractor(data)
    n = default_n(data, device, extractor) if n is None else n
    if n < 2:
        raise ValueError(f"n: must be >= 2, got {n}")
    n = min(n, len(data.test))
    digits = tuple(data.shape) == (1, 28, 28) and data.test_labels is not None
    batch = cfg.eval.batch_size
    dist = cfg.loss.distance
    mean_image = training_mean(data)

    ref = None
    if fid:
        set_name, images = reference_set(cfg, data)
        n_ref = n_reference or cfg.eval.n_reference or n
        ref = reference_features(set_name, n_ref, extractor, device, seed=0, images=images, progress=False)
        say(f"project: reference {set_name} n={n_ref} {extractor}: {'cached' if ref['hit'] else 'computed'}")

    def measure_set(u: torch.Tensor, clean: Optional[torch.Tensor], fu: torch.Tensor, labels) -> dict:
        """The measures of one row: image set u (as f was fed it), f(u), the clean targets."""
        m = {"drift": float(per_sample_distance(fu, u, dist).mean())}
        shown = _shown(u)
        if clean is not None:
            m["psnr"] = float(psnr(shown, clean).mean())
            m["ssim"] = float(ssim(shown, clean).mean())
        if ref is not None:
            gm = metrics_from_features(extract(shown, extractor, device), ref, extractor)
            m["fid"], m["kid"] = float(gm["fid"]), float(gm["kid"])
        if digits:
            from .classifier import predict
            m["acc"] = float((predict(to_uint8(shown), device).cpu() == labels).double().mean())
        return m

    out: dict = {}
    for mode, suffix in _bn_modes(cfg, bn_mode):
        x = to_model_range(data.test[:n]).to(device)
        labels = data.test_labels[:n] if digits else None
        fx = generate_k(f, x, 1, mode, batch)[0]
        for meas, v in measure_set(x, None, fx, labels).items():
            out[f"proj_clean_{meas}_real{suffix}"] = v
        for task in tasks:
            say(f"project: {task}, f^1..f^{k}, n={n}, BN {mode}")
            p = projections(f, data, task, k, n, device, mode, seed, batch, mean_image)
            rows = {"k0": (p["degraded"], p["outs"][0])}
            rows.update({f"k{j}": (p["outs"][j - 1], p["outs"][j]) for j in range(1, k + 1)})
            rows["base"] = (p["base"], p["f_base"])
            for method, (u, fu) in rows.items():
                for meas, v in measure_set(u, p["clean"], fu, labels).items():
                    out[f"proj_{task}_{meas}_{method}{suffix}"] = v
    out.update({"proj_n": n, "proj_k": k, "proj_extractor": extractor if fid else None,
                "proj_bn_mode": bn_mode or cfg.eval.bn_mode,
                "proj_baselines": {t: BASELINES[t][0] for t in tasks},
                "proj_flags": _flags(data, tasks), "proj_time_s": time.perf_counter() - t0})
    return out


def _flags(data: Data, tasks: Sequence[str]) -> dict[str, str]:
    flags = {}
    if "grayscale" in tasks and data.shape[0] == 1:
        flags["grayscale"] = ("1-channel data: g(x) = x, so the degraded input (k0) is the clean image "
                              "and the baseline (mean chroma = channel replication here) is the identity")
    return flags


_KEY = re.compile(r"^proj_(?P<task>[A-Za-z0-9]+)_(?P<measure>[a-z]+)_(?P<method>k\d+|base|real)(?P<bn>_bneval)?$")


def projection_table(result: dict) -> list[dict]:
    """Rows of a projection result, one per (bn, task, method):
    {"task", "method" ("identity", "ign", the baseline's name, or "real"), "k" (int; None for
    the baseline and the clean row), "bn" ("" or "eval"), every measure in MEASURES (None where
    not measured), "note"}. Ordered: clean row, then per task identity, f^1..f^K, baseline."""
    rows: dict[tuple, dict] = {}
    baselines = result.get("proj_baselines", {})
    flags = result.get("proj_flags", {})
    for key, v in result.items():
        m = _KEY.match(key)
        if not m or not isinstance(v, (int, float)):
            continue
        task, meth, bn = m["task"], m["method"], "eval" if m["bn"] else ""
        if meth == "real":
            method, k = "real", None
        elif meth == "base":
            method, k = baselines.get(task, "baseline"), None
        else:
            k = int(meth[1:])
            method = "identity" if k == 0 else "ign"
        row = rows.setdefault((bn, task, meth), {"task": task, "method": method, "k": k, "bn": bn,
                                                  **{x: None for x in MEASURES}, "note": flags.get(task, "")})
        row[m["measure"]] = v

    def order(key):
        bn, task, meth = key
        t = -1 if task == "clean" else (TASKS.index(task) if task in TASKS else len(TASKS))
        mo = 10 ** 6 if meth == "base" else (-1 if meth == "real" else int(meth[1:]))
        return (bn, t, task, mo)

    return [rows[key] for key in sorted(rows, key=order)]


def projection_metrics(result: dict) -> dict[str, float]:
    """Only the numeric measures of a project / interpolation_smoothness / latent_arithmetic result
    (the keys a metrics sink such as MLflow logs): `proj_<task>_<measure>_<method>[_bneval]`,
    `interp_mean|max_k<k>`, `arith_success|base|pool_k<k>`, `judge_*`."""
    keep = re.compile(r"^(proj_[A-Za-z0-9]+_[a-z]+_(k\d+|base|real)(_bneval)?|interp_(mean|max)_k\d+|"
                      r"arith_(success|base|pool)_k\d+|judge_\w+)$")
    return {k: float(v) for k, v in result.items() if keep.match(k) and isinstance(v, (int, float))}


_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.3f}", "drift": "{:.4f}", "fid": "{:.2f}", "kid": "{:.4f}", "acc": "{:.3f}"}


def format_table(rows: list[dict]) -> str:
    """A plain-text table of projection_table rows (only the measures that occur)."""
    measures = [m for m in MEASURES if any(r[m] is not None for r in rows)]
    show_bn = any(r["bn"] for r in rows)
    head = ["task", "method", "k"] + (["bn"] if show_bn else []) + measures
    body = []
    for r in rows:
        cells = [r["task"], r["method"], "" if r["k"] is None else str(r["k"])] + ([r["bn"] or "train"] if show_bn else [])
        cells += ["-" if r[m] is None else _FORMATS[m].format(r[m]) for m in measures]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    notes = sorted({f"{r['task']}: {r['note']}" for r in rows if r["note"]})
    return "\n".join(lines + [f"note: {s}" for s in notes])


@torch.no_grad()
def save_projection_grids(f: nn.Module, data: Data, cfg: TrialConfig, folder: str | Path,
                          tasks: Optional[Sequence[str] | str] = TASKS, k: int = DEFAULTS["k"], n: int = 8,
                          device=None, bn_mode: Optional[str] = None, seed: int = DEFAULTS["seed"]) -> list[Path]:
    """One PNG per task (paper Fig. 5): rows clean x, degraded y, f(y) .. f^k(y), the baseline;
    n columns (the first n test images). Projection runs on a batch of max(n, 64) images so that
    BN batch statistics are those of a batch, as in `project`."""
    from torchvision.utils import save_image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mode = _bn_modes(cfg, bn_mode)[0][0]
    paths = []
    for task in parse_tasks(tasks):
        p = projections(f, data, task, k, min(max(n, 64), len(data.test)), device, mode, seed, cfg.eval.batch_size)
        rows = [p["clean"][:n], _shown(p["degraded"][:n])] + [o[:n] for o in p["outs"][:k]] + [p["base"][:n]]
        path = folder / f"project_{task}.png"
        save_image((torch.cat(rows).cpu().clamp(-1, 1) + 1) / 2, path, nrow=n, padding=1, pad_value=1.0)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Latent operations.

@torch.no_grad()
def interpolation_smoothness(f: nn.Module, data: Data, cfg: TrialConfig, k: int = DEFAULTS["k"],
                             paths: int = DEFAULTS["interp_paths"], frames: int = DEFAULTS["interp_frames"],
                             device=None, extractor: Optional[str] = None, space: str = "features",
                             bn_mode: Optional[str] = None, seed: int = DEFAULTS["seed"], noise=None) -> dict:
    """Smoothness of f^k along straight noise paths interp(z0, z1) (paper §4, the videos).

    Args:
        f, data, cfg: the model, its data set and trial config (the noise source is the trial's).
        k: measure f^1..f^k.  paths: number of (z0, z1) pairs.  frames: frames per path (>= 3).
        device: where f runs (default f's device).
        extractor: features for the distances (default as in `project`); space="pixels" uses
            the images themselves (L2 over pixels in [0, 1]).
        bn_mode: as in `project` ("both" measures batch statistics only).
        seed: seeds the end points.  noise: the trial's NoiseSource (default make_noise(cfg, data)).
    Returns {`interp_mean_k<k>`, `interp_max_k<k>`} (floats, means over paths) where, per path
    with consecutive-frame distances d_1..d_(frames-1) and end-point distance d_end,
    mean = Σ d_t / d_end (path length over chord, >= 1; 1 = straight and evenly paced) and
    max = max_t d_t · (frames-1) / d_end (the largest jump relative to an even step, >= mean);
    plus `interp_space` (str) and `interp_paths`, `interp_frames`.
    """
    from .evaluate import generate_k, make_noise
    from .fidelity import extract
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if frames < 3:
        raise ValueError(f"frames: must be >= 3, got {frames}")
    if space not in ("features", "pixels"):
        raise ValueError(f"space: unknown value {space!r}; allowed: features, pixels")
    device = torch.device(device) if device is not None else next(f.parameters()).device
    noise = noise if noise is not None else make_noise(cfg, data, device)
    g = torch.Generator(device=device).manual_seed(seed)
    ends = noise.sample(2 * paths, generator=g)
    z = torch.cat([interpolate(ends[2 * i], ends[2 * i + 1], frames) for i in range(paths)])
    mode = _bn_modes(cfg, bn_mode)[0][0]
    outs = generate_k(f, z, k, mode, cfg.eval.batch_size)
    extractor = extractor or (default_extractor(data) if data.is_image else None)
    out: dict = {"interp_space": space if data.is_image else "points", "interp_paths": paths, "interp_frames": frames}
    for j, y in enumerate(outs, 1):
        if space == "features" and data.is_image:
            feats = extract(y.clamp(-1, 1), extractor, device)["features"]
        else:
            feats = to_unit(y).flatten(1) if data.is_image else y.double().flatten(1)
        feats = feats.view(paths, frames, -1).double()
        steps = (feats[:, 1:] - feats[:, :-1]).norm(dim=2)
        chord = (feats[:, -1] - feats[:, 0]).norm(dim=1).clamp_min(1e-12)
        out[f"interp_mean_k{j}"] = float((steps.sum(1) / chord).mean())
        out[f"interp_max_k{j}"] = float((steps.max(1).values * (frames - 1) / chord).mean())
    return out


# The Eyeglasses judge for latent arithmetic on CelebA.

ATTR_VERSION = 1   # bump when AttributeCNN or its training changes: the cache file name carries it


class AttributeCNN(nn.Module):
    """A small binary attribute classifier for 3x64x64 faces, run at 32x32 (glasses survive it):
    three conv3x3-BN-ReLU-maxpool stages (16, 32, 64), fc(128), fc(1) -> logit."""

    def __init__(self):
        super().__init__()
        chans, layers = (3, 16, 32, 64), []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: faces in [-1, 1] (N, 3, 64, 64) (or already 32x32). Returns logits (N,)."""
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="area")
        return self.head(self.features(x)).squeeze(1)


def celeba_attribute(attribute: str = "Eyeglasses", root: Optional[str | Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) bool labels of a CelebA attribute, aligned with load_dataset("celeba64", root):
    the same sorted file list and the same split by file number (harness.data._celeba64)."""
    root = Path(root).expanduser().resolve() if root else DEFAULT_DATA_ROOT
    folder, table = root / "celeba64" / "images", root / "celeba64" / "attributes.csv"
    if not folder.is_dir() or not table.is_file():
        raise FileNotFoundError(f"data.root: no celeba64/images and celeba64/attributes.csv under {root}")
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        if attribute not in (reader.fieldnames or []):
            raise ValueError(f"attribute: unknown value {attribute!r}; allowed: CelebA's 40 attribute columns")
        value = {row["image"]: row[attribute] == "1" for row in reader}
    files = list_images(folder)
    missing = [p.name for p in files if p.name not in value]
    if missing:
        raise ValueError(f"attributes.csv: no row for {len(missing)} images, e.g. {missing[0]}")
    labels = torch.tensor([value[p.name] for p in files])
    num = torch.tensor([int(p.stem) if p.stem.isdigit() else 0 for p in files])
    train = num <= CELEBA_SPLITS["train"][1]
    return labels[train], labels[~train]


def train_attribute_classifier(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                               test_labels: torch.Tensor, seed: int = 0, epochs: int = 4,
                               batch_size: int = 128, lr: float = 3e-3,
                               log: Optional[Callable[[str], None]] = None) -> dict:
    """Train AttributeCNN (balanced BCE: positives weighted by #neg/#pos; horizontal flips) on
    uint8 faces and measure it on the held-out ones. Deterministic for a seed.
    Returns `state_dict`, `test_accuracy`, `test_balanced_accuracy`, `test_tpr`, `test_tnr`,
    `test_n`, `test_pos`, `train_pos_rate`, `seed`, `epochs`, `train_time_s`, `version`."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AttributeCNN()
        g = torch.Generator().manual_seed(seed)
        small = F.interpolate(to_model_range(train), size=(32, 32), mode="area")  # once: 14k x 3x32x32
        y = train_labels.float()
        pos = float(y.sum())
        pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0))
        n = len(small)
        per_epoch = n // batch_size
        opt = torch.optim.Adam(net.parameters(), lr=lr / 4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
        net.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                xb = small[idx]
                if torch.rand((), generator=g) < 0.5:
                    xb = xb.flip(3)
                loss = F.binary_cross_entropy_with_logits(net(xb), y[idx], pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if log:
                log(f"eyeglasses classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.4f}, "
                    f"{time.perf_counter() - t0:.0f} s")
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(to_model_range(test[i:i + 500])) > 0 for i in range(0, len(test), 500)])
    t = test_labels.bool()
    tpr = float((pred & t).sum() / t.sum().clamp_min(1))
    tnr = float((~pred & ~t).sum() / (~t).sum().clamp_min(1))
    return {"state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "test_accuracy": float((pred == t).double().mean()), "test_balanced_accuracy": (tpr + tnr) / 2,
            "test_tpr": tpr, "test_tnr": tnr, "test_n": len(t), "test_pos": int(t.sum()),
            "train_pos_rate": pos / n, "seed": seed, "epochs": epochs,
            "train_time_s": time.perf_counter() - t0, "version": ATTR_VERSION}


def attribute_classifier_path(attribute: str = "Eyeglasses", seed: int = 0, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / "classifier" / f"celeba64-{attribute.lower()}-v{ATTR_VERSION}-seed{seed}.pt"


_ATTR_LOADED: dict[tuple, tuple[AttributeCNN, dict]] = {}


def load_attribute_classifier(attribute: str = "Eyeglasses", device="cpu", seed: int = 0,
                              data: Optional[Data] = None, root: Optional[str | Path] = None,
                              cache_dir: Path = DEFAULT_CACHE,
                              log: Optional[Callable[[str], None]] = None) -> tuple[AttributeCNN, dict]:
    """The cached attribute classifier (eval mode, no grad) and its record (test accuracy etc.,
    plus `path`); trained once on the celeba64 training split under a file lock if missing.
    `data`: the loaded celeba64 Data (else it is loaded from `root`)."""
    from .classifier import atomic_save, file_lock
    path = attribute_classifier_path(attribute, seed, cache_dir)
    key = (str(path), str(torch.device(device)))
    if key in _ATTR_LOADED:
        return _ATTR_LOADED[key]
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                from .data import load_dataset
                data = data or load_dataset("celeba64", root)
                tr, te = celeba_attribute(attribute, root)
                if len(tr) != len(data.train) or len(te) != len(data.test):
                    raise ValueError(f"data: {data.name} does not match celeba64/attributes.csv "
                                     f"({len(data.train)}/{len(data.test)} vs {len(tr)}/{len(te)} images)")
                (log or (lambda m: None))(f"{attribute} classifier: training once; cached at {path}")
                atomic_save(train_attribute_classifier(data.train, tr, data.test, te, seed=seed, log=log), path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    net = AttributeCNN()
    net.load_state_dict(ck["state_dict"])
    net = net.to(device).eval().requires_grad_(False)
    info = {k: v for k, v in ck.items() if k != "state_dict"} | {"path": str(path), "attribute": attribute}
    _ATTR_LOADED[key] = (net, info)
    return net, info


@torch.no_grad()
def nearest_labels(images: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor,
                   size: int = 32, chunk: int = 2048) -> torch.Tensor:
    """The label of each image's nearest training image (L2 over pixels at size x size)."""
    def small(u):
        u = to_model_range(u) if u.dtype == torch.uint8 else u.float().clamp(-1, 1)
        return F.interpolate(u, size=(size, size), mode="area").flatten(1)
    q = small(images.cpu())
    best_d = torch.full((len(q),), float("inf"))
    best_i = torch.zeros(len(q), dtype=torch.long)
    for s in range(0, len(train), chunk):
        d = torch.cdist(q, small(train[s:s + chunk]))
        v, i = d.min(1)
        better = v < best_d
        best_d[better], best_i[better] = v[better], i[better] + s
    return train_labels[best_i]


@torch.no_grad()
def latent_arithmetic(f: nn.Module, data: Data, cfg: TrialConfig, k: int = DEFAULTS["k"],
                      n: int = DEFAULTS["arith_n"], pool: int = DEFAULTS["arith_pool"], device=None,
                      judge: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      train_labels: Optional[torch.Tensor] = None, attribute: str = "Eyeglasses",
                      bn_mode: Optional[str] = None, seed: int = DEFAULTS["seed"], noise=None,
                      log: Optional[Callable[[str], None]] = None) -> dict:
    """Latent arithmetic success rate (paper Fig. 6): do edits f^k(z_pos − z_neg + z) get the attribute?

    Rule for z_pos / z_neg: a pool of `pool` noise samples is labelled by the attribute of the
    nearest training face to f(z) (pixels at 32x32); each edit pairs a fresh base z with a random
    z_pos from the pool's positives and a random z_neg from its negatives (single samples, as the
    paper's figure; no averaging). The judge is a separate classifier, so the rule that picks the
    directions and the rule that scores the edits are independent.

    Args:
        f, data, cfg: the model, its (celeba64) data and trial config.
        k: score f^1..f^k of the edits and of the bases.  n: edits.  pool: labelled noise samples.
        device: where f runs (default f's device).
        judge: images in [-1, 1] -> bool (N,); default the cached attribute classifier
            (load_attribute_classifier; trained on first use).
        train_labels: bool attribute of data.train (default celeba_attribute(attribute, cfg.data.root)).
        bn_mode, seed, noise: as in interpolation_smoothness.
    Returns floats `arith_success_k<k>` (fraction of edits judged positive), `arith_base_k<k>`
    (fraction of f^k(z) of the same bases judged positive), `arith_pool_k1` (judge's rate on the
    pool's positives f(z_pos): does the judge agree with the nearest-face rule?); ints `arith_n`,
    `arith_pool_pos`, `arith_pool`; with the default judge also `judge_test_accuracy`,
    `judge_balanced_accuracy` (held-out celeba64). All NaN when the pool has no positive or no negative.
    """
    from .evaluate import generate_k, make_noise
    say = log or (lambda m: None)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    _check_shape(f, data)
    device = torch.device(device) if device is not None else next(f.parameters()).device
    out: dict = {}
    if judge is None:
        net, info = load_attribute_classifier(attribute, device, data=data, root=cfg.data.root, log=say)
        judge = lambda u: net(u.clamp(-1, 1).to(device)).cpu() > 0  # noqa: E731
        out.update({"judge_test_accuracy": info["test_accuracy"],
                    "judge_balanced_accuracy": info["test_balanced_accuracy"]})
    if train_labels is None:
        train_labels = celeba_attribute(attribute, cfg.data.root)[0]
    if len(train_labels) != len(data.train):
        raise ValueError(f"train_labels: {len(train_labels)} labels for {len(data.train)} training images")
    noise = noise if noise is not None else make_noise(cfg, data, device)
    mode = _bn_modes(cfg, bn_mode)[0][0]
    batch = cfg.eval.batch_size
    g = torch.Generator(device=device).manual_seed(seed)
    zp = noise.sample(pool, generator=g)
    fz = generate_k(f, zp, 1, mode, batch)[0]
    lab = nearest_labels(fz, data.train, train_labels.bool())
    pos, neg = torch.nonzero(lab).flatten(), torch.nonzero(~lab).flatten()
    say(f"arithmetic: {len(pos)} of {pool} pool samples look like a face with {attribute}")
    out.update({"arith_n": n, "arith_pool": pool, "arith_pool_pos": len(pos)})
    if len(pos) == 0 or len(neg) == 0:
        out.update({f"arith_{m}_k{j}": math.nan for m in ("success", "base") for j in range(1, k + 1)})
        out["arith_pool_k1"] = math.nan
        return out
    out["arith_pool_k1"] = float(judge(fz[pos]).double().mean())
    gc = torch.Generator().manual_seed(seed + 1)
    ip = pos[torch.randint(len(pos), (n,), generator=gc)].to(device)
    ineg = neg[torch.randint(len(neg), (n,), generator=gc)].to(device)
    z = noise.sample(n, generator=g)
    edits = generate_k(f, zp[ip] - zp[ineg] + z, k, mode, batch)
    bases = generate_k(f, z, k, mode, batch)
    for j in range(k):
        out[f"arith_success_k{j + 1}"] = float(judge(edits[j]).double().mean())
        out[f"arith_base_k{j + 1}"] = float(judge(bases[j]).double().mean())
    return out


# ---------------------------------------------------------------------------------------------
# The `project` command.

def _expected_shape(dataset: str, image_size: int) -> Optional[tuple[int, ...]]:
    """The sample shape a data set will have, known before loading it (None: unknown)."""
    from ign.toy import TOYS
    if dataset == "mnist":
        return (1, 28, 28)
    if dataset in ("celeba64", "folder"):
        return (3, image_size, image_size)
    if dataset in TOYS:
        return (2,)
    return None


def _cmd_project(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import resolve_device
    from .data import load_dataset
    from .trial import load_trained

    tasks = parse_tasks(args.task)
    if args.k < 1:
        raise ValueError(f"k: must be >= 1, got {args.k}")
    if args.n is not None and args.n < 2:
        raise ValueError(f"n: must be >= 2, got {args.n}")
    device = resolve_device(args.device)
    try:
        f, cfg, ck = load_trained(args.checkpoint, device)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    dataset = args.dataset or cfg.data.dataset
    root = args.data_root if args.data_root is not None else (cfg.data.root if dataset == cfg.data.dataset else None)
    if dataset != cfg.data.dataset or root != cfg.data.root:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": dataset, "root": root})})
    model_shape = tuple(ck.get("shape") or getattr(f, "shape", ()))
    want = _expected_shape(dataset, cfg.data.image_size)
    if want is not None and model_shape != want:  # before loading (and decoding) the data
        raise ValueError(f"checkpoint: the model maps {'x'.join(map(str, model_shape))} but {dataset} "
                         f"images are {'x'.join(map(str, want))}")
    if want == (2,):
        raise ValueError(f"data: projection needs image data; {dataset} is 2-D points")
    data = load_dataset(dataset, root, False, cfg.data.image_size, cfg.seed)
    log = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    result = project(f, data, cfg, tasks=tasks, k=args.k, n=args.n, device=device,
                     extractor=args.extractor, bn_mode=args.bn_mode, seed=args.seed, fid=not args.no_fid, log=log)
    result["checkpoint"] = str(ck.get("path") or args.checkpoint)
    result["step"] = ck.get("step")
    if args.latent:
        result.update(interpolation_smoothness(f, data, cfg, k=args.k, device=device, extractor=args.extractor,
                                               bn_mode=args.bn_mode, seed=args.seed))
        if dataset == "celeba64":
            result.update(latent_arithmetic(f, data, cfg, k=args.k, device=device, bn_mode=args.bn_mode,
                                            seed=args.seed, log=log))
    if args.figures:
        save_projection_grids(f, data, cfg, args.figures, tasks, args.k, device=device, bn_mode=args.bn_mode,
                              seed=args.seed)
    print(format_table(projection_table(result)))
    latent = {k: v for k, v in result.items() if k.startswith(("interp_", "arith_", "judge_"))}
    if latent:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in latent.items()}))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": projection_table(result), **result}, indent=2, default=str))
        print(f"results: {out}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    """Register `project CHECKPOINT --task T --k K --n N [--device] [--out results.json]`."""
    p = subparsers.add_parser(
        "project", help="zero-shot projection of degraded test images with f^1..f^K, against baselines",
        description="Degrade held-out test images (appendix C: noise σ=0.15, grayscale, sketch; Fig. 9: mask), "
                    "project them with f^1..f^K and print PSNR, SSIM, drift D(f(u),u), FID, KID (and digit "
                    "accuracy on MNIST) for the degraded input (k=0, identity), each f^k, and a classical "
                    "baseline per task. --latent adds interpolation smoothness (and, on celeba64, latent "
                    "arithmetic with an Eyeglasses judge).")
    p.add_argument("checkpoint", help="checkpoint file or run folder (its newest checkpoint)")
    p.add_argument("--task", action="append", default=None, metavar="T",
                   help=f"degradation(s): {', '.join(DEGRADATIONS)}; repeatable or a comma list [default: all]")
    p.add_argument("--k", type=int, default=DEFAULTS["k"], help=f"project with f^1..f^K [default: {DEFAULTS['k']}]")
    p.add_argument("--n", type=int, default=None,
                   help=f"test images per task [default: {DEFAULTS['n_cpu_mnist']} (digits) / "
                        f"{DEFAULTS['n_cpu_inception']} (Inception) on CPU, {DEFAULTS['n_gpu']} on GPU]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N [default: auto]")
    p.add_argument("--out", default=None, help="write the results (rows and flat metrics) as JSON here")
    p.add_argument("--dataset", default=None, help="data set to project [default: the checkpoint's]")
    p.add_argument("--data-root", default=None, help="its root [default: the checkpoint's, or the shared data]")
    p.add_argument("--extractor", default=None, choices=("mnist", "inception"),
                   help="features for FID/KID [default: mnist for 28x28 digits, else inception]")
    p.add_argument("--bn-mode", default=None, choices=("train", "eval", "both"),
                   help="BatchNorm at projection [default: the checkpoint's eval.bn_mode]")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the degradations")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID")
    p.add_argument("--latent", action="store_true", help="also measure the latent operations")
    p.add_argument("--figures", default=None, metavar="DIR", help="write one PNG grid per task here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_project)
