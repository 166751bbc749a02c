"""Infinity's BSQ VAE decoder: summed bit codes (B, d_v, h, w) -> RGB image (B, 3, p*h, p*w).

Only the decoder is built; it is all that text-to-image needs (docs/infinity.md §6.2).
Module names follow the official ``vae`` state dict (docs/infinity.md §6.3), so a filtered checkpoint loads with
``strict=True``. The configuration (bits, widths, levels, patch size) is read from the tensor
shapes alone (:class:`BSQVAEConfig`), so every released VAE (d16/d24/d32/d32reg/d64, stride 16;
d56_f8_14_patchify, stride 8) loads without hyper-parameters.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops as nnops
from ..checkpoint import check_state_keys, flatten_tensors, key_examples, load_file, prefer_safetensors
from ..errors import CheckpointError, ConfigError, IncompatibleModelsError
from ..vae_layout import (TileCallback, add_shortcut, banded_norm_silu_conv, blend_spans, decoder_layout,
                          group_norm, one_pass, tile_sides, upsample_conv)

NUM_GROUPS = 32  # GroupNorm(32, eps 1e-6) everywhere (docs/infinity.md §6.1)
NORM_EPS = 1e-6
COARSE_UPSAMPLINGS = 2  # tiled decode: levels up to 4x the latent resolution run on the whole latent


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class BSQVAEConfig:
    """Decoder hyper-parameters, detected from a state dict by :meth:`from_state_dict`."""

    codebook_dim: int  # d_v: latent channels = bits per VAE position
    base_ch: int  # width of the full-resolution level (official 128)
    ch_mult: tuple[int, ...]  # width of level i = base_ch * ch_mult[i]
    num_res_blocks: int  # ResnetBlocks per decoder level (official 3 = encoder's 2 + 1)
    patch_size: int  # pixels per latent position = 2 ** (number of upsampling levels)
    has_encoder: bool  # the file also held encoder weights (not loaded)

    @property
    def upsample_levels(self) -> range:
        """Levels whose blocks are followed by a x2 upsampling: 1 .. log2(patch_size) (docs/infinity.md §6.2)."""
        return range(1, int(math.log2(self.patch_size)) + 1)

    def describe(self) -> str:
        mult = ",".join(str(m) for m in self.ch_mult)
        return (
            f"BSQ VAE decoder: d_v={self.codebook_dim} bits, patch {self.patch_size}, "
            f"base_ch {self.base_ch}, ch_mult [{mult}], {self.num_res_blocks} res-blocks per level, "
            f"encoder {'present (not loaded)' if self.has_encoder else 'absent'}"
        )

    __str__ = describe

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "state dict") -> "BSQVAEConfig":
        """Read the configuration from decoder keys and shapes (wrapped or unwrapped spelling, docs/infinity.md §6.4).

        ``ch_mult[0]`` is taken to be 1 (true for every released VAE): ``base_ch`` is the width of
        level 0 and the other multipliers are relative to it.
        """

        def weight(module: str) -> torch.Tensor:
            for key in (f"{module}.conv.weight", f"{module}.weight"):
                if key in state:
                    return state[key]
            raise CheckpointError(
                f"{source}: missing decoder tensor '{module}.conv.weight' (or '{module}.weight'); "
                f"found {len(state)} decoder tensors: the file is not a complete Infinity BSQ VAE."
            )

        conv_in = weight("decoder.conv_in")  # (C_top, d_v, 3, 3)
        if conv_in.ndim != 4:
            raise CheckpointError(
                f"{source}: 'decoder.conv_in' weight should be 4-D (out, d_v, 3, 3), found shape {tuple(conv_in.shape)}."
            )
        codebook_dim = conv_in.shape[1]

        blocks: dict[int, set[int]] = {}
        upsample: set[int] = set()
        for key in state:
            if m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.", key):
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
            elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.", key):
                upsample.add(int(m[1]))
        levels = sorted(blocks)
        if not levels or levels != list(range(len(levels))):
            raise CheckpointError(
                f"{source}: expected decoder levels 'decoder.up.0.block.*' ... 'decoder.up.N.block.*' "
                f"numbered from 0 without gaps, found levels {levels}."
            )
        counts = {len(b) for b in blocks.values()}
        if len(counts) != 1 or any(b != set(range(len(b))) for b in blocks.values()):
            raise CheckpointError(
                f"{source}: every decoder level should have the same res-blocks 0..n-1, found "
                f"{ {lvl: sorted(b) for lvl, b in blocks.items()} }."
            )
        num_ups = len(upsample)
        if upsample != set(range(1, num_ups + 1)) or num_ups >= len(levels):
            raise CheckpointError(
                f"{source}: expected 'decoder.up.{{i}}.upsample' on levels 1..k (k < {len(levels)}), "
                f"found it on levels {sorted(upsample)}."
            )

        widths = [weight(f"decoder.up.{lvl}.block.0.conv1").shape[0] for lvl in levels]
        base_ch = widths[0]
        if any(w % base_ch for w in widths):
            raise CheckpointError(f"{source}: decoder level widths {widths} are not multiples of the level-0 width {base_ch}.")
        if any(w % NUM_GROUPS for w in widths) or conv_in.shape[0] % NUM_GROUPS:
            raise CheckpointError(
                f"{source}: decoder widths {widths} (conv_in {conv_in.shape[0]}) must be multiples of "
                f"{NUM_GROUPS} (GroupNorm groups)."
            )
        return cls(
            codebook_dim=codebook_dim,
            base_ch=base_ch,
            ch_mult=tuple(w // base_ch for w in widths),
            num_res_blocks=counts.pop(),
            patch_size=2**num_ups,
            has_encoder=any(k.startswith("encoder.") for k in state),
        )


# ----------------------------------------------------------------------------------------------
# modules (names match checkpoint keys: every conv / norm is wrapped as `.conv` / `.norm`)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: saves one full-resolution temporary per call.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Conv(nn.Module):
    """A Conv2d stored as ``.conv`` (official wrapper, keys ``<name>.conv.weight``)."""

    def __init__(self, cin: int, cout: int, kernel: int, operations=None):
        super().__init__()
        self.conv = nnops.resolve(operations).Conv2d(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm(32, eps 1e-6) stored as ``.norm``; statistics in float32 for half inputs (docs/infinity.md §3.7)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.ops = nnops.resolve(operations)
        self.norm = self.ops.GroupNorm(NUM_GROUPS, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: ``x`` is dead after this; normalise it in place where it is float32."""
        n = self.norm
        w, b = nnops.cast_bias_weight(n, torch.float32, x.device, self.ops)
        return group_norm(x.float(), n.num_groups, w, b, n.eps, inplace).to(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, operations=None):
        super().__init__()
        ops = operations
        self.norm1, self.conv1 = Norm(cin, ops), Conv(cin, cout, 3, ops)
        self.norm2, self.conv2 = Norm(cout, ops), Conv(cout, cout, 3, ops)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Full-resolution maps alive at once: x, the conv output and one scratch (the input of conv1 is
        # normalised in row bands, conv2's in place).
        h = banded_norm_silu_conv(self.norm1.norm, self.conv1.conv, x, self.norm1.ops)
        if h is None:
            h = self.conv1(_swish(self.norm1(x)))
        h2 = banded_norm_silu_conv(self.norm2.norm, self.conv2.conv, h, self.norm2.ops, inplace=True)
        h = self.conv2(_swish(self.norm2(h, inplace=not torch.is_grad_enabled()))) if h2 is None else h2
        # conv backward does not need its output, so adding in place is safe
        if hasattr(self, "nin_shortcut"):
            return add_shortcut(h, x, self.nin_shortcut.conv, self.norm1.ops)  # in row bands: no map-sized output
        return h.add_(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv, as four 2x2 phase convolutions (:func:`vae_layout.upsample_conv`)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.ops = nnops.resolve(operations)
        self.conv = Conv(channels, channels, 3, self.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = nnops.cast_bias_weight(self.conv.conv, torch.float32, x.device, self.ops)  # (C, C, 3, 3), (C,)
        return upsample_conv(x, w, bias)


class MidBlock(nn.Module):
    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, operations)
        self.block_2 = ResnetBlock(channels, channels, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool, operations=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, operations) for j in range(num_blocks))
        if upsample:
            self.upsample = Upsample(cout, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class BSQDecoder(nn.Module):
    """conv_in -> mid -> levels n-1 .. 0 (res-blocks, x2 upsample) -> norm -> swish -> conv_out (docs/infinity.md §6.2)."""

    def __init__(self, config: BSQVAEConfig, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        widths = [config.base_ch * m for m in config.ch_mult]
        self.conv_in = Conv(config.codebook_dim, widths[-1], 3, ops)
        self.mid = MidBlock(widths[-1], ops)
        cins = widths[1:] + widths[-1:]  # level i receives the width of level i+1 (top: conv_in)
        self.up = nn.ModuleList(
            UpLevel(cins[i], widths[i], config.num_res_blocks, i in config.upsample_levels, ops)
            for i in range(len(widths))
        )
        self.norm_out = Norm(widths[0], ops)
        self.conv_out = Conv(widths[0], 3, 3, ops)

    @staticmethod
    def _run_levels(h: torch.Tensor, levels: list[UpLevel]) -> torch.Tensor:
        """``levels`` one block at a time in this frame, so a level's input is freed after its first block
        (calling ``level(h)`` would keep it alive through the whole level)."""
        for level in levels:
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return h

    def coarse(self, z: torch.Tensor, levels: int) -> torch.Tensor:
        """conv_in, mid and the top ``levels`` resolution levels: (B, d_v, h, w) -> features."""
        h = self.mid(self.conv_in(decoder_layout(z)))  # (B, C_top, h, w)
        return self._run_levels(h, list(self.up)[::-1][:levels])  # x2 per upsampling level

    def fine(self, h: torch.Tensor, levels: int) -> torch.Tensor:
        """The levels below the top ``levels``, then norm_out, swish, conv_out: features -> RGB (unclamped)."""
        h = self._run_levels(h, list(self.up)[::-1][levels:])
        out = banded_norm_silu_conv(self.norm_out.norm, self.conv_out.conv, h, self.norm_out.ops)
        if out is not None:
            return out  # (B, 3, ., .)
        return self.conv_out(_swish(self.norm_out(h, inplace=not torch.is_grad_enabled())))  # (B, 3, ., .)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fine(self.coarse(z, 0), 0)  # (B, 3, p*h, p*w), unclamped


# ----------------------------------------------------------------------------------------------
# the autoencoder (decoder only)


class InfinityVAE(nn.Module):
    """Decoder half of Infinity's BSQ VAE; ``state_dict()`` keys are the official ``decoder.*`` keys."""

    def __init__(self, config: BSQVAEConfig, operations=None):
        """``operations``: the layer namespace (fastvar_core.ops; None: torch.nn)."""
        super().__init__()
        self.config = config
        self.decoder = BSQDecoder(config, operations)
        # Empty; follows .to(): its device and dtype are the decoder's compute device and dtype, whatever
        # the namespace's layers store (not in the state dict).
        self.register_buffer("compute_anchor", torch.empty(0), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _latent(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim == 5 and codes.shape[2] == 1:
            codes = codes.squeeze(2)  # (B, d_v, 1, h, w) -> (B, d_v, h, w)
        if codes.ndim != 4 or codes.shape[1] != self.config.codebook_dim:
            raise IncompatibleModelsError(
                f"VAE decode: expected summed codes of shape (B, {self.config.codebook_dim}, h, w) or "
                f"(B, {self.config.codebook_dim}, 1, h, w) for this {self.config.codebook_dim}-bit VAE, "
                f"found {tuple(codes.shape)}: the transformer and the VAE do not belong together."
            )
        p = self.compute_anchor
        return codes.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, tile: int | tuple[int, int] | None = None, overlap: int | None = None,
               callback: TileCallback | None = None) -> torch.Tensor:
        """Decode summed codes (B, d_v, h, w) or (B, d_v, 1, h, w) to RGB in [-1, 1], (B, 3, p*h, p*w).

        ``tile=None`` decodes in one pass (the reference behaviour). ``callback(done, total)`` runs after
        each tile (once for a one-pass decode); raising from it stops the decode.

        ``tile=n`` (or ``(rows, columns)``) bounds memory for large images (2K and up). The low-resolution part of the decoder
        (conv_in, mid and the levels up to 4x the latent resolution: small tensors, but most of the
        receptive field) runs on the whole latent; the high-resolution levels, which hold almost all
        of the memory, run on overlapping tiles of n x n latent positions, one at a time. Neighbours
        share ``overlap`` positions (default min(8, n // 2), n the shorter tile side); each tile is weighted 0 on the outer
        quarter of an overlap (it sees the tile's own zero padding there) and ramps linearly to 1 over
        the middle half. Peak memory then follows the tile size, not the image size.

        Trade-off: the GroupNorm statistics of the tiled levels are computed per tile instead of over
        the whole image, so tiles can differ slightly in tone from the full decode (the ramps hide
        seams); bigger tiles bring the result closer. The context cut at tile borders is negligible
        from an overlap of 8 latent positions (given the full image's statistics the blend reproduces
        the full decode to ~1e-5; with overlap 4, to ~4e-3). Overlaps cost some recomputation.
        """
        z = self._latent(codes)
        if tile is None:
            return one_pass(self.decoder, z, callback).clamp_(-1, 1)
        th, tw = tile_sides(tile)
        overlap = min(8, min(th, tw) // 2) if overlap is None else overlap
        if min(th, tw) < 1 or not 0 <= overlap < min(th, tw):
            raise ConfigError(
                f"VAE tiled decode: expected tile >= 1 and 0 <= overlap < tile (latent positions), "
                f"found tile={tile}, overlap={overlap}."
            )
        return self._decode_tiled(z, (th, tw), overlap, callback).clamp_(-1, 1)

    def _coarse_split(self) -> tuple[int, int]:
        """(levels run on the whole latent, their upscaling factor): up to COARSE_UPSAMPLINGS x2 steps."""
        levels, factor = 0, 1
        for i in reversed(range(len(self.decoder.up))):
            if factor == 2**COARSE_UPSAMPLINGS:
                break
            levels += 1
            factor *= 2 if i in self.config.upsample_levels else 1
        return levels, factor

    def _decode_tiled(self, z: torch.Tensor, tile: tuple[int, int], overlap: int,
                      callback: TileCallback | None) -> torch.Tensor:
        B, _, h, w = z.shape
        th, tw = tile
        if h <= th and w <= tw:
            return one_pass(self.decoder, z, callback)
        levels, f = self._coarse_split()
        feats = self.decoder.coarse(z, levels)  # (B, C, f*h, f*w)
        q = self.config.patch_size // f  # output pixels per feature position
        rows = blend_spans(f * h, f * th, f * overlap, q, z.device)
        cols = blend_spans(f * w, f * tw, f * overlap, q, z.device)
        out = z.new_zeros(B, 3, q * f * h, q * f * w, dtype=torch.float32)
        for i, (y0, y1, wy) in enumerate(rows):
            for j, (x0, x1, wx) in enumerate(cols):
                pixels = self.decoder.fine(decoder_layout(feats[:, :, y0:y1, x0:x1]), levels).float()  # (B, 3, q*th, q*tw)
                out[:, :, q * y0 : q * y1, q * x0 : q * x1].add_(pixels.mul_(wy[:, None] * wx[None, :]))
                if callback is not None:
                    callback(i * len(cols) + j + 1, len(rows) * len(cols))
        return out.to(z.dtype)

    def to_image(self, codes: torch.Tensor, tile: int | tuple[int, int] | None = None, overlap: int | None = None,
                 callback: TileCallback | None = None) -> torch.Tensor:
        """Decode to a float32 RGB image batch (B, H, W, 3) in [0, 1] (no BGR flip, no uint8 rounding)."""
        x = self.decode(codes, tile=tile, overlap=overlap, callback=callback)
        return x.float().add_(1).div_(2).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# loading

_TRANSFORMER_HINTS = ("block_chunks.", "blocks.", "word_embed.", "lvl_embed.", "cfg_uncond", "head.weight")


def extract_vae_state(obj: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Unwrap the official container (``{'vae': state_dict, ...}``, or its flattened safetensors form
    with ``vae.`` prefixes) or accept a bare state dict; return only the ``decoder.*`` / ``encoder.*``
    tensors. Raises :class:`CheckpointError` when there is no decoder at all."""
    if isinstance(obj.get("vae"), Mapping):
        state = flatten_tensors(obj["vae"])
    else:
        state = flatten_tensors(obj)
        if any(k.startswith("vae.decoder.") for k in state):
            state = {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}
    kept = {k: v for k, v in state.items() if k.startswith(("decoder.", "encoder."))}
    if not any(k.startswith("decoder.") for k in kept):
        hint = ""
        if any(k.startswith(_TRANSFORMER_HINTS) for k in state):
            hint = " It looks like an Infinity transformer checkpoint: load it as the transformer, not as the VAE."
        raise CheckpointError(
            f"{source} is not an Infinity BSQ VAE checkpoint: expected a dict with key 'vae' (official "
            f"container) or a state dict with 'decoder.*' keys such as 'decoder.conv_in.conv.weight'; "
            f"found top-level entries {key_examples(obj.keys())} and {len(state)} tensors such as "
            f"{key_examples(state.keys())}.{hint}"
        )
    attention = sorted(k for k in kept if k.startswith("decoder.") and ".attn" in k)
    if attention:
        raise CheckpointError(
            f"{source} is not an Infinity BSQ VAE: its decoder has attention blocks ({key_examples(attention, 2)}), "
            f"as in the HART/VAR or Stable Diffusion VAEs; Infinity's BSQ VAE decoder has none."
        )
    return kept


def filter_vae_state_dict(state: Mapping[str, torch.Tensor], model: InfinityVAE, source: str) -> dict[str, torch.Tensor]:
    """Map checkpoint keys to ``model``'s decoder keys and validate them (timm-style filter step).

    Accepts the wrapped (``decoder.conv_in.conv.weight``) and unwrapped (``decoder.conv_in.weight``)
    spellings (docs/infinity.md §6.4); encoder tensors are dropped. Missing, unexpected or mis-shaped tensors raise
    :class:`CheckpointError` naming the file and a few keys.
    """
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        if key not in expected:
            stem, _, leaf = key.rpartition(".")
            key = next((c for c in (f"{stem}.conv.{leaf}", f"{stem}.norm.{leaf}") if c in expected), key)
        if key in expected:
            out[key] = value
        else:
            unexpected.append(key)
    check_state_keys(expected, [*out, *unexpected],
                     f"{source}: the decoder weights do not match the detected configuration ({model.config})")
    bad = [
        f"'{k}' {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in out.items() if v.shape != expected[k].shape
    ]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} decoder tensors have the wrong shape for the detected configuration "
            f"({model.config}): {', '.join(bad[:4])}."
        )
    return out


def build_infinity_vae(obj: Mapping[str, object], source: str = "state dict", operations=None) -> InfinityVAE:
    """Build a float32 CPU :class:`InfinityVAE` (eval mode, frozen) from an already read checkpoint object;
    ``operations``: the layer namespace (fastvar_core.ops)."""
    state = extract_vae_state(obj, source)
    config = BSQVAEConfig.from_state_dict(state, source)
    model = InfinityVAE(config, operations)
    model.load_state_dict(filter_vae_state_dict(state, model, source), strict=True)
    return model.eval().requires_grad_(False)


def load_infinity_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    operations=None,
) -> InfinityVAE:
    """Load an official Infinity VAE file (``.pth`` with ``{'vae': ...}``, a safetensors twin, or a
    bare decoder state dict) with a config detected from its shapes; strict load, eval mode."""
    path = prefer_safetensors(path)
    model = build_infinity_vae(load_file(path), source=f"'{Path(path)}'", operations=operations)
    return model.to(device=device, dtype=dtype)
