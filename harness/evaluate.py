"""Evaluation at f^1..f^K (DESIGN §3): a library that returns a dict (STYLE §7).

`evaluate(f, data, cfg)` draws one fixed set of noise (cfg.eval.seed), computes f^1..f^(K+1) batch by
batch (K+1 forward passes per batch: the extra one measures idempotence at f^K), feeds every f^k
straight to the feature extractors, and compares the features with cached reference features of the
training split. f's parameters, buffers (BN running statistics) and train/eval flags are left exactly
as they were.

Keys: `<metric>_<extractor>_k<k>` with metric in fid, kid, kid_std, precision, recall, is, is_std,
modes, modes_entropy (where the extractor provides them); `idem_k<k>`; `drift_real`; for 2-D toys
`swd_k<k>`, `energy_k<k>`, `modes_k<k>`, `near_frac_k<k>`. With bn_mode "both" every metric is
reported with batch statistics and again, suffixed `_bneval`, with running statistics.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from ign import apply_k, build_noise, energy_distance, mode_coverage, per_sample_distance, sliced_wasserstein, toy_sample
from ign.noise import NoiseSource

from .config import TrialConfig
from .data import Data, to_model_range
from .fidelity import EXTRACT_BATCH, extractor_hash, extract, metrics_from_features, reference_features

BN_MODES = ("train", "eval")
CPU_SAMPLES, GPU_SAMPLES = 1000, 10000   # eval.n_samples = None: Inception runs ~25 images/s on 2 CPU cores


def default_n_samples(device) -> int:
    return GPU_SAMPLES if torch.device(device).type == "cuda" else CPU_SAMPLES


def make_noise(cfg: TrialConfig, data: Data, device) -> NoiseSource:
    """The trial's noise source z ~ P_z, shared by training and evaluation.

    FFT noise fits its statistics on a fixed training sample of cfg.noise.fft_samples images in
    [-1, 1] (a seeded choice by cfg.seed, so a resumed trial gets the same statistics); Gaussian
    noise needs no sample, so none is drawn."""
    sample = None
    if cfg.noise.name == "fft":
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(data.train), generator=g)[:cfg.noise.fft_samples]
        sample = to_model_range(data.train[idx])
    return build_noise(cfg.noise.name, data.shape, data=sample, stats=cfg.noise.fft_stats, device=device)


@contextlib.contextmanager
def isolated(f: nn.Module, bn_mode: str):
    """A callable running f with BN in `bn_mode` ("train": batch statistics, "eval": running ones)
    that cannot change f: buffers are cloned (train-mode BN updates the clones) and every
    submodule's train/eval flag is restored on exit."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"eval.bn_mode: unknown value {bn_mode!r}; allowed: {', '.join(BN_MODES)}")
    flags = [(m, m.training) for m in f.modules()]
    f.train(bn_mode == "train")
    state = {**{k: v.detach() for k, v in f.named_parameters()},
             **{k: v.clone() for k, v in f.named_buffers()}}
    try:
        yield lambda x: functional_call(f, state, (x,))
    finally:
        for m, t in flags:
            m.training = t


