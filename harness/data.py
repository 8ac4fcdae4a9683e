"""Datasets, all scaled to [-1, 1]: MNIST, CelebA-64 (or any folder of face images), toy 2-D sets.

Images are held in memory as uint8 (N, C, H, W) and converted per batch: MNIST train is 47 MB,
the CelebA-64 subset 193 MB. A decoded folder is cached on disk (keyed by path, file count and
newest mtime), so every trial of a sweep after the first loads it in a second.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ign.toy import TOYS, toy_sample

from .paths import DEFAULT_CACHE, DEFAULT_DATA_ROOT, PROJECT_ROOT  # noqa: F401 (re-exported)

IMAGE_DATASETS = ("mnist", "celeba64", "folder")
DATASETS = IMAGE_DATASETS + tuple(TOYS)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# CelebA's official partition by file number (img_align_celeba numbering).
CELEBA_SPLITS = {"train": (1, 162770), "valid": (162771, 182637), "test": (182638, 202599)}
TOY_TRAIN_SIZE = 20000


@dataclass
class Data:
    """A loaded data set. `train`/`test` are uint8 (N, C, H, W) for images, float (N, 2) for toys."""
    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None

    @property
    def is_image(self) -> bool:
        return self.train.dtype == torch.uint8

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def batch(self, idx: torch.Tensor, split: str = "train", device="cpu") -> torch.Tensor:
        src = self.train if split == "train" else self.test
        return to_model_range(src[idx]).to(device, non_blocking=True)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float input (toy points) is returned as is."""
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    return x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped: the inverse of `to_model_range` up to rounding."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _mnist(root: Path, download: bool) -> Data:
    from torchvision.datasets import MNIST
    if not download and not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() \
            and not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"data.root: no MNIST under {root}/MNIST/raw (pass data.download=true to fetch it)")
    tr = MNIST(str(root), train=True, download=download)
    te = MNIST(str(root), train=False, download=download)
    return Data("mnist", tr.data.unsqueeze(1).contiguous(), te.data.unsqueeze(1).contiguous(),
                tr.targets.clone(), te.targets.clone())


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image
    import numpy as np
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):  # centre-crop to a square, then an antialiased resize
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def load_folder(folder: Path, size: int = 64, cache_dir: Path = DEFAULT_CACHE,
                files: Optional[list[Path]] = None, progress: bool = True) -> torch.Tensor:
    """All images of a folder as uint8 (N, 3, size, size), decoded once and cached on disk."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: not a folder of images: {folder}")
    files = files if files is not None else list_images(folder)
    if not files:
        raise FileNotFoundError(f"data.root: no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}")
    stamp = f"{folder}|{size}|{len(files)}|{max(f.stat().st_mtime_ns for f in files)}|{files[0].name}|{files[-1].name}"
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "folders" / f"{folder.name}-{size}-{key}.pt"
    if cache.exists():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # a truncated cache file is rebuilt, not trusted
            cache.unlink(missing_ok=True)
    from tqdm import tqdm
    imgs = torch.stack([_load_image(f, size) for f in tqdm(files, desc=f"decode {folder.name}",
                                                           disable=not progress, leave=False)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save(imgs, tmp)
    os.replace(tmp, cache)
    return imgs


def _celeba64(root: Path, size: int) -> Data:
    folder = root / "celeba64" / "images" if (root / "celeba64" / "images").is_dir() else root
    files = list_images(folder)
    imgs = load_folder(folder, size, files=files)
    if folder.name == "images" and folder.parent.name == "celeba64":
        # The official partition by file number; our subset has ~14.3k train and 1.4k valid+test.
        num = torch.tensor([int(f.stem) if f.stem.isdigit() else 0 for f in files])
        train = num <= CELEBA_SPLITS["train"][1]
        return Data("celeba64", imgs[train], imgs[~train])
    n_test = max(1, len(imgs) // 10)  # any other folder: the last 10% (sorted by name) is held out
    return Data("celeba64", imgs[:-n_test], imgs[-n_test:])


def _folder(root: Path, size: int) -> Data:
    imgs = load_folder(root, size)
    n_test = max(1, len(imgs) // 10)
    return Data(root.name, imgs[:-n_test], imgs[-n_test:])


def _toy(name: str, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    tr, trl = toy_sample(name, TOY_TRAIN_SIZE, g)
    te, tel = toy_sample(name, TOY_TRAIN_SIZE // 4, g)
    return Data(name, tr, te, trl, tel)


def load_dataset(name: str, root: Optional[str | Path] = None, download: bool = False,
                 image_size: int = 64, seed: int = 0) -> Data:
    """Load a data set by name: mnist, celeba64, folder (root = a folder of images), ring8, moons."""
    if name in TOYS:
        return _toy(name, seed)
    root = Path(root).expanduser().resolve() if root else DEFAULT_DATA_ROOT
    if name == "mnist":
        return _mnist(root, download)
    if name == "celeba64":
        return _celeba64(root, image_size)
    if name == "folder":
        return _folder(root, image_size)
    raise ValueError(f"data.dataset: unknown value {name!r}; allowed: {', '.join(DATASETS)}")


# Named image sets for evaluation and the `fid` command: "<dataset>-<split>".
NAMED_SETS = ("mnist-train", "mnist-test", "celeba64", "celeba64-train", "celeba64-test")


def load_images(name: str, n: Optional[int] = None, seed: int = 0,
                root: Optional[str | Path] = None) -> torch.Tensor:
    """A named image set (see NAMED_SETS) or a folder path, as uint8 (N, C, H, W).

    With n, a fixed random subset of n images (seeded), so the same (name, n, seed) is always the
    same images: reference statistics can be cached under that key."""
    if name in NAMED_SETS:
        ds, _, split = name.partition("-")
        data = load_dataset(ds, root)
        imgs = data.test if split == "test" else (data.train if split == "train"
                                                  else torch.cat([data.train, data.test]))
    elif Path(name).is_dir():
        imgs = load_folder(Path(name))
    else:
        raise ValueError(f"image set: {name!r} is neither a folder nor one of {', '.join(NAMED_SETS)}")
    if n is not None:
        if n > len(imgs):
            raise ValueError(f"n: {n} images requested from {name!r}, which has only {len(imgs)}")
        g = torch.Generator().manual_seed(seed)
        imgs = imgs[torch.randperm(len(imgs), generator=g)[:n]]
    return imgs
