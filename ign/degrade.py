"""Degradations of appendix C, on images in [-1, 1] (N, C, H, W), plus the noise mask of Fig. 9."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torchvision.transforms.functional import gaussian_blur

DEGRADATIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register_degradation(name: str):
    def deco(fn):
        DEGRADATIONS[name] = fn
        return fn
    return deco


@register_degradation("noise")
def add_noise(x: torch.Tensor, sigma: float = 0.15, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x + n, n ~ N(0, sigma^2), sigma = 0.15 (appendix C). Not clipped, as in the paper."""
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@register_degradation("grayscale")
def grayscale(x: torch.Tensor, generator=None) -> torch.Tensor:
    """g(x) = x.mean(dim=1, keepdim=True).repeat(1, C, 1, 1): the channel mean in every channel."""
    return x.mean(dim=1, keepdim=True).repeat(1, x.shape[1], 1, 1)


SKETCH_KERNEL = 21


@register_degradation("sketch")
def sketch(x: torch.Tensor, generator=None, kernel: int = SKETCH_KERNEL) -> torch.Tensor:
    """s(x) = g(x+1) / (gaussian_blur(g(x+1), 21) + 1e-10) - 1 (appendix C).

    The blur uses PyTorch's default sigma for the kernel size, 0.3*((k-1)*0.5-1)+0.8 = 3.5 for 21.
    The +1 / -1 shift makes the division act on non-negative values. The paper prints the 1e-10
    after the closing parenthesis of the blur; we add it to the denominator, the only place where
    it does anything: black regions (x = -1) blur to 0 and would otherwise give 0/0 = NaN."""
    g = grayscale(x + 1)
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    return g / (gaussian_blur(g, [kernel, kernel], [sigma, sigma]) + 1e-10) - 1


def random_box(h: int, w: int, frac: float = 0.4, generator: Optional[torch.Generator] = None):
    """A (top, left, height, width) box covering `frac` of each side, at a random position."""
    bh, bw = max(1, round(h * frac)), max(1, round(w * frac))
    top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
    return top, left, bh, bw


@register_degradation("mask")
def mask(x: torch.Tensor, generator=None, box=None, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fig. 9: a rectangle of x replaced by noise (`fill`, same shape as x; default N(0, 1)).

    box = (top, left, height, width); default: a random box covering 40% of each side, one per call."""
    n, c, h, w = x.shape
    if box is None:
        box = random_box(h, w, generator=generator)
    top, left, bh, bw = box
    if fill is None:
        fill = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x.clone()
    out[:, :, top:top + bh, left:left + bw] = fill[:, :, top:top + bh, left:left + bw]
    return out


def degrade(name: str, x: torch.Tensor, generator: Optional[torch.Generator] = None, **kw) -> torch.Tensor:
    if name not in DEGRADATIONS:
        raise ValueError(f"task: unknown value {name!r}; allowed: {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[name](x, generator=generator, **kw)
