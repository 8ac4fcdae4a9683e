"""Checkpoints: written atomically, the resolved config inside, the newest loadable one wins.

A checkpoint is `ckpt-<step>.pt` in a run's `checkpoints/` folder. Writing goes to a temp file that
is fsynced and renamed, so a killed process never leaves a half-written `ckpt-*.pt`; the previous
checkpoint is kept until a newer one exists, so a checkpoint corrupted later (disk, copy) costs at
most one interval: loading falls back to the previous good one and says so.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
KEEP = 2
_NAME = re.compile(r"ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A missing, truncated or foreign checkpoint (one-line message; the CLI exits 2)."""


def save_checkpoint(ckpt_dir: Path, step: int, payload: dict[str, Any], keep: int = KEEP) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step:08d}.pt"
    tmp = ckpt_dir / f".tmp-{os.getpid()}-{path.name}"
    with open(tmp, "wb") as fh:
        torch.save({**payload, "step": step}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint's file name (ckpt-00000250.pt -> 250), None for other files."""
    m = _NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a folder, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(s, p) for p in ckpt_dir.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    """Load one checkpoint file; a truncated or foreign file raises CheckpointError (one line)."""
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"checkpoint {path}: not an ign-bench checkpoint (no model/config)")
    return ck


def load_latest(ckpt_dir: Path, map_location="cpu") -> Optional[dict[str, Any]]:
    """The newest checkpoint that loads; corrupt newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ck = read_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint", e)
            continue
        ck["path"] = str(path)
        return ck
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder / checkpoints folder -> its newest checkpoint file."""
    p = Path(path)
    if p.is_file():
        return p
    for d in (p / "checkpoints", p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise CheckpointError(f"checkpoint: no checkpoint file at {p}")
