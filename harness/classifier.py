"""A small MNIST digit classifier, trained once and cached: the domain metrics of DESIGN §3.

Its penultimate features feed FID/KID/precision-recall, its logits IS (at most 10), and its
predictions the mode coverage that catches collapse. It is trained once per cache (seeded; its test
accuracy is stored beside the weights) and shared by every trial of every sweep. Sweeps run trials in
parallel, so training is guarded by a file lock: the first process trains, the others wait and load.

`FeatureExtractorMnistCNN` is the thin torch-fidelity adapter (STYLE §8); `harness.fidelity`
registers it as "mnist-cnn".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from .data import DEFAULT_CACHE, Data, load_dataset, to_model_range

ARCH_VERSION = 1        # bump when MnistCNN or its training changes: the cache file name carries it
FEATURE_DIM = 128       # penultimate features (FID/KID/PR)
NUM_CLASSES = 10
MIN_TEST_ACCURACY = 0.99  # below this the cached classifier is not trusted (training raises)


# ---------------------------------------------------------------------------------------------
# Small file helpers shared with harness.fidelity (caches written by parallel trials).

def atomic_save(obj, path: Path) -> Path:
    """torch.save to a temp file in the same folder, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive fcntl lock on `path` (created if missing), held for the `with` block.

    Parallel trials that need the same cache entry wait here instead of computing it twice."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def file_hash(path: Path, length: int = 12) -> str:
    """The first `length` hex digits of the file's sha256 (weights identity for cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# The network.

class MnistCNN(nn.Module):
    """conv3x3(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, fc(128)-ReLU (the features), fc(10).

    Small on purpose: 3 epochs reach 99.24% test accuracy (seed 0) at about 20 s per epoch on 2
    idle CPU cores (several minutes when the cores are shared)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 7 * 7, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: images in [-1, 1], (N, 1, 28, 28). Returns ((N, 128) features, (N, 10) logits)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        h = F.relu(self.fc1(x.flatten(1)))
        return h, self.fc2(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def to_classifier_input(x: torch.Tensor) -> torch.Tensor:
    """Images as the classifier takes them: float [-1, 1], (N, 1, 28, 28).

    Accepts uint8 [0, 255] (what torch-fidelity feeds) or float [-1, 1] (what models produce), with
    1 channel or 3 (an RGB folder of digits: the channel mean, exact for grey images)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (28, 28):
        raise ValueError(f"mnist classifier: expected images (N, 1 or 3, 28, 28), got {tuple(x.shape)}")
    x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


# ---------------------------------------------------------------------------------------------
# Training (pure: data in, weights and test accuracy out) and the cached, locked entry points.

def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """The batch translated by up to ±max_shift pixels (one offset per batch; background fill):
    cheap augmentation that buys the last few tenths of a percent of test accuracy."""
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
    return xp[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `net` (in eval mode) on uint8 or [-1, 1] images."""
    pred = torch.cat([net(to_classifier_input(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)])
    return float((pred == labels).double().mean())


def train_classifier(data: Optional[Data] = None, seed: int = 0, epochs: int = 3, batch_size: int = 128,
                     lr: float = 4e-3, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train MnistCNN on MNIST train and measure it on MNIST test. Deterministic for a seed.

    Args:
        data: the MNIST Data (train/test uint8 and labels); None loads harness.data "mnist".
        seed: seeds the initial weights, the data order and the augmentation.
        epochs: passes over the 60k training digits (3 reach > 99% test accuracy).
        batch_size: training batch size.
        lr: peak learning rate of the one-cycle schedule (Adam).
        log: optional callable for one progress line per epoch.
    Returns a dict: `state_dict` (CPU tensors), `test_accuracy` (float), `seed`, `epochs`,
    `train_time_s`, `arch_version`. The caller's global RNG state is left untouched.
    """
    data = data or load_dataset("mnist")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeding must not change the caller's random stream
        torch.manual_seed(seed)
        net = MnistCNN().to(memory_format=torch.channels_last)  # ~1.5x faster convs on CPU
        g = torch.Generator().manual_seed(seed)
        n = len(data.train)
        steps_per_epoch = n // batch_size
        opt = torch.optim.Adam(net.parameters(), lr=lr / 4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        net.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = _shift(to_model_range(data.train[idx]), g).contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(net(x), data.train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if log:
                log(f"mnist classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.4f}, "
                    f"{time.perf_counter() - t0:.0f} s")
        net.eval()
        acc = accuracy(net, data.test, data.test_labels)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    return {"state_dict": state, "test_accuracy": acc, "seed": seed, "epochs": epochs,
            "train_time_s": time.perf_counter() - t0, "arch_version": ARCH_VERSION}


def classifier_path(seed: int = 0, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / "classifier" / f"mnist-cnn-v{ARCH_VERSION}-seed{seed}.pt"


def ensure_classifier(seed: int = 0, cache_dir: Path = DEFAULT_CACHE,
                      log: Optional[Callable[[str], None]] = None) -> Path:
    """The cached classifier file, trained first if missing (once, under a file lock).

    Raises RuntimeError if a fresh training run stays below MIN_TEST_ACCURACY (nothing is cached)."""
    path = classifier_path(seed, cache_dir)
    if path.exists():
        return path
    with file_lock(path.with_suffix(".lock")):
        if path.exists():  # another process trained it while we waited
            return path
        (log or (lambda m: None))(f"mnist classifier: training once (seed {seed}); cached at {path}")
        out = train_classifier(seed=seed, log=log)
        if out["test_accuracy"] < MIN_TEST_ACCURACY:
            raise RuntimeError(f"mnist classifier: test accuracy {out['test_accuracy']:.4f} "
                               f"< {MIN_TEST_ACCURACY}; not cached")
        atomic_save(out, path)
    return path


_LOADED: dict[tuple, tuple[MnistCNN, dict]] = {}  # process cache: weights are read once per device


def load_classifier(device="cpu", seed: int = 0, cache_dir: Path = DEFAULT_CACHE,
                    path: Optional[Path] = None) -> tuple[MnistCNN, dict]:
    """The trained classifier (eval mode, no grad) and its record.

    Args:
        device: where the network lives.
        seed / cache_dir: which cached classifier (trained on first use, see ensure_classifier).
        path: an explicit weights file instead (as written by ensure_classifier).
    Returns (net, info) with info keys `path`, `hash` (12 hex of the file's sha256),
    `test_accuracy`, `seed`, `epochs`.
    """
    path = Path(path) if path else ensure_classifier(seed, cache_dir)
    key = (str(path), str(torch.device(device)))
    if key not in _LOADED:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        net = MnistCNN()
        net.load_state_dict(ck["state_dict"])
        net = net.to(device).eval().requires_grad_(False)
        info = {"path": str(path), "hash": file_hash(path), "test_accuracy": ck["test_accuracy"],
                "seed": ck["seed"], "epochs": ck["epochs"]}
        _LOADED[key] = (net, info)
    return _LOADED[key]


@torch.no_grad()
def predict(images: torch.Tensor, device=None, batch_size: int = 1000) -> torch.Tensor:
    """Predicted digit (LongTensor (N,), on CPU) for uint8 or [-1, 1] images (N, 1|3, 28, 28)."""
    device = device or images.device
    net, _ = load_classifier(device)
    return torch.cat([net(to_classifier_input(images[i:i + batch_size].to(device))).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


class FeatureExtractorMnistCNN(FeatureExtractorBase):
    """torch-fidelity adapter: features "128" (penultimate, for FID/KID/PR) and "logits" (IS).

    Inputs as torch-fidelity feeds them: uint8 (N, 1 or 3, 28, 28); float [-1, 1] also works.
    `feature_extractor_weights_path` selects a classifier file; None = the cached default."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        net, self.info = load_classifier("cpu", path=feature_extractor_weights_path)
        self.net = MnistCNN()
        self.net.load_state_dict(net.state_dict())  # own copy: torch-fidelity moves it to its device
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        feats, logits = self.net.features_and_logits(to_classifier_input(x))
        out = {"128": feats, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
