"""Infinity as a :class:`fastvar_core.families.Family` (docs/architecture.md §2, docs/infinity.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..cost import ArchSpec, decode_memory, decode_steps
from ..errors import ConfigError
from ..families import Family, register
from ..pruning import PresetTable
from ..schedules import INFINITY_BUDGETS, infinity_schedule, infinity_schedule_for_size
from ..vae_layout import tile_sides
from .config import INFINITY_2B, INFINITY_8B, InfinityConfig

# Cross-attention keys per row assumed when the prompt is unknown (the schedule chart); a run counts its
# longest prompt's T5 tokens instead (docs/fastvar.md §4.6).
CHART_TEXT_TOKENS = 32
# The released VAE decoders' widths (docs/infinity.md §1.3): base width and per-level multipliers; the 8B's
# patchify VAE has one upsampling level less (stride 8).
VAE_BASE_WIDTH = 128
VAE_CH_MULT = {False: (1, 2, 4, 4, 4), True: (1, 2, 4, 4)}


def preset_layers(depth: int) -> tuple[int, int]:
    """The official fixed range 3..27, clipped, for D <= 32; else 3 .. D-5 (docs/fastvar.md §4.4)."""
    if depth <= 32:
        return (min(3, depth), max(min(3, depth), min(depth, 28)))
    return (3, depth - 4)


class InfinityFamily(Family):
    name = "infinity"
    label = "Infinity"
    text_encoder_name = "flan-t5-xl"
    negative_prompt = True
    has_tau = True
    pixel_budgets = (*INFINITY_BUDGETS, "2K")
    can_skip = True
    attention_sublayer = "sa"
    defaults = {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}
    # Official 1:1 1M: 32->0.4, 40->0.5, skip 48 and 64, cache 24 (docs/fastvar.md); 2k is our own choice.
    presets = PresetTable(
        scales_1024=13,
        tails={
            "paper": ({4: 0.4, 3: 0.5, 2: 1.0, 1: 1.0}, 5),
            "2k": ({6: 0.4, 5: 0.5, 4: 0.5, 3: 0.75, 2: 0.75, 1: 1.0}, 7),
        },
        layers=preset_layers,
    )

    def load_model(self, path, *, device, dtype, operations=None, weight_dtype=None):
        from .loader import load_infinity_model

        return load_infinity_model(path, device=device, dtype=dtype, operations=operations, weight_dtype=weight_dtype)

    def load_vae(self, path, *, device, dtype=torch.float32, operations=None):
        from .vae import load_infinity_vae

        return load_infinity_vae(path, device=device, dtype=dtype, operations=operations)

    def load_text_encoder(self, path, tokenizer=None, *, device, dtype=None):
        from .text import load_t5_encoder

        return load_t5_encoder(path, tokenizer, device=device, **({} if dtype is None else {"dtype": dtype}))

    def check_pair(self, model, vae):
        self.check_vae_config(model, vae.config)

    def read_vae_config(self, path):
        from ..checkpoint import read_shapes
        from .vae import BSQVAEConfig, extract_vae_state

        source = f"'{path}'"
        return BSQVAEConfig.from_state_dict(extract_vae_state(read_shapes(path), source), source)

    def check_vae_config(self, model, config):
        from .loader import check_vae_matches

        check_vae_matches(model, config)

    def text_width(self, model):
        return model.config.text_channels

    def arch_spec(self, config, cond=None):
        # Cross-attention keys per row: the conditioning's longest prompt, else CHART_TEXT_TOKENS. Self-attention
        # (SelfAttention.forward): the normalised input and q/k/v in the compute dtype; q and k normalised and
        # rotated in float32, both rotations made before the normalised ones go, and a half-size temporary.
        return ArchSpec(depth=config.depth, width=config.embed_dim, ffn_hidden=config.ffn_hidden, ffn_matrices=2,
                        text_tokens=cond.max_seqlen if cond is not None else CHART_TEXT_TOKENS,
                        head_outputs=2 * config.bits, token_channels=config.bits, heads=config.num_heads,
                        attention_hidden=4, attention_float32=5)

    def compute_dtype(self, model):
        return model.block_dtype

    def detect_config(self, path):
        from ..checkpoint import read_shapes
        from .loader import unwrap_container

        source = f"'{Path(path).name}'"
        return InfinityConfig.from_state_dict(unwrap_container(read_shapes(path), source), source)

    def released_configs(self):
        return {"Infinity-2B": INFINITY_2B, "Infinity-8B": INFINITY_8B}

    def sizes(self, config):
        return {"depth": config.depth, "width": config.embed_dim, "heads": config.num_heads,
                "text_width": config.text_channels}

    def with_sizes(self, config, *, depth=None, width=None, heads=None, text_width=None):
        depth, width = depth or config.depth, width or config.embed_dim
        heads, text_width = heads or config.num_heads, text_width or config.text_channels
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        pool_heads = text_width // 128 if width <= 4096 else text_width // 64  # the text pool's head rule
        if pool_heads < 1 or width % pool_heads:
            raise ConfigError(f"text width {text_width}: Infinity pools the text with text_width/128 heads, so it "
                              f"must be >= 128 with the width ({width}) divisible by that count")
        return replace(config, depth=depth, embed_dim=width, num_heads=heads, text_channels=text_width,
                       ffn_hidden=round(width * 4 / 256) * 256,  # half-to-even, like the official round()
                       pool_heads=pool_heads, block_chunks=config.block_chunks if depth % config.block_chunks == 0 else 1)

    def random_model(self, config):
        from .model import InfinityTransformer

        model = InfinityTransformer(config)
        with torch.no_grad():  # the official init of these is non-zero; zeros would make a degenerate model
            model.cfg_uncond.normal_(0, 1.0 / config.text_channels**0.5)
            model.pos_start.normal_(0, 0.02)
        return model.eval().requires_grad_(False)

    def random_vae(self, config, base_width=None):
        from .vae import BSQVAEConfig, InfinityVAE

        mult = VAE_CH_MULT[config.patchify]
        vae = InfinityVAE(BSQVAEConfig(codebook_dim=config.vae_bits, base_ch=base_width or VAE_BASE_WIDTH,
                                       ch_mult=mult, num_res_blocks=3, patch_size=2 ** (len(mult) - 1),
                                       has_encoder=False))
        return vae.eval().requires_grad_(False)

    def random_text_encoder(self, depth=None):
        from .text import random_t5_encoder

        return random_t5_encoder(depth)

    def vae_upscale(self, vae):
        return vae.config.patch_size

    def random_conditioning(self, config, batch, tokens, generator):
        from .text import InfinityTextConditioning

        kv = torch.randn(batch * tokens, config.text_channels, generator=generator)
        cu = torch.arange(0, (batch + 1) * tokens, tokens, dtype=torch.int32)
        return InfinityTextConditioning(kv, [tokens] * batch, cu, tokens, ["random"] * batch)

    def to_compute_dtype(self, model, dtype):
        return model.set_block_dtype(dtype)

    def schedule_for_size(self, model, width, height, budget):
        if width is None and height is None:
            return infinity_schedule(1.0, budget or "1M")
        return infinity_schedule_for_size(width, height, budget)

    def schedule_for_template(self, model, aspect, budget):
        return infinity_schedule(aspect, budget)

    def chart_models(self):
        return {
            "Infinity-2B 1024px": (INFINITY_2B, lambda: infinity_schedule(1.0, "1M")),
            "Infinity-2B 2K": (INFINITY_2B, lambda: infinity_schedule(1.0, "2K")),
            "Infinity-8B 1024px": (INFINITY_8B, lambda: infinity_schedule(1.0, "1M")),
        }

    def run_sampler(self, model, vae, cond, schedule, *, negative, knobs, seed, pruning, callback, hooks):
        from .sampler import sample_infinity

        return sample_infinity(model, cond, schedule, vae=vae, negative=negative, seed=seed, pruning=pruning,
                               callback=callback, hooks=hooks, **knobs)

    def decode_tile(self, vae, latent):
        # The 8B's f8 patchify VAE decodes a latent twice the token map's side (docs/infinity.md §1.3).
        limit = 64 * (2 if vae.config.patch_size == 8 else 1)
        return 64 if max(latent.shape[-2:]) > limit else None

    def decode_memory(self, vae, latent_shape, tile, banded=False):
        c = vae.config
        b, (h, w) = latent_shape[0], latent_shape[-2:]
        widths = [c.base_ch * m for m in c.ch_mult]
        th, tw = tile_sides(tile) if tile else (h, w)
        if th >= h and tw >= w:
            return decode_memory(widths, c.patch_size, (h, w), batch=b, banded=banded)
        from .vae import COARSE_UPSAMPLINGS

        # InfinityVAE._decode_tiled: the levels up to COARSE_UPSAMPLINGS x2 steps run on the whole latent, the rest
        # on one tile at a time, beside the coarse output and the float32 image.
        steps = decode_steps(widths, c.patch_size)
        ups = [k for k, (kind, _) in enumerate(steps) if kind == "upsample"][:COARSE_UPSAMPLINGS]
        split = ups[-1] + 1 if len(ups) == COARSE_UPSAMPLINGS else len(steps) - 1
        f = 2 ** len(ups)
        coarse = decode_memory(widths, c.patch_size, (h, w), batch=b, steps=slice(0, split), banded=banded)
        fine = decode_memory(widths, c.patch_size, (min(th, h), min(tw, w)), batch=b, steps=slice(split, None),
                             banded=banded)
        width = widths[steps[split - 1][1]] if split else widths[-1]  # the coarse output's channels
        held = b * (width * f * f + 3 * c.patch_size**2) * h * w * 4
        return max(coarse, fine + held)


INFINITY = register(InfinityFamily())
