"""IGN (Shocher et al. 2023) as a small, pure PyTorch library: no Ray, MLflow or torch-fidelity.

Names are loaded on first use (PEP 562), so `import ign.config` stays torch-free and fast.
"""
import importlib

_EXPORTS = {
    # (the function ign.degrade.degrade is not re-exported: its name is the submodule's)
    "degrade": ("DEGRADATIONS", "add_noise", "grayscale", "mask", "sketch"),
    "losses": ("ign_losses", "lambda_tight_at", "per_sample_distance", "train_step"),
    "config": ("LossConfig",),
    "models": ("MODELS", "build_model", "register_model"),
    "noise": ("NOISES", "build_noise", "fft_stats", "sample_fft"),
    "sampling": ("apply_k", "arithmetic", "interpolate"),
    "toy": ("TOYS", "energy_distance", "mode_coverage", "sliced_wasserstein", "toy_sample"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'ign' has no attribute {name!r}")


def __dir__():
    return __all__
