"""FractalGen models, faithful to the public reference (LTH14/fractalgen), as a library."""
from fractal_models.fractalgen import FractalGen
from fractal_models.configs import (
    CONFIG_NAMES,
    TINY_CONFIG_NAMES,
    build_model,
    config_kwargs,
    fractalar_in64,
    fractalmar_base_in256,
    fractalmar_huge_in256,
    fractalmar_in64,
    fractalmar_large_in256,
)
from fractal_models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fractal_models.hub import PRETRAINED, DownloadError, download_weights, from_pretrained
from fractal_models.likelihood import nll_bits_per_dim
from fractal_models.rng import manual_seed
from fractal_models.sampling import generate, uniform_draw

__all__ = [
    "FractalGen", "CONFIG_NAMES", "TINY_CONFIG_NAMES", "build_model", "config_kwargs", "fractalar_in64", "fractalmar_in64",
    "fractalmar_base_in256", "fractalmar_large_in256", "fractalmar_huge_in256", "CheckpointError",
    "load_checkpoint", "save_checkpoint", "nll_bits_per_dim", "generate", "uniform_draw", "manual_seed",
    "PRETRAINED", "DownloadError", "download_weights", "from_pretrained",
]
