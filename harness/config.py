"""The trial config: the single source of every default (nanoGPT's one-place defaults, typed).

The CLI flags, the sweep YAML keys and the MLflow params are all derived from `TrialConfig`:
flat dotted keys (`loss.lambda_tight`) address its leaves. An unknown key or an out-of-range value
is a `ConfigError` whose one-line message names the key and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ign.config import BUILTIN_MODELS, BUILTIN_TOYS, LossConfig

TOYS = BUILTIN_TOYS

DatasetName = Literal["mnist", "celeba64", "folder", "ring8", "moons"]


class ConfigError(ValueError):
    """A bad config value: the message is one line naming the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: Optional[str] = None                  # registry name; None = by data set (mnist: dcgan28, faces: dcgan64, toys: mlp2d)
    width: int = Field(64, ge=1)                # dcgan: feature maps of the first encoder conv (Table 1: 64)
    latent: int = Field(512, ge=1)              # dcgan: channels of the 1x1 code (Table 1: 512)
    hidden: int = Field(256, ge=1)              # mlp2d: hidden units
    depth: int = Field(4, ge=1)                 # mlp2d: hidden layers


class DataConfig(_Section):
    dataset: DatasetName = "mnist"             # mnist | celeba64 | folder | ring8 | moons
    root: Optional[str] = None                  # data root; None = ../shared/data (folder: the image folder)
    download: bool = False                      # torchvision may download MNIST (needs internet)
    image_size: int = Field(64, ge=8)           # celeba64/folder: centre-crop and resize to this
    limit: Optional[int] = Field(None, ge=1)    # use only the first N training examples (smoke runs)


class NoiseConfig(_Section):
    name: Literal["gaussian", "fft"] = "gaussian"       # z ~ N(0, I), or FFT noise with data statistics (§2.3)
    fft_stats: Literal["dataset", "batch"] = "dataset"  # FFT statistics: a fixed training sample, or each real batch
    fft_samples: int = Field(2048, ge=2)                 # size of that fixed sample


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)               # Adam step size (Table 1)
    beta1: float = Field(0.5, ge=0, lt=1)       # Adam β1 (Table 1)
    beta2: float = Field(0.999, ge=0, lt=1)     # Adam β2 (Table 1)
    schedule: Literal["constant", "cosine"] = "constant"  # lr over training: constant (paper) or cosine decay to 0


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)              # optimizer steps (Table 1: 1000 iterations)
    batch_size: int = Field(256, ge=2)          # Table 1: 256 (BN needs at least 2)
    log_every: int = Field(10, ge=1)            # report losses every N steps
    ckpt_every: int = Field(200, ge=1)          # checkpoint every N steps (and at the end)


class EvalConfig(_Section):
    k: int = Field(3, ge=1)                     # evaluate f^1 .. f^k
    n_samples: Optional[int] = Field(None, ge=2)    # generated samples per k; None = 10000 on GPU, 1000 on CPU
    n_reference: Optional[int] = Field(None, ge=2)  # real reference samples; None = as n_samples
    extractors: list[Literal["inception", "mnist"]] = ["mnist"]  # feature extractors for FID/KID/PR/IS
    every: int = Field(0, ge=0)                 # evaluate every N steps too (0 = only at the end); ASHA needs it
    bn_mode: Literal["train", "eval", "both"] = "train"  # BN at evaluation: batch stats, running stats, or both
    batch_size: int = Field(250, ge=2)          # generation / feature batch size
    seed: int = 1234                            # the fixed evaluation noise
    grid: int = Field(64, ge=0)                 # samples in the f^1..f^k PNG grid (0 = none)
    project: list[Literal["noise", "grayscale", "sketch", "mask"]] = []  # projection tasks measured at the end (issue 6)
    project_n: int = Field(500, ge=2)           # held-out images per projection task


class TrialConfig(_Section):
    preset: Optional[str] = None                # name of the preset this config started from (recorded)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    noise: NoiseConfig = NoiseConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0                               # seeds weights, data order and noise
    device: str = "auto"                        # auto = cuda if available, else cpu; or cpu, cuda, cuda:1

    @model_validator(mode="after")
    def _consistent(self):
        name = self.model.name
        if name is not None and name not in BUILTIN_MODELS:
            from ign.models import MODELS  # a model registered at run time: needs the registry (torch)
            if name not in MODELS:
                raise ValueError(f"model.name: unknown value {name!r}; allowed: {', '.join(sorted(MODELS))}")
        toy = self.data.dataset in TOYS
        if toy and self.noise.name == "fft":
            raise ValueError("noise.name: 'fft' needs image data; toy data sets allow: gaussian")
        if self.model_name() == "mlp2d" and not toy:
            raise ValueError(f"model.name: 'mlp2d' is for toy data; for {self.data.dataset} allowed: dcgan28, dcgan64")
        if toy and self.model_name() != "mlp2d":
            raise ValueError(f"model.name: {self.model_name()!r} cannot model 2-D toy data; allowed: mlp2d")
        if toy and self.eval.project:
            raise ValueError("eval.project: projection needs image data; toy data sets allow: []")
        if self.data.dataset == "folder" and not self.data.root:
            raise ValueError("data.root: required for dataset 'folder' (a folder of images)")
        return self

    def model_name(self) -> str:
        return self.model.name or DEFAULT_MODEL[self.data.dataset]

    def model_kwargs(self) -> dict[str, Any]:
        name = self.model_name()
        if name == "mlp2d":
            return {"hidden": self.model.hidden, "depth": self.model.depth}
        return {"width": self.model.width, "latent": self.model.latent}

    def resolved_device(self) -> "torch.device":
        return resolve_device(self.device)

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    def run_key(self) -> str:
        """A short hash of everything that shapes the training trajectory (not budget or logging),
        so re-running a command with more steps resumes the same run."""
        d = self.flat()
        for k in ("train.steps", "train.log_every", "train.ckpt_every", "device") + tuple(
                k for k in d if k.startswith("eval.")):
            d.pop(k, None)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


