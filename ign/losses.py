"""The IGN objective (paper §2.1–2.3, eqs. 8, 10, 11, 14) as one pure function, and one update.

Gradient paths, exactly as eq. 13:
- L_rec   = D(f_θ(x), x).
- L_idem  = D(f_θ′(f_θ(z)), f_θ(z)): θ only through the inner f; the outer f is a frozen copy θ′
  that the chain rule passes through (it gets no parameter gradient).
- L_tight = −D(f_θ(f_θ′(z)), f_θ′(z)): θ only through the outer f; the inner f(z) is detached.
- Smooth clamp (eq. 14): L_tight ← tanh(L̃_tight / (a·r)) · a·r, with r the clamp reference.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from .config import LossConfig  # noqa: F401  (re-exported: ign.losses.LossConfig)


def per_sample_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """D per sample: the mean over all non-batch dimensions of |a-b| (l1) or (a-b)^2 (l2)."""
    d = a - b
    d = d.abs() if distance == "l1" else d.square()
    return d.flatten(1).mean(1)


def lambda_tight_at(cfg: LossConfig, step: Optional[int]) -> float:
    """λt after the linear warm-up: a pure function of the step (None = fully warmed up)."""
    if not cfg.tight_warmup or step is None:
        return cfg.lambda_tight
    return cfg.lambda_tight * min(1.0, step / cfg.tight_warmup)


def frozen(f: nn.Module):
    """f_θ′ for one step: same values as f, no parameter gradients, chain rule passes through.

    Equivalent to the paper's `f_copy.load_state_dict(f.state_dict())` without copying: the
    parameters are detached views. Buffers (BN running statistics) are cloned so that, as with the
    paper's copy, the frozen pass does not update f's running statistics."""
    params = {k: v.detach() for k, v in f.named_parameters()}
    buffers = {k: v.clone() for k, v in f.named_buffers()}
    state = {**params, **buffers}
    return lambda inp: functional_call(f, state, (inp,))


def _terms(cfg: LossConfig, x: torch.Tensor, z: torch.Tensor, fx: torch.Tensor, fz: torch.Tensor,
           ffz_idem: torch.Tensor, ffz_tight: torch.Tensor, step: Optional[int]) -> dict[str, torch.Tensor]:
    """The loss dict from the four outputs; which gradient paths exist is the caller's choice of
    what ffz_idem (outer f, θ′) and ffz_tight (outer f, θ, on the detached f(z)) are."""
    rec = per_sample_distance(fx, x, cfg.distance).mean()
    idem = per_sample_distance(ffz_idem, fz, cfg.distance).mean()
    fz_d = fz.detach()
    tight_s = -per_sample_distance(ffz_tight, fz_d, cfg.distance)
    tight_raw = tight_s.mean()
    if cfg.clamp_ratio is not None:
        # The reference is a scale, not a gradient path: letting gradients through it would let the
        # (negative) tightness term reward a worse reconstruction.
        if cfg.clamp_reference == "rec":
            ref = rec.detach()
        else:  # per-sample drift of the noise, D(f(z), z)
            ref = per_sample_distance(fz_d, z, cfg.distance)
        scale = cfg.clamp_ratio * ref + 1e-12
        tight_s = torch.tanh(tight_s / scale) * scale
    tight = tight_s.mean()

    lt = lambda_tight_at(cfg, step)
    loss = cfg.lambda_rec * rec + cfg.lambda_idem * idem + lt * tight
    return {"loss": loss, "rec": rec.detach(), "idem": idem.detach(), "tight": tight.detach(),
            "tight_raw": tight_raw.detach()}


def ign_losses(f: nn.Module, x: torch.Tensor, z: torch.Tensor, cfg: LossConfig,
               step: Optional[int] = None) -> dict[str, torch.Tensor]:
    """IGN losses for a real batch x and a noise batch z (same shape as x).

    Args:
        f: any module mapping a batch to a batch of the same shape.
        x: real data batch.  z: noise batch.
        cfg: LossConfig (or any object with the same attributes).
        step: training step, only used by the λt warm-up.
    Returns a dict of scalar tensors: `loss` (weighted sum, to backpropagate), `rec`, `idem`,
    `tight` (after the clamp, ≤ 0), `tight_raw` (before it), all detached but `loss`.
    """
    fx = f(x)
    fz = f(z)
    # Idempotence: inner f live (θ), outer f frozen (θ′); gradients reach θ through fz only.
    ffz_idem = frozen(f)(fz)
    # Tightness: inner f(z) detached (θ′), outer f live (θ).
    ffz_tight = f(fz.detach())
    return _terms(cfg, x, z, fx, fz, ffz_idem, ffz_tight, step)


def ign_losses_shared(f: nn.Module, x: torch.Tensor, z: torch.Tensor, cfg: LossConfig,
                      step: Optional[int] = None) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """ign_losses with one forward pass of the outer f shared by L_idem and L_tight.

    Both terms apply the outer f, with the same values θ = θ′, to the same values f(z), so one
    pass ff = f(u), u = f(z) detached, gives both (train-mode BN included: same batch, same
    statistics). Only their gradient paths differ, and each needs one half of that pass's
    vector-Jacobian product:
      - L_idem: the INPUT VJP of the outer f, with cotangent ∂(λi·L_idem)/∂ff, handed on to f(z)
        (plus the direct ∂L_idem/∂f(z)); θ′ gets nothing, as with the paper's frozen copy;
      - L_tight: the PARAMETER VJP of the outer f, with cotangent ∂(λt·L_tight)/∂ff; nothing flows
        into the detached f(z).
    The summed parameter gradient is therefore the one of ign_losses' loss, computed with three
    forward passes instead of four and without the weight gradients of the frozen copy or the
    input gradient of the tightness pass. BN running statistics are updated by f(x), f(z), f(f(z))
    in that order, as in the paper's loop (the frozen pass updates none of f's).

    Returns (losses, backward): `losses` as ign_losses (its `loss` has the right value but is
    built on detached copies of ff, so do not backpropagate it), and `backward()`, which
    accumulates ∇θ loss into the parameters' .grad exactly like `losses["loss"].backward()` on
    ign_losses' dict would. Call it at most once.
    """
    fx = f(x)
    fz = f(z)
    u = fz.detach().requires_grad_()
    ff = f(u)
    # Two leaf handles on the same values: one per gradient path.
    ff_idem = ff.detach().requires_grad_()
    ff_tight = ff.detach().requires_grad_()
    out = _terms(cfg, x, z, fx, fz, ff_idem, ff_tight, step)

    def backward() -> None:
        params = [p for p in f.parameters() if p.requires_grad]
        loss = out["loss"]
        g_idem, g_tight = torch.autograd.grad(loss, [ff_idem, ff_tight], retain_graph=True)
        do_idem, do_tight = cfg.lambda_idem != 0, lambda_tight_at(cfg, step) != 0  # else zero VJPs
        roots, cotangents = [loss], [None]
        if do_idem:
            (g_u,) = torch.autograd.grad(ff, u, g_idem, retain_graph=do_tight)
            roots.append(fz)
            cotangents.append(g_u)
        if do_tight:
            ff.backward(g_tight, inputs=params)
        # f(x) and f(z): λr·L_rec, the direct ∂L_idem/∂f(z), and the outer f's input VJP, in one pass.
        torch.autograd.backward(roots, cotangents, inputs=params)

    return out, backward


def train_step(f: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor,
               cfg: LossConfig, step: Optional[int] = None, shared: bool = True) -> dict[str, float]:
    """One optimizer update on (x, z); returns the losses as Python floats.

    shared: compute the gradient with ign_losses_shared (three forward passes, the default: the
    same gradient as ign_losses, see tests/test_bench.py) instead of ign_losses (four).

    Raises FloatingPointError before updating if the loss is not finite, so a diverged trial stops
    at once instead of training on garbage. The model is then as before the call: the forward
    passes have already moved the BN running statistics (towards NaN), so they are restored."""
    f.train()
    saved = [b.clone() for b in f.buffers()]  # BN statistics: a few KB, restored on a rejected step
    if shared:
        out, backward = ign_losses_shared(f, x, z, cfg, step)
    else:
        out = ign_losses(f, x, z, cfg, step)
        backward = out["loss"].backward
    loss = out["loss"]
    if not torch.isfinite(loss):
        with torch.no_grad():
            for b, s in zip(f.buffers(), saved):
                b.copy_(s)
        raise FloatingPointError(f"non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v.item():.4g}" for k, v in out.items()))
    optimizer.zero_grad(set_to_none=True)
    backward()
    optimizer.step()
    return {k: v.item() for k, v in out.items()}
