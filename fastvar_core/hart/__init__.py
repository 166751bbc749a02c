"""HART (hart-0.7b-1024px): transformer, residual diffusion head, VAE, text conditioning, sampler."""

from .config import HARTConfig, detect_hart_config
from .diffusion import ResidualDiffusion, RespacedSchedule
from .loader import check_text_width, check_vae_matches, find_llm_folder, load_hart_model
from .model import HARTTransformer
from .sampler import latent_preview, sample_hart
from .text import HARTTextConditioning, load_qwen_encoder
from .vae import HARTVAE, load_hart_vae

__all__ = [
    "HARTConfig",
    "HARTTextConditioning",
    "HARTTransformer",
    "HARTVAE",
    "ResidualDiffusion",
    "RespacedSchedule",
    "check_text_width",
    "check_vae_matches",
    "detect_hart_config",
    "find_llm_folder",
    "latent_preview",
    "load_hart_model",
    "load_hart_vae",
    "load_qwen_encoder",
    "sample_hart",
]
