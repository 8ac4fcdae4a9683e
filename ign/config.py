"""Torch-free pieces of the library: the loss config and the names of the built-in registries.

Kept apart so that validating a config or a sweep spec (which must answer in well under a second)
never imports torch. The registries themselves live with the code (models.py, toy.py) and the
tests check that these names match them.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_MODELS = ("dcgan28", "dcgan64", "mlp2d")
BUILTIN_TOYS = ("ring8", "moons")


class LossConfig(BaseModel):
    """Loss weights and the choices the paper leaves open. Defaults: paper Table 1 (CelebA)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lambda_rec: float = Field(20.0, ge=0)        # λr, weight of D(f(x), x)
    lambda_idem: float = Field(20.0, ge=0)       # λi, weight of the idempotence term (eq. 8)
    lambda_tight: float = Field(2.5, ge=0)       # λt, weight of the tightness term (eq. 10)
    distance: Literal["l1", "l2"] = "l1"         # D: mean |a-b| (Table 1) or mean (a-b)^2 (code listing)
    clamp_ratio: Optional[float] = Field(1.5, ge=1.0)  # a in eq. 14; None = no clamp (code listing)
    clamp_reference: Literal["rec", "drift"] = "rec"   # r: batch D(f(x),x), or per-sample D(f(z),z)
    tight_warmup: int = Field(0, ge=0)           # steps of linear λt warm-up from 0; 0 = none
