"""Model registry: the autoencoders f that IGN trains to be idempotent.

`dcgan64` is Table 1 of the paper (appendix C) exactly; `dcgan28` is the same family sized for
28x28x1 MNIST; `mlp2d` is an MLP for the 2-D toy distributions where Theorem 1 is checked.
Every model maps a batch to a batch of the same shape.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def build_model(name: str, **kw) -> nn.Module:
    """Build a registered model by name; keyword arguments go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"model: unknown value {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kw)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Table 1: isotropic Gaussian N(0, 0.02) weights and zero biases. BN scales are weights too:
    DCGAN (and the IGN code) draw them from N(1, 0.02) so BN starts near identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def _enc(cin, cout, k, s, p, bn, slope):
    layers = [nn.Conv2d(cin, cout, k, s, p)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(slope))
    return layers


def _dec(cin, cout, k, s, p):
    return [nn.ConvTranspose2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU()]


class DCGANAutoencoder(nn.Module):
    """Encoder = DCGAN discriminator without its head; decoder = DCGAN generator (paper §2.3)."""

    def __init__(self, encoder: list[nn.Module], decoder: list[nn.Module], shape: tuple[int, ...]):
        super().__init__()
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.shape = tuple(shape)  # (C, H, W) of one sample; used to check checkpoints vs data
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model("dcgan64")
def dcgan64(channels: int = 3, width: int = 64, latent: int = 512, slope: float = 0.2) -> nn.Module:
    """Table 1 (CelebA, 3x64x64): encoder 64-128-256-512 convs 4x4/2/1, a 4x4/1/0 conv to a
    512x1x1 code (no BN, no nonlinearity); decoder mirrors it with transposed convs, BN + ReLU,
    and a tanh output. BN on every layer but the first encoder conv, the code and the output."""
    w = width
    enc = [
        *_enc(channels, w, 4, 2, 1, False, slope),      # 64 -> 32
        *_enc(w, 2 * w, 4, 2, 1, True, slope),          # 32 -> 16
        *_enc(2 * w, 4 * w, 4, 2, 1, True, slope),      # 16 -> 8
        *_enc(4 * w, 8 * w, 4, 2, 1, True, slope),      # 8 -> 4
        nn.Conv2d(8 * w, latent, 4, 1, 0),              # 4 -> 1, no BN, no nonlinearity
    ]
    dec = [
        *_dec(latent, 8 * w, 4, 1, 0),                  # 1 -> 4
        *_dec(8 * w, 4 * w, 4, 2, 1),                   # 4 -> 8
        *_dec(4 * w, 2 * w, 4, 2, 1),                   # 8 -> 16
        *_dec(2 * w, w, 4, 2, 1),                       # 16 -> 32
        nn.ConvTranspose2d(w, channels, 4, 2, 1),       # 32 -> 64
        nn.Tanh(),
    ]
    return DCGANAutoencoder(enc, dec, (channels, 64, 64))


@register_model("dcgan28")
def dcgan28(channels: int = 1, width: int = 64, latent: int = 512, slope: float = 0.2) -> nn.Module:
    """The dcgan64 family for 1x28x28: one stride-2 stage fewer, and a 3x3/2/1 conv takes 7 -> 4
    so the same 4x4/1/0 conv reaches a 1x1 code; the decoder mirrors it (3x3/2/1 transposed 4 -> 7)."""
    w = width
    enc = [
        *_enc(channels, w, 4, 2, 1, False, slope),      # 28 -> 14
        *_enc(w, 2 * w, 4, 2, 1, True, slope),          # 14 -> 7
        *_enc(2 * w, 4 * w, 3, 2, 1, True, slope),      # 7 -> 4
        nn.Conv2d(4 * w, latent, 4, 1, 0),              # 4 -> 1
    ]
    dec = [
        *_dec(latent, 4 * w, 4, 1, 0),                  # 1 -> 4
        *_dec(4 * w, 2 * w, 3, 2, 1),                   # 4 -> 7
        *_dec(2 * w, w, 4, 2, 1),                       # 7 -> 14
        nn.ConvTranspose2d(w, channels, 4, 2, 1),       # 14 -> 28
        nn.Tanh(),
    ]
    return DCGANAutoencoder(enc, dec, (channels, 28, 28))


class MLP2d(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        d = dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)
        self.shape = (dim,)
        # Default (Kaiming-uniform) init on purpose: N(0, 0.02) makes a deep MLP start as the zero
        # map, which is a degenerate fixed point for the idempotence term.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp2d")
def mlp2d(dim: int = 2, hidden: int = 256, depth: int = 4) -> nn.Module:
    """MLP for the 2-D toy distributions (no BN, so f is a deterministic function of each point)."""
    return MLP2d(dim, hidden, depth)