DEFAULT_MODEL = {"mnist": "dcgan28", "celeba64": "dcgan64", "folder": "dcgan64",
                 "ring8": "mlp2d", "moons": "mlp2d"}

# Presets: short diffs from the defaults above, each with its reason (EDM2-style table).
PRESETS: dict[str, dict[str, Any]] = {
    # Paper Table 1, CelebA: the defaults already are Table 1; faces are evaluated with Inception.
    "celeba-table1": {"data.dataset": "celeba64", "eval.extractors": ["inception"]},
    # Source Code 1, the MNIST code: MSE, λ = 1 / 1 / 0.1, no clamp. Batch 64 and a 32-wide model
    # keep a CPU run to minutes; lr 2e-4 (DCGAN's) converges in that budget where 1e-4 is slower.
    "mnist-code": {"data.dataset": "mnist", "loss.lambda_rec": 1.0, "loss.lambda_idem": 1.0,
                   "loss.lambda_tight": 0.1, "loss.distance": "l2", "loss.clamp_ratio": None,
                   "train.batch_size": 64, "model.width": 32, "model.latent": 128, "optim.lr": 2e-4},
    # 2-D toys (Theorem 1): an MLP, L2, a light clamped tightness term; big batches are cheap here.
    # Measured on the ring: λt 0.1 covers all 8 modes around step 600 and then collapses to 5-6;
    # λt 0.05 with the clamp keeps 8 through step 800 (3 seeds).
    "toy": {"data.dataset": "ring8", "loss.lambda_rec": 1.0, "loss.lambda_idem": 1.0,
            "loss.lambda_tight": 0.05, "loss.distance": "l2", "loss.clamp_ratio": 1.5,
            "model.hidden": 256, "model.depth": 3, "train.batch_size": 256, "optim.lr": 1e-3,
            "train.steps": 800, "train.ckpt_every": 400, "eval.n_samples": 2000, "eval.grid": 1000},
}
PRESET_FOR_DATASET = {"mnist": "mnist-code", "celeba64": "celeba-table1", "folder": "celeba-table1",
                      "ring8": "toy", "moons": "toy"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = v
    return out


def leaf_keys() -> dict[str, Any]:
    """Every settable flat key with its default (derived from the config classes)."""
    return TrialConfig().flat()


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        allowed = sorted(k.split(".", section.count(".") + 1 if section else 0)[-1]
                         for k in leaf_keys() if k.startswith(section + ".") or not section)
        allowed = sorted({a.split(".")[0] for a in allowed})
        return f"{loc}: unknown key; allowed: {', '.join(allowed)}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ":" in msg.split(" ")[0]:
            return msg
    inp = err.get("input")
    got = f" (got {inp!r})" if inp is not None and not isinstance(inp, dict) else ""
    return f"{loc}: {msg}{got}"


def build_config(overrides: Optional[dict[str, Any]] = None, preset: Optional[str] = "auto") -> TrialConfig:
    """TrialConfig from flat dotted overrides on top of a preset.

    preset="auto" picks the preset for the data set named in the overrides (or the default data
    set); None applies no preset. Raises ConfigError (one line, names the key) on bad input."""
    overrides = dict(overrides or {})
    if preset == "auto":
        ds = overrides.get("data.dataset", DataConfig().dataset)
        preset = PRESET_FOR_DATASET.get(ds)
    flat: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown value {preset!r}; allowed: {', '.join(PRESETS)}")
        flat.update(PRESETS[preset])
        flat["preset"] = preset
    flat.update(overrides)
    known = leaf_keys()
    for key in flat:
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint} (see `ign-bench train --help` for all keys)")
    try:
        return TrialConfig.model_validate(unflatten(flat))
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def parse_value(text: str) -> Any:
    """A CLI/env string as a typed value: JSON when it parses (1e-4, true, null, [..]), else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        if "," in text:  # mnist,inception -> a list
            return [parse_value(t) for t in text.split(",")]
        return text


def resolve_device(device: str) -> "torch.device":
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: unknown value {device!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available; allowed: auto, cpu")
    return dev
