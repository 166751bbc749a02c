"""Infinity (FoundationVision) text-to-image: transformer, loader, sampler with FastVAR, BSQ VAE decoder.

The T5 text conditioning lives in ``fastvar_core.infinity.text``.
"""

from .config import InfinityConfig
from .loader import (
    build_infinity_model,
    check_text_width,
    check_vae_matches,
    filter_state_dict,
    load_infinity_model,
)
from .model import InfinityTransformer, TextContext
from .rope import ScaleRope, axis_positions, scale_positions
from .sampler import latent_preview, sample_bits, sample_infinity
from .vae import InfinityVAE, load_infinity_vae

__all__ = [
    "InfinityConfig",
    "InfinityTransformer",
    "InfinityVAE",
    "ScaleRope",
    "TextContext",
    "axis_positions",
    "build_infinity_model",
    "check_text_width",
    "check_vae_matches",
    "filter_state_dict",
    "latent_preview",
    "load_infinity_model",
    "load_infinity_vae",
    "sample_bits",
    "sample_infinity",
    "scale_positions",
]
