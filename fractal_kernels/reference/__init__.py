"""Pure-PyTorch reference math of every op: the single source of truth the kernels are tested against."""
from fractal_kernels.reference.attention import attention_reference
from fractal_kernels.reference.pixel_sampling import (
    cfg_filter_mix_reference,
    inverse_cdf_draw,
    pixel_probs_reference,
)

__all__ = ["attention_reference", "cfg_filter_mix_reference", "inverse_cdf_draw", "pixel_probs_reference"]
