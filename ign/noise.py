"""Noise sources z ~ P_z: standard Gaussian, and FFT noise with the frequency statistics of data (§2.3).

FFT noise: per frequency (and channel), the mean and variance of the real and imaginary parts of
fft2 of real images; sample a spectrum with those statistics and inverse-transform it. The inverse
of an arbitrary complex spectrum is complex; we keep its real part, which is the inverse of the
spectrum's Hermitian part (S(k) + conj S(-k)) / 2. That average halves the variance at every
frequency that is not its own mirror, so we draw those with √2 × the fitted std: then the fft2 of
the noise has exactly the fitted per-frequency mean and variance (tests check this).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

NOISES: dict[str, Callable[..., "NoiseSource"]] = {}


def register_noise(name: str):
    def deco(cls):
        NOISES[name] = cls
        return cls
    return deco


class NoiseSource:
    """z for a batch: `sample(n, batch=None, generator=None)` returns (n, *shape) noise."""
    shape: tuple[int, ...]

    def sample(self, n: int, batch: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "NoiseSource":
        return self


@register_noise("gaussian")
class GaussianNoise(NoiseSource):
    def __init__(self, shape, device="cpu", **_):
        self.shape = tuple(shape)
        self.device = torch.device(device)

    def sample(self, n, batch=None, generator=None):
        dev = batch.device if batch is not None else self.device
        return torch.randn((n, *self.shape), generator=generator, device=dev)

    def to(self, device):
        self.device = torch.device(device)
        return self


def fft_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frequency mean and std of the real and imaginary parts of fft2 over (H, W), per channel."""
    spec = torch.fft.fft2(images.double())
    return {"mean_re": spec.real.mean(0), "std_re": spec.real.std(0, unbiased=False),
            "mean_im": spec.imag.mean(0), "std_im": spec.imag.std(0, unbiased=False)}


def _self_mirror_mask(h: int, w: int) -> torch.Tensor:
    """True at frequencies k with k == -k (mod size): DC and, for even sizes, the Nyquist bins."""
    kh = torch.arange(h)
    kw = torch.arange(w)
    mh = (kh == (-kh) % h)[:, None]
    mw = (kw == (-kw) % w)[None, :]
    return mh & mw


def sample_fft(stats: dict[str, torch.Tensor], n: int, generator=None, device=None) -> torch.Tensor:
    """n samples whose fft2 has the per-frequency mean and std given in `stats` (see module doc)."""
    mean_re, std_re = stats["mean_re"], stats["std_re"]
    mean_im, std_im = stats["mean_im"], stats["std_im"]
    device = device or mean_re.device
    c, h, w = mean_re.shape
    boost = torch.where(_self_mirror_mask(h, w), 1.0, 2.0 ** 0.5).to(device=device, dtype=mean_re.dtype)
    shape = (n, c, h, w)
    re = mean_re.to(device) + std_re.to(device) * boost * torch.randn(
        shape, generator=generator, device=device, dtype=mean_re.dtype)
    im = mean_im.to(device) + std_im.to(device) * boost * torch.randn(
        shape, generator=generator, device=device, dtype=mean_re.dtype)
    return torch.fft.ifft2(torch.complex(re, im)).real.float()


@register_noise("fft")
class FFTNoise(NoiseSource):
    """FFT noise. stats='dataset': statistics fitted once on `data` (a fixed sample of the training
    set). stats='batch': fitted on each current real batch; without a batch (evaluation) it falls
    back to the dataset statistics, so `data` is always required."""

    def __init__(self, shape, data: Optional[torch.Tensor] = None, stats: str = "dataset",
                 device="cpu", **_):
        if len(shape) != 3:
            raise ValueError(f"noise: 'fft' needs image data (C, H, W), got shape {tuple(shape)}")
        if stats not in ("dataset", "batch"):
            raise ValueError(f"noise.fft_stats: unknown value {stats!r}; allowed: dataset, batch")
        if data is None:
            raise ValueError("noise: 'fft' needs a data sample to fit its statistics")
        self.shape = tuple(shape)
        self.mode = stats
        self.stats = {k: v.to(device) for k, v in fft_stats(data).items()}
        self.device = torch.device(device)

    def sample(self, n, batch=None, generator=None):
        if self.mode == "batch" and batch is not None:
            return sample_fft(fft_stats(batch), n, generator, device=batch.device)
        dev = batch.device if batch is not None else self.device
        return sample_fft(self.stats, n, generator, device=dev)

    def to(self, device):
        self.device = torch.device(device)
        self.stats = {k: v.to(device) for k, v in self.stats.items()}
        return self


def build_noise(name: str, shape, **kw) -> NoiseSource:
    if name not in NOISES:
        raise ValueError(f"noise: unknown value {name!r}; allowed: {', '.join(sorted(NOISES))}")
    return NOISES[name](shape, **kw)
