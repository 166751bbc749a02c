"""Random-weight models of the released architectures, for the demo and the benchmark.

Same module shapes as the official models (width, heads, FFN, text width, bits, VAE widths); depth can
be reduced. Weights are drawn from PyTorch's default initialisers under a fixed seed, so timings and
memory are those of the real shapes while no download is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastvar_core.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """The shape of a released model (defaults) or a custom one (``--width --heads --depth ...``)."""

    family: str
    name: str
    depth: int
    width: int
    heads: int
    text_channels: int
    bits: int = 32  # Infinity: bits per token (56 for 8B with patchify)
    vae_base: int = 128
    vae_mult: tuple[int, ...] = (1, 2, 4, 4, 4)

    def with_overrides(self, depth=None, width=None, heads=None, text_channels=None) -> ModelShape:
        return replace(self, depth=depth or self.depth, width=width or self.width, heads=heads or self.heads,
                       text_channels=text_channels or self.text_channels)


SHAPES = {
    "infinity-2b": ModelShape("infinity", "Infinity-2B", 32, 2048, 16, 2048),
    "infinity-8b": ModelShape("infinity", "Infinity-8B", 40, 3584, 28, 2048, bits=56, vae_mult=(1, 2, 4, 4)),
    "hart-0.7b": ModelShape("hart", "HART-0.7B", 24, 1536, 24, 1536, vae_base=160, vae_mult=(1, 1, 2, 2, 4)),
}


def _ffn_hidden(shape: ModelShape) -> int:
    if shape.family == "hart":  # SwiGLU width rule (docs/hart.md §2.1)
        return int((shape.width * 4 * 2 / 3 + 255) // 256 * 256)
    return round(shape.width * 4 / 256) * 256  # Infinity rule, half-to-even like Python's round


def build_transformer(shape: ModelShape, seed: int = 0, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """A random-weight transformer of ``shape``."""
    torch.manual_seed(seed)
    if shape.width % shape.heads:
        raise ConfigError(f"width {shape.width} is not divisible by heads {shape.heads}")
    if shape.family == "infinity":
        from fastvar_core.infinity.config import InfinityConfig
        from fastvar_core.infinity.model import InfinityTransformer

        config = InfinityConfig(
            depth=shape.depth, embed_dim=shape.width, num_heads=shape.heads, ffn_hidden=_ffn_hidden(shape),
            text_channels=shape.text_channels, bits=shape.bits, block_chunks=1, cfg_uncond_rows=512,
            pool_heads=shape.text_channels // 128 if shape.width <= 4096 else shape.text_channels // 64,
            lvl_embed_rows=15, patchify=shape.bits == 56,
        )
        model = InfinityTransformer(config)
        with torch.no_grad():  # the official init of these is non-zero; zeros would make a degenerate demo
            model.cfg_uncond.normal_(0, 1.0 / shape.text_channels**0.5)
            model.pos_start.normal_(0, 0.02)
    else:
        from fastvar_core.hart.config import HARTConfig
        from fastvar_core.hart.model import HARTTransformer

        config = HARTConfig(
            embed_dim=shape.width, depth=shape.depth, num_heads=shape.heads, ffn_hidden=_ffn_hidden(shape),
            norm_eps=1e-6, context_token=300, context_dim=shape.text_channels,
            patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), attn_l2_norm=False,
            use_context_norm=True, use_timestep_embed=True, diff_width=1024, diff_depth=6,
            num_sampling_steps="8", vocab_size=4096, vae_channels=32,
        )
        model = HARTTransformer(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_vae(shape: ModelShape, seed: int = 1, device="cpu") -> torch.nn.Module:
    """A random-weight VAE (decoder side) of the family's released widths."""
    torch.manual_seed(seed)
    if shape.family == "infinity":
        from fastvar_core.infinity.vae import BSQVAEConfig, InfinityVAE

        patch = 2 ** (len(shape.vae_mult) - 1)
        config = BSQVAEConfig(codebook_dim=shape.bits // 4 if shape.bits == 56 else shape.bits, base_ch=shape.vae_base,
                              ch_mult=shape.vae_mult, num_res_blocks=3, patch_size=patch, has_encoder=False)
        vae = InfinityVAE(config)
    else:
        from fastvar_core.hart.vae import HARTVAE, HARTVAEConfig

        vae = HARTVAE(HARTVAEConfig(ch=shape.vae_base, ch_mult=shape.vae_mult))
    return vae.to(device).eval().requires_grad_(False)


def random_conditioning(shape: ModelShape, batch: int = 1, tokens: int = 24, seed: int = 2, device="cpu"):
    """Text features standing in for the text encoder's output (no encoder weights needed)."""
    g = torch.Generator().manual_seed(seed)
    if shape.family == "infinity":
        from fastvar_core.infinity.text import InfinityTextConditioning

        kv = torch.randn(batch * tokens, shape.text_channels, generator=g)
        cu = torch.arange(0, (batch + 1) * tokens, tokens, dtype=torch.int32)
        return InfinityTextConditioning(kv, [tokens] * batch, cu, tokens, ["random"] * batch).to(device)
    from fastvar_core.hart.text import HARTTextConditioning

    mask = torch.zeros(batch, 300, dtype=torch.bool)
    mask[:, :tokens] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    context = torch.randn(batch, 300, shape.text_channels, generator=g)
    return HARTTextConditioning(context, mask, positions, ["random"] * batch).to(device)
