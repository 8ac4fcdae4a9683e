"""IGN (Shocher et al. 2023) as a small, pure PyTorch library: no Ray, MLflow or torch-fidelity."""
from .degrade import DEGRADATIONS, add_noise, degrade, grayscale, mask, sketch
from .losses import LossConfig, ign_losses, lambda_tight_at, per_sample_distance, train_step
from .models import MODELS, build_model, register_model
from .noise import NOISES, build_noise, fft_stats, sample_fft
from .sampling import apply_k, arithmetic, interpolate
from .toy import TOYS, energy_distance, mode_coverage, sliced_wasserstein, toy_sample

__all__ = [
    "DEGRADATIONS", "add_noise", "degrade", "grayscale", "mask", "sketch",
    "LossConfig", "ign_losses", "lambda_tight_at", "per_sample_distance", "train_step",
    "MODELS", "build_model", "register_model",
    "NOISES", "build_noise", "fft_stats", "sample_fft",
    "apply_k", "arithmetic", "interpolate",
    "TOYS", "energy_distance", "mode_coverage", "sliced_wasserstein", "toy_sample",
]
