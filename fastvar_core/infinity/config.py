"""Infinity transformer configuration, detected from a state dict's keys and shapes alone.

The released checkpoints carry no config file: depth, width, heads, text width, bits per token and
the block layout all follow from tensor names and shapes (docs/infinity.md §2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

TEXT_MAXLEN = 512  # rows of cfg_uncond in the official model (T5 max length, docs/infinity.md §1.3)
NORM_EPS = 1e-6
PATCHIFY_BITS = 56  # Infinity-8B: 14-bit VAE codes, 2x2 spatial patchify -> 56 bits per token (docs/infinity.md §1.3)

_BLOCK_KEY = re.compile(r"^(?:block_chunks\.(\d+)\.module\.(\d+)|blocks\.(\d+))\.(.+)$")

# (depth, embed_dim) -> official name (docs/infinity.md §1.3; the 125M as the infinity_layer12 preset, docs/infinity.md §1.2)
_KNOWN = {(32, 2048): "Infinity-2B", (40, 3584): "Infinity-8B", (12, 768): "Infinity-125M"}


@dataclass(frozen=True)
class InfinityConfig:
    """Architecture of an Infinity transformer (official switches fixed as in docs/infinity.md §1.3)."""

    depth: int
    embed_dim: int
    num_heads: int
    ffn_hidden: int
    text_channels: int  # T5 feature width (2048 for flan-t5-xl)
    bits: int  # d: bits per transformer token (head outputs 2d logits)
    block_chunks: int  # checkpoint layout: K > 1 -> 'block_chunks.{c}.module.{j}.', 1 -> 'blocks.{i}.'
    cfg_uncond_rows: int  # rows of cfg_uncond in the checkpoint (the model always holds TEXT_MAXLEN)
    pool_heads: int  # heads of the text attention pool (text_proj_for_sos)
    lvl_embed_rows: int  # maximum number of scales
    patchify: bool  # 2x2 spatial patchify between transformer tokens and VAE latent (8B)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def pool_head_dim(self) -> int:
        return self.embed_dim // self.pool_heads

    @property
    def vae_bits(self) -> int:
        """d_v: channels of the VAE latent (bits / 4 with patchify)."""
        return self.bits // 4 if self.patchify else self.bits

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def name(self) -> str:
        """Best guess of the released model this is ('custom' when the sizes match none)."""
        return _KNOWN.get((self.depth, self.embed_dim), "custom")

    def describe(self) -> str:
        layout = (f"{self.block_chunks} block chunks of {self.blocks_per_chunk}" if self.block_chunks > 1
                  else "plain blocks")
        bits = f"{self.bits} bits/token" + (f" (2x2 patchify of {self.vae_bits}-bit VAE codes)" if self.patchify else "")
        return (
            f"{self.name}: depth {self.depth}, width {self.embed_dim}, {self.num_heads} heads of {self.head_dim}, "
            f"FFN {self.ffn_hidden}, text width {self.text_channels}, {bits}, {layout}, "
            f"{self.lvl_embed_rows} scale embeddings, text pool {self.pool_heads} heads, "
            f"cfg_uncond {self.cfg_uncond_rows} rows"
        )

    __str__ = describe

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "state dict",
                        patchify: bool | None = None) -> InfinityConfig:
        """Detect the configuration from tensor names and shapes; ``patchify=None`` guesses it from d = 56."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in state:
                raise CheckpointError(f"{source}: missing tensor '{key}', which every Infinity transformer has.")
            s = tuple(state[key].shape)
            if len(s) != ndim:
                raise CheckpointError(f"{source}: tensor '{key}' should be {ndim}-D, found shape {s}.")
            return s

        embed_dim, bits = shape("word_embed.weight", 2)
        text_channels = shape("text_norm.weight", 1)[0]
        cfg_rows = shape("cfg_uncond", 2)[0]
        pool = shape("text_proj_for_sos.ca.mat_q", 3)
        lvl_rows = shape("lvl_embed.weight", 2)[0]
        head_rows = shape("head.weight", 2)[0]
        if head_rows != 2 * bits:
            raise CheckpointError(
                f"{source}: 'head.weight' has {head_rows} rows but 'word_embed.weight' takes {bits} bits; "
                f"expected 2 x {bits} = {2 * bits} bit logits (only bit-label Infinity models are supported)."
            )

        chunks: dict[int, set[int]] = {}
        plain: set[int] = set()
        for key in state:
            m = _BLOCK_KEY.match(key)
            if m is None:
                continue
            if m[3] is None:
                chunks.setdefault(int(m[1]), set()).add(int(m[2]))
            else:
                plain.add(int(m[3]))
        if chunks and plain:
            raise CheckpointError(f"{source}: mixes 'block_chunks.*' and 'blocks.*' keys; expected one layout.")
        if chunks:
            per = {len(js) for js in chunks.values()}
            if sorted(chunks) != list(range(len(chunks))) or len(per) != 1 or any(
                    js != set(range(len(js))) for js in chunks.values()):
                raise CheckpointError(
                    f"{source}: 'block_chunks.{{c}}.module.{{j}}' keys should number chunks 0..K-1 with the same "
                    f"blocks 0..n-1 each; found { {c: sorted(js) for c, js in sorted(chunks.items())} }."
                )
            block_chunks, depth = len(chunks), len(chunks) * per.pop()
            first = "block_chunks.0.module.0."
        elif plain:
            if sorted(plain) != list(range(len(plain))):
                raise CheckpointError(f"{source}: 'blocks.{{i}}' keys should number layers 0..D-1, found {sorted(plain)}.")
            block_chunks, depth = 1, len(plain)
            first = "blocks.0."
        else:
            raise CheckpointError(f"{source}: no transformer blocks ('block_chunks.*' or 'blocks.*' keys) found.")

        heads_key = first + "sa.scale_mul_1H11"
        if heads_key not in state:
            raise CheckpointError(f"{source}: missing tensor '{heads_key}' (per-head attention scale).")
        num_heads = state[heads_key].numel()
        ffn_hidden = shape(first + "ffn.fc1.weight", 2)[0]
        if embed_dim % num_heads:
            raise CheckpointError(f"{source}: width {embed_dim} is not divisible by {num_heads} heads.")
        if pool[0] != 1 or pool[1] * pool[2] != embed_dim:
            raise CheckpointError(
                f"{source}: 'text_proj_for_sos.ca.mat_q' should be (1, heads, {embed_dim}/heads), found {pool}."
            )
        if patchify is None:
            patchify = bits == PATCHIFY_BITS
        if patchify and bits % 4:
            raise CheckpointError(f"{source}: spatial patchify needs bits divisible by 4, found {bits}.")
        return cls(
            depth=depth, embed_dim=embed_dim, num_heads=num_heads, ffn_hidden=ffn_hidden,
            text_channels=text_channels, bits=bits, block_chunks=block_chunks, cfg_uncond_rows=cfg_rows,
            pool_heads=pool[1], lvl_embed_rows=lvl_rows, patchify=bool(patchify),
        )


# The releases' configs (docs/infinity.md §1.3), for the schedule chart and cost predictions without weights.
INFINITY_2B = InfinityConfig(
    depth=32, embed_dim=2048, num_heads=16, ffn_hidden=8192, text_channels=2048, bits=32, block_chunks=8,
    cfg_uncond_rows=TEXT_MAXLEN, pool_heads=16, lvl_embed_rows=15, patchify=False,
)
INFINITY_8B = InfinityConfig(
    depth=40, embed_dim=3584, num_heads=28, ffn_hidden=14336, text_channels=2048, bits=PATCHIFY_BITS, block_chunks=8,
    cfg_uncond_rows=TEXT_MAXLEN, pool_heads=16, lvl_embed_rows=15, patchify=True,
)