def _batches(x: torch.Tensor, batch_size: Optional[int]) -> tuple[torch.Tensor, ...]:
    """Near-equal batches of at most batch_size: never a last batch of 1, which train-mode BN rejects."""
    if not batch_size or batch_size >= len(x):
        return (x,)
    return torch.tensor_split(x, -(-len(x) // batch_size))


@torch.no_grad()
def generate_k(f: nn.Module, z: torch.Tensor, k: int, bn_mode: str = "train",
               batch_size: Optional[int] = None) -> list[torch.Tensor]:
    """[f(z), f^2(z), ..., f^k(z)], each (N, ...) on z's device: k forward passes per batch.

    bn_mode: "train" (BN batch statistics, per batch) or "eval" (running statistics).
    batch_size: split z into near-equal batches of at most this size (None: one batch).
    f is not changed (see `isolated`)."""
    outs: list[list[torch.Tensor]] = [[] for _ in range(k)]
    with isolated(f, bn_mode) as g:
        for zb in _batches(z, batch_size):
            for i, y in enumerate(apply_k(g, zb, k)):
                outs[i].append(y)
    return [torch.cat(o) for o in outs]


def fixed_noise(noise: NoiseSource, n: int, seed: int, batch_size: int) -> list[torch.Tensor]:
    """The evaluation noise: n samples in near-equal CPU batches, drawn from a CPU generator seeded
    with `seed`, so every evaluation of a trial (and a CPU or GPU rerun) sees the same z. Drawn per
    batch: FFT noise of 10k CelebA-sized samples would need ~2 GB of complex doubles at once."""
    src = copy.copy(noise).to("cpu")  # a shallow copy: the caller's source stays on its device
    g = torch.Generator().manual_seed(seed)
    sizes = [len(b) for b in _batches(torch.empty(n), batch_size)]
    return [src.sample(s, generator=g) for s in sizes]


def reference_set(cfg: TrialConfig, data: Data) -> tuple[str, Optional[torch.Tensor]]:
    """(set name, images or None) of the reference: the training split. The shared data sets
    under the default root are named sets (cached once for every trial); any other root is keyed
    by its path, image size and size, and its in-memory training images are used."""
    if cfg.data.root is None and data.name in ("mnist", "celeba64"):
        return f"{data.name}-train", None
    stamp = f"{cfg.data.dataset}|{cfg.data.root}|{cfg.data.image_size}|{len(data.train)}"
    return f"{data.name}-{hashlib.sha1(stamp.encode()).hexdigest()[:10]}-train", data.train


def _check_extractors(data: Data, extractors: list[str]) -> None:
    if "mnist" in extractors and data.shape != (1, 28, 28):
        raise ValueError(f"eval.extractors: 'mnist' needs 1x28x28 digits, {data.name} has "
                         f"{'x'.join(map(str, data.shape))}; allowed here: inception")


def evaluate(f: nn.Module, data: Data, cfg: TrialConfig, device=None, noise: Optional[NoiseSource] = None,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Metrics of f^1..f^K on one fixed set of noise; f is left unchanged.

    Args:
        f: the model (on `device`).
        data: the trial's data (harness.data.Data); its test split gives `drift_real`.
        cfg: the trial config; cfg.eval sets k, n_samples, n_reference, extractors, bn_mode,
            batch_size and seed; cfg.loss.distance is D; cfg.noise the noise (when `noise` is None).
        device: where f runs and features are extracted (default cfg.resolved_device()).
        noise: the trial's noise source (make_noise); None builds it from cfg.
        log: optional callable for a few progress lines (reference features, per BN mode).
    Returns a dict:
        `n_samples` (int), `bn_mode` (str, as configured);
        images: `<metric>_<extractor>_k<k>` for metric in fid, kid, kid_std, precision, recall, and
            is, is_std where the extractor has logits (mnist always; inception only with the
            classifier head), modes, modes_entropy for mnist; `inception_weights` (12-hex hash)
            when inception is used;
        toys: `swd_k<k>`, `energy_k<k>` (vs fresh toy samples), `modes_k<k>`, `near_frac_k<k>`;
        both: `idem_k<k>` = mean D(f^(k+1)(z), f^k(z)); `drift_real` = mean D(f(x), x) over up to
            n_samples held-out test points.
        With bn_mode "both" each metric also appears with the suffix `_bneval` (running statistics);
        the unsuffixed ones use batch statistics.
    """
    say = log or (lambda m: None)
    device = torch.device(device) if device is not None else cfg.resolved_device()
    ev = cfg.eval
    n = ev.n_samples or default_n_samples(device)
    n_ref = ev.n_reference or n
    modes = {"train": ["train"], "eval": ["eval"], "both": ["train", "eval"]}[ev.bn_mode]
    noise = noise if noise is not None else make_noise(cfg, data, device)
    z_batches = fixed_noise(noise, n, ev.seed, ev.batch_size)
    x_test = data.test[:n]
    out: dict = {"n_samples": n, "bn_mode": ev.bn_mode}

    refs = {}
    if data.is_image:
        _check_extractors(data, ev.extractors)
        set_name, images = reference_set(cfg, data)
        for name in ev.extractors:
            refs[name] = reference_features(set_name, n_ref, name, device, seed=0, images=images)
            say(f"evaluate: reference {set_name} n={n_ref} {name}: {'cached' if refs[name]['hit'] else 'computed'}")
        if "inception" in ev.extractors:
            out["inception_weights"] = extractor_hash("inception")
    else:
        toy_ref = toy_sample(data.name, n, torch.Generator().manual_seed(ev.seed + 1))[0]

    for mode in modes:
        suffix = "_bneval" if mode == "eval" and len(modes) == 2 else ""
        say(f"evaluate: f^1..f^{ev.k} on {n} samples, BN {mode} mode")
        if data.is_image:
            m = _image_metrics(f, z_batches, refs, cfg, mode, device)
        else:
            m = _toy_metrics(f, torch.cat(z_batches), toy_ref, data.name, cfg, mode, device)
        drift = [per_sample_distance(generate_k(f, xb, 1, mode)[0], xb, cfg.loss.distance)
                 for xb in (to_model_range(b).to(device) for b in _batches(x_test, ev.batch_size))]
        m["drift_real"] = float(torch.cat(drift).mean())
        out.update({f"{k}{suffix}": v for k, v in m.items()})
    return out


def _image_metrics(f, z_batches, refs, cfg, mode, device) -> dict:
    """Features of f^1..f^K per extractor, batch by batch, then metrics against the references."""
    from tqdm import tqdm
    K, dist = cfg.eval.k, cfg.loss.distance
    # Inception activations at 299x299 are large: CPU batches stay at the measured 64.
    fbatch = cfg.eval.batch_size if device.type == "cuda" else min(cfg.eval.batch_size, EXTRACT_BATCH)
    feats = {(name, k): [] for name in refs for k in range(K)}
    idem = [[] for _ in range(K)]
    for zb in tqdm(z_batches, desc=f"evaluate f^1..f^{K} ({mode})", leave=False, disable=None):
        ys = generate_k(f, zb.to(device), K + 1, mode)
        for k in range(K):
            idem[k].append(per_sample_distance(ys[k + 1], ys[k], dist).cpu())
            for name in refs:
                feats[name, k].append(extract(ys[k], name, device, fbatch))
    out = {}
    for k in range(K):
        out[f"idem_k{k + 1}"] = float(torch.cat(idem[k]).mean())
        for name, ref in refs.items():
            parts = feats[name, k]
            gen = {"features": torch.cat([p["features"] for p in parts]),
                   "logits": torch.cat([p["logits"] for p in parts]) if parts[0]["logits"] is not None else None}
            for metric, v in metrics_from_features(gen, ref, name).items():
                out[f"{metric}_{name}_k{k + 1}"] = v
    return out


def _toy_metrics(f, z, ref, toy, cfg, mode, device) -> dict:
    """Exact, cheap distances of f^k(z) to fresh samples of the toy distribution (Theorem 1)."""
    ys = [y.cpu() for y in generate_k(f, z.to(device), cfg.eval.k + 1, mode, cfg.eval.batch_size)]
    out = {}
    for k in range(cfg.eval.k):
        y = ys[k]
        cov = mode_coverage(y, toy)
        out.update({f"swd_k{k + 1}": sliced_wasserstein(y, ref), f"energy_k{k + 1}": energy_distance(y, ref),
                    f"modes_k{k + 1}": cov["modes"], f"near_frac_k{k + 1}": cov["near_frac"],
                    f"idem_k{k + 1}": float(per_sample_distance(ys[k + 1], y, cfg.loss.distance).mean())})
    return out
