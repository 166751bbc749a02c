"""HART as a :class:`fastvar_core.families.Family` (docs/architecture.md §2, docs/hart.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..cost import ArchSpec, decode_memory
from ..errors import ConfigError
from ..families import Family, register
from ..pruning import PresetTable
from ..schedules import HART_BUDGETS, hart_schedule, hart_schedule_for_size
from ..vae_layout import tile_sides
from .config import HART_0_7B, llama_ffn_hidden
from .diffusion import DIFFUSION_CHUNK_ROWS, diffusion_flops_per_token, diffusion_values_per_token


class HARTFamily(Family):
    name = "hart"
    label = "HART"
    text_encoder_name = "Qwen2-VL-1.5B-Instruct"
    negative_prompt = False  # the unconditional branch is an empty context
    has_tau = False
    pixel_budgets = HART_BUDGETS
    can_skip = False  # every scale feeds the next; the last carries the residual diffusion (docs/hart.md)
    min_cache_scale = 1  # scale 0 runs the text tokens, not a token map
    attention_sublayer = "attn"
    defaults = {"cfg": 4.5, "tau": None, "top_k": None, "top_p": 0.0}
    # Official: 48->0.5, 64->0.75, cache 36, all layers (docs/fastvar.md); 2k extends it by one scale.
    presets = PresetTable(
        scales_1024=14,
        tails={"paper": ({2: 0.5, 1: 0.75}, 3), "2k": ({3: 0.5, 2: 0.5, 1: 0.75}, 4)},
        layers=lambda depth: (0, depth),
    )
    # top_k values that mean "the official 600 (scales 0-6) / 300 rule": None, 0 and Infinity's
    # default 900, so one top-k widget serves both families.
    OFFICIAL_TOP_K = (None, 0, 900)

    def load_model(self, path, *, device, dtype, operations=None, weight_dtype=None):
        from .loader import load_hart_model

        return load_hart_model(path, device=device, dtype=dtype, operations=operations, weight_dtype=weight_dtype)

    def load_vae(self, path, *, device, dtype=torch.float32, operations=None):
        from .vae import load_hart_vae

        return load_hart_vae(path, device=device, dtype=dtype, operations=operations)

    def load_text_encoder(self, path, tokenizer=None, *, device, dtype=None):
        from .text import load_qwen_encoder

        return load_qwen_encoder(path, device=device, **({} if dtype is None else {"dtype": dtype}))

    def check_pair(self, model, vae):
        from .loader import check_vae_matches

        check_vae_matches(model, vae)

    def text_width(self, model):
        return model.config.context_dim

    has_default_vae = True

    def default_vae(self, model_path):
        return hart_tokenizer_folder(model_path)

    def sampler_needs_vae(self):
        return True

    def released_configs(self):
        return {"HART-0.7B": HART_0_7B}

    def sizes(self, config):
        return {"depth": config.depth, "width": config.embed_dim, "heads": config.num_heads,
                "text_width": config.context_dim}

    def with_sizes(self, config, *, depth=None, width=None, heads=None, text_width=None):
        depth, width = depth or config.depth, width or config.embed_dim
        heads = heads or config.num_heads
        if width % heads or (width // heads) % 4:
            raise ConfigError(f"width {width} and heads {heads}: the head size must be a whole multiple of 4 (2D RoPE)")
        return replace(config, depth=depth, embed_dim=width, num_heads=heads, ffn_hidden=llama_ffn_hidden(width, 4.0),
                       context_dim=text_width or config.context_dim)

    def random_model(self, config):
        from .model import HARTTransformer

        return HARTTransformer(config).eval().requires_grad_(False)

    def random_vae(self, config, base_width=None):
        from .vae import HARTVAE, HARTVAEConfig

        vae_config = HARTVAEConfig(vocab_size=config.vocab_size, z_channels=config.vae_channels)
        if base_width:
            vae_config = replace(vae_config, ch=base_width)
        return HARTVAE(vae_config).eval().requires_grad_(False)

    def random_text_encoder(self, depth=None):
        from .text import random_qwen_encoder

        return random_qwen_encoder(depth)

    def vae_upscale(self, vae):
        return vae.config.downsample

    def random_conditioning(self, config, batch, tokens, generator):
        from .text import HARTTextConditioning

        mask = torch.zeros(batch, config.context_token, dtype=torch.bool)
        mask[:, :tokens] = True
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        context = torch.randn(batch, config.context_token, config.context_dim, generator=generator)
        return HARTTextConditioning(context, mask, positions, ["random"] * batch)

    def schedule_for_size(self, model, width, height, budget):
        patch_nums = tuple(model.config.patch_nums)
        if width is None and height is None:
            return hart_schedule(patch_nums, 1.0, budget or "1M")
        return hart_schedule_for_size(width, height, budget, patch_nums)

    def schedule_for_template(self, model, aspect, budget):
        return hart_schedule(tuple(model.config.patch_nums), aspect, budget)

    def arch_spec(self, config, cond=None):
        from .sampler import HEAD_CHUNK_VALUES

        # Scale 0 runs the fixed-length text context, whatever the prompt.
        return ArchSpec(depth=config.depth, width=config.embed_dim, ffn_hidden=config.ffn_hidden, ffn_matrices=3,
                        prefix_tokens=config.context_token, head_outputs=config.vocab_size,
                        token_channels=config.vae_channels, last_scale_flops_per_token=diffusion_flops_per_token(config),
                        heads=config.num_heads, last_scale_values_per_token=diffusion_values_per_token(config),
                        last_scale_chunk=DIFFUSION_CHUNK_ROWS, head_chunk=HEAD_CHUNK_VALUES)

    def decode_memory(self, vae, latent_shape, tile, banded=False):
        c = vae.config
        b, (h, w) = latent_shape[0], latent_shape[-2:]
        widths = [c.ch * m for m in c.ch_mult]
        th, tw = tile_sides(tile) if tile else (h, w)
        if th >= h and tw >= w:
            return decode_memory(widths, c.downsample, (h, w), batch=b, banded=banded)
        # HARTVAE.decode_tiled: the coarse part (the top level, its up-sampling and the next level's blocks) runs on
        # the whole latent, the rest on one tile at a time, beside the coarse output and the float32 image.
        split = 3 if len(widths) > 1 else 1  # decode_steps: blocks top, upsample top, blocks top-1 | ...
        coarse = decode_memory(widths, c.downsample, (h, w), batch=b, steps=slice(0, split), banded=banded)
        fine = decode_memory(widths, c.downsample, (min(th, h), min(tw, w)), batch=b, steps=slice(split, None),
                             banded=banded)
        f = 2 if len(widths) > 1 else 1
        held = b * (widths[max(len(widths) - 2, 0)] * f * f + 3 * c.downsample**2) * h * w * 4
        return max(coarse, fine + held)

    def chart_models(self):
        return {
            "HART-0.7B 1024px": (HART_0_7B, lambda: hart_schedule()),
            "HART-0.7B 2K": (HART_0_7B, lambda: hart_schedule(budget="2K")),
        }

    def sampler_top_k(self, top_k):
        return None if top_k in self.OFFICIAL_TOP_K else top_k

    def run_sampler(self, model, vae, cond, schedule, *, negative, knobs, seed, pruning, callback, hooks):
        from .sampler import sample_hart

        return sample_hart(model, cond, schedule, vae=vae, negative=negative, seed=seed, pruning=pruning,
                           callback=callback, hooks=hooks, **knobs)


def hart_tokenizer_folder(model) -> Path:
    """HART's VAE is the sibling tokenizer/ folder of llm/ (or tokenizer/ inside the release folder)."""
    path = Path(model)
    for candidate in (path / "tokenizer", path.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no tokenizer/ folder next to '{path}': pass the HART VAE folder explicitly")


HART = register(HARTFamily())
