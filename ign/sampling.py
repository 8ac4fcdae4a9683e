"""f^k and latent-space operations (paper §4: iterated application, interpolation, arithmetic)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def apply_k(f: nn.Module, z: torch.Tensor, k: int) -> list[torch.Tensor]:
    """[f(z), f^2(z), ..., f^k(z)] with k forward passes (each step from the previous one)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    out, y = [], z
    for _ in range(k):
        y = f(y)
        out.append(y)
    return out


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear interpolation from z0 to z1 (single samples, no batch dim) in `steps` frames."""
    t = torch.linspace(0, 1, steps, device=z0.device, dtype=z0.dtype).view(-1, *([1] * z0.dim()))
    return (1 - t) * z0.unsqueeze(0) + t * z1.unsqueeze(0)


def arithmetic(z_pos: torch.Tensor, z_neg: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Fig. 6: z_pos - z_neg + z; f of it is f(z) edited with the property of f(z_pos)."""
    return z_pos - z_neg + z
