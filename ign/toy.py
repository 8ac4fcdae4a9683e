"""2-D toy distributions and exact, cheap distances between point clouds (Theorem 1 checks)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

TOYS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_toy(name: str):
    def deco(fn):
        TOYS[name] = fn
        return fn
    return deco


@register_toy("ring8")
def ring8(n: int, generator: Optional[torch.Generator] = None, radius: float = 2.0, std: float = 0.05):
    """A ring of 8 Gaussians; returns (points (n, 2), mode labels (n,))."""
    labels = torch.randint(0, 8, (n,), generator=generator)
    angle = labels.double() * (2 * math.pi / 8)
    centers = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    pts = centers + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return pts.float(), labels


@register_toy("moons")
def moons(n: int, generator: Optional[torch.Generator] = None, std: float = 0.05):
    """Two interleaving half circles (as scikit-learn's make_moons), centred; labels 0/1."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    x = torch.where(labels == 0, t.cos(), 1 - t.cos())
    y = torch.where(labels == 0, t.sin(), 0.5 - t.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return pts.float(), labels


def toy_sample(name: str, n: int, generator=None):
    if name not in TOYS:
        raise ValueError(f"data.dataset: unknown toy {name!r}; allowed: {', '.join(TOYS)}")
    return TOYS[name](n, generator)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (exact per projection)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ dirs).sort(0).values
    pb = (b.double().cpu() @ dirs).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2E|A-B| - E|A-A'| - E|B-B'| (>= 0, zero iff the distributions are equal)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def mode_coverage(points: torch.Tensor, name: str, min_share: float = 0.25, tol: float = 0.3,
                  n_ref: int = 20000) -> dict[str, float]:
    """Modes of the toy set hit by `points`: each point takes the mode of its nearest reference
    point if that point is within `tol`; a mode is covered when it gets at least `min_share` of its
    expected share. Returns covered modes, total modes, and the fraction of points near any mode."""
    ref, lab = toy_sample(name, n_ref, torch.Generator().manual_seed(12345))
    n_modes = int(lab.max()) + 1
    # In chunks: the full (n, n_ref) distance matrix is 1.6 GB for 10k points.
    nearest = [torch.cdist(c, ref.double()).min(1) for c in points.double().cpu().split(1024)]
    d = torch.cat([m.values for m in nearest])
    idx = torch.cat([m.indices for m in nearest])
    near = d < tol
    counts = torch.bincount(lab[idx][near], minlength=n_modes).double()
    expected = len(points) / n_modes
    return {"modes": float((counts >= min_share * expected).sum()), "modes_total": float(n_modes),
            "near_frac": float(near.double().mean())}
