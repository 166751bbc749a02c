"""HART VAE ("hybrid tokenizer"): the inference half of the official ``tokenizer/`` checkpoint.

Only what text-to-image needs is built: the codebook, the Phi residual convs (``quant_resi``),
``post_quant_conv`` and the decoder (docs/hart.md §4). The encoder, ``quant_conv``, the training
statistics and the PatchGAN discriminator (``disc.*``) are dropped when the checkpoint is filtered.
Parameter names equal the checkpoint keys with the ``vae.`` prefix removed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops as nnops
from ..checkpoint import check_state_keys, flatten_tensors, load_sharded_folder, load_state_dict
from ..errors import CheckpointError, ConfigError, InternalError
from ..vae_layout import (TileCallback, add_shortcut, banded_norm_silu_conv, blend_spans, decoder_layout, norm,
                          one_pass, tile_sides, upsample_conv)

MODEL_TYPE = "hart_autoencoder_with_disc"
KEY_PREFIX = "vae."
# Checkpoint parts that exist for training / encoding only (docs/hart.md §4.1).
UNUSED_PREFIXES = ("encoder.", "quant_conv.", "decoder2.", "post_quant_conv2.", "quantize.ema_vocab_hit_SV")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class HARTVAEConfig:
    """Inference-relevant tokenizer hyper-parameters, read from config.json and checked against the weights."""

    vocab_size: int = 4096  # V, codebook rows
    z_channels: int = 32  # Cvae, latent / codebook width
    ch: int = 160  # decoder base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per level, level 0 = full resolution
    num_res_blocks: int = 2  # each decoder level has num_res_blocks + 1 ResnetBlocks
    quant_conv_ks: int = 3  # kernel of post_quant_conv
    quant_resi: float = 0.5  # Phi residual ratio r (|r| <= 1e-6: Phi is the identity)
    share_quant_resi: int = 4  # K: >= 2 partially shared, 1 one shared conv, 0 one conv per scale
    num_phi: int = 4  # number of Phi convs actually stored (0 when Phi is the identity)
    using_sa: bool = True  # attention after each block of the lowest-resolution level
    using_mid_sa: bool = True  # attention in the middle block

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell along one side (16 for the release)."""
        return 2 ** (len(self.ch_mult) - 1)


_CONFIG_DEFAULTS = HARTVAEConfig()


def _config_value(cfg: dict, name: str, source: str):
    """config.json value with the class default when absent (as transformers does)."""
    value = cfg.get(name, getattr(_CONFIG_DEFAULTS, name))
    kinds = {"ch_mult": ((list, tuple), "a list of integers"), "quant_resi": ((int, float), "a number")}
    kind, described = kinds.get(name, (int, "an integer"))
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{source}: config field '{name}' should be {described}, found {value!r}.")
    return tuple(int(v) for v in value) if name == "ch_mult" else value


def _expect_shape(state: dict, key: str, shape: tuple[int, ...], source: str, why: str) -> None:
    if key not in state:
        raise CheckpointError(f"{source}: tensor 'vae.{key}' is missing (needed for {why}).")
    found = tuple(state[key].shape)
    if found != tuple(shape):
        raise CheckpointError(
            f"{source}: tensor 'vae.{key}' has shape {list(found)}, but config.json ({why}) implies {list(shape)}."
        )


def _child_indices(state: dict, prefix: str) -> set[int]:
    """Integer names directly under ``prefix`` (e.g. the levels of ``decoder.up.``)."""
    found = (re.match(r"(\d+)\.", k[len(prefix):]) for k in state if k.startswith(prefix))
    return {int(m.group(1)) for m in found if m}


def detect_hart_vae_config(cfg: dict, state: dict[str, torch.Tensor], source: str) -> HARTVAEConfig:
    """Build the config from config.json fields and validate every size against the (prefix-free) weights.

    Fields the file does not store (``num_res_blocks``, ``using_sa``, ``using_mid_sa``, the Phi layout)
    are detected from the key names.
    """
    vocab_size = _config_value(cfg, "vocab_size", source)
    z_channels = _config_value(cfg, "z_channels", source)
    ch = _config_value(cfg, "ch", source)
    ch_mult = _config_value(cfg, "ch_mult", source)
    quant_conv_ks = _config_value(cfg, "quant_conv_ks", source)
    quant_resi = float(_config_value(cfg, "quant_resi", source))
    share = _config_value(cfg, "share_quant_resi", source)
    if not ch_mult or min(ch_mult) < 1 or ch < 1 or ch % 32:
        raise CheckpointError(
            f"{source}: ch={ch}, ch_mult={list(ch_mult)} do not describe a decoder (ch must be a positive "
            f"multiple of 32, the GroupNorm group count; multipliers >= 1)."
        )

    _expect_shape(state, "quantize.embedding.weight", (vocab_size, z_channels), source, "vocab_size, z_channels")
    _expect_shape(
        state, "post_quant_conv.weight", (z_channels, z_channels, quant_conv_ks, quant_conv_ks), source,
        "z_channels, quant_conv_ks",
    )
    top = len(ch_mult) - 1
    levels = _child_indices(state, "decoder.up.")
    if levels != set(range(len(ch_mult))):
        raise CheckpointError(
            f"{source}: the decoder has levels {sorted(levels)}, but ch_mult={list(ch_mult)} in config.json "
            f"implies levels 0..{top}."
        )
    _expect_shape(state, "decoder.conv_in.weight", (ch * ch_mult[-1], z_channels, 3, 3), source, "ch, ch_mult[-1]")
    _expect_shape(state, "decoder.conv_out.weight", (3, ch * ch_mult[0], 3, 3), source, "ch, ch_mult[0]")
    for lvl, mult in enumerate(ch_mult):
        _expect_shape(state, f"decoder.up.{lvl}.block.0.conv2.weight", (ch * mult, ch * mult, 3, 3), source,
                      f"ch * ch_mult[{lvl}]")
    blocks = _child_indices(state, f"decoder.up.{top}.block.")
    if not blocks:
        raise CheckpointError(f"{source}: decoder level {top} has no 'block.*' tensors.")
    num_res_blocks = max(blocks)  # a level holds num_res_blocks + 1 ResnetBlocks

    if abs(quant_resi) <= 1e-6:
        num_phi = 0
    elif share >= 2:
        num_phi = share
    elif share == 1:
        num_phi = 1
    elif share == 0:
        num_phi = int(cfg.get("default_qresi_counts") or 0) or len(cfg.get("v_patch_nums") or ())
    else:
        raise CheckpointError(f"{source}: share_quant_resi must be >= 0, found {share}.")
    phi_keys = sorted(k for k in state if k.startswith("quantize.quant_resi."))
    expected_phi = {f"quantize.quant_resi.{name}.{p}" for name in _phi_names(share, num_phi) for p in ("weight", "bias")}
    if set(phi_keys) != expected_phi:
        raise CheckpointError(
            f"{source}: Phi conv keys {phi_keys[:4] or 'none'}{' ...' if len(phi_keys) > 4 else ''} do not match "
            f"quant_resi={quant_resi}, share_quant_resi={share} in config.json, which imply "
            f"{sorted(expected_phi)[:4] or 'none'} ({len(expected_phi)} tensors)."
        )
    for name in _phi_names(share, num_phi):
        _expect_shape(state, f"quantize.quant_resi.{name}.weight", (z_channels, z_channels, 3, 3), source, "z_channels")

    return HARTVAEConfig(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        quant_conv_ks=quant_conv_ks, quant_resi=quant_resi, share_quant_resi=share, num_phi=num_phi,
        using_sa=any(k.startswith(f"decoder.up.{top}.attn.") for k in state),
        using_mid_sa=any(k.startswith("decoder.mid.attn_1.") for k in state),
    )


def _phi_names(share: int, num_phi: int) -> list[str]:
    """Sub-module names of the Phi convs under ``quantize.quant_resi`` (docs/hart.md §4.1)."""
    if num_phi == 0:
        return []
    if share >= 2:
        return [f"qresi_ls.{k}" for k in range(num_phi)]
    if share == 1:
        return ["qresi"]
    return [str(k) for k in range(num_phi)]


# --------------------------------------------------------------------------------------------
# Phi selection rule


def phi_ticks(num_phi: int) -> list[float]:
    """Positions in [0, 1] of the Phi convs: K evenly spaced, with a 1/(3K) margin for K = 4, 1/(2K) otherwise."""
    margin = 1 / (3 * num_phi) if num_phi == 4 else 1 / (2 * num_phi)
    if num_phi == 1:
        return [margin]
    step = (1 - 2 * margin) / (num_phi - 1)
    return [margin + k * step for k in range(num_phi - 1)] + [1 - margin]


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Index of the Phi conv used after scale ``si``: the tick nearest to si / (num_scales - 1), first on ties."""
    if num_scales < 2 or not 0 <= si < num_scales:
        raise InternalError(f"phi_index: scale index {si} is outside 0..{num_scales - 1} (num_scales={num_scales}).")
    if num_phi < 1:
        raise InternalError(f"phi_index: num_phi must be >= 1, found {num_phi}.")
    at = si / (num_scales - 1)
    dist = [abs(t - at) for t in phi_ticks(num_phi)]
    return dist.index(min(dist))


# --------------------------------------------------------------------------------------------
# Modules (names follow the checkpoint keys)


def _group_norm(channels: int, ops) -> nn.GroupNorm:
    return ops.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.ops = ops
        self.norm1 = _group_norm(cin, ops)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout, ops)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = ops.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # saves a full-resolution temporary per activation
        # Full-resolution maps alive at once: x, the conv output and one scratch (the input of conv1 is
        # normalised in row bands, conv2's in place).
        h = banded_norm_silu_conv(self.norm1, self.conv1, x, self.ops)
        if h is None:
            h = self.conv1(F.silu(norm(self.norm1, x, self.ops), inplace=inplace))
        h2 = banded_norm_silu_conv(self.norm2, self.conv2, h, self.ops, inplace=True)
        h = self.conv2(F.silu(norm(self.norm2, h, self.ops, inplace), inplace=inplace)) if h2 is None else h2
        if not inplace:
            return h + self.nin_shortcut(x)
        if isinstance(self.nin_shortcut, nn.Identity):
            return h.add_(x)
        return add_shortcut(h, x, self.nin_shortcut, self.ops)  # in row bands: no map-sized output


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of the map (global: it sees the whole latent)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.ops = ops
        self.norm = _group_norm(channels, ops)
        self.qkv = ops.Conv2d(channels, 3 * channels, 1)
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(norm(self.norm, x, self.ops)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale C^-1/2
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Upsample2x(nn.Module):
    """Nearest x2 then 3x3 conv, as four 2x2 phase convolutions (:func:`vae_layout.upsample_conv`)."""

    def __init__(self, channels: int, operations=None):
        super().__init__()
        self.ops = nnops.resolve(operations)
        self.conv = self.ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = nnops.cast_bias_weight(self.conv, torch.float32, x.device, self.ops)
        return upsample_conv(x, w, bias)


class MidBlock(nn.Module):
    def __init__(self, channels: int, using_sa: bool, operations=None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, operations)
        self.attn_1 = AttnBlock(channels, operations) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, using_sa: bool, upsample: bool, operations=None):
        super().__init__()
        ops = operations
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, ops) for i in range(num_blocks)])
        self.attn = nn.ModuleList([AttnBlock(cout, ops) for _ in range(num_blocks)] if using_sa else [])
        self.upsample = Upsample2x(cout, ops) if upsample else nn.Identity()

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Decoder(nn.Module):
    """latent (B, Cvae, h, w) -> image (B, 3, h*2^(levels-1), w*2^(levels-1)), docs/hart.md §4.2."""

    def __init__(self, cfg: HARTVAEConfig, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        top = len(widths) - 1
        self.conv_in = ops.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.using_mid_sa, ops)
        # up[lvl] takes the width of level lvl+1 (the previous one executed) to widths[lvl].
        self.up = nn.ModuleList(
            UpLevel(widths[min(lvl + 1, top)], widths[lvl], cfg.num_res_blocks + 1,
                    cfg.using_sa and lvl == top, upsample=lvl != 0, operations=ops)
            for lvl in range(len(widths))
        )
        self.ops = ops
        self.norm_out = _group_norm(widths[0], ops)
        self.conv_out = ops.Conv2d(widths[0], 3, 3, padding=1)

    def forward_low(self, z: torch.Tensor) -> torch.Tensor:
        """Every layer that runs at latent resolution, including all attention: (B, Cvae, h, w) -> (B, C_top, h, w)."""
        return self.up[-1].run_blocks(self.mid(self.conv_in(decoder_layout(z))))

    @property
    def coarse_factor(self) -> int:
        """Upscaling of :meth:`forward_coarse`'s output over the latent (2; 1 for a one-level decoder)."""
        return 2 if len(self.up) > 1 else 1

    def forward_coarse(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_low`, the first up-sampling and the level after it (small maps, most of the
        receptive field): (B, Cvae, h, w) -> (B, C, f*h, f*w), f = :attr:`coarse_factor`."""
        h = self.forward_low(z)
        if len(self.up) > 1:
            h = self.up[-2].run_blocks(self.up[-1].upsample(h))
        return h

    def forward_fine(self, h: torch.Tensor) -> torch.Tensor:
        """The rest (local ops only: convs, GroupNorm, nearest up-sampling; almost all the memory):
        :meth:`forward_coarse`'s output -> (B, 3, H, W)."""
        h = decoder_layout(h)
        if len(self.up) > 1:
            h = self.up[-2].upsample(h)
        for lvl in reversed(range(len(self.up) - 2)):
            # Block by block in this frame: run_blocks(h) would keep the level's input alive to its end.
            for block in self.up[lvl].block:  # no attention below the top level
                h = block(h)
            h = self.up[lvl].upsample(h)
        out = banded_norm_silu_conv(self.norm_out, self.conv_out, h, self.ops)
        if out is not None:
            return out
        inplace = not torch.is_grad_enabled()
        return self.conv_out(F.silu(norm(self.norm_out, h, self.ops, inplace), inplace=inplace))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_fine(self.forward_coarse(z))


class QuantResi(nn.Module):
    """The K Phi convs (plain 3x3 convs of the namespace), registered under the key layout of the
    checkpoint's sharing mode; :meth:`phi` applies Phi_k(h) = (1 - r) h + r conv_k(h) (docs/hart.md §4.3)."""

    def __init__(self, cfg: HARTVAEConfig, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        names = _phi_names(cfg.share_quant_resi, cfg.num_phi)
        self.ratio = abs(cfg.quant_resi)
        convs = [ops.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1) for _ in names]
        if cfg.share_quant_resi >= 2:
            self.qresi_ls = nn.ModuleList(convs)
        else:
            for name, conv in zip(names, convs):
                self.add_module(name, conv)
        self._names = names

    @property
    def num_convs(self) -> int:
        return len(self._names)

    def conv(self, k: int) -> nn.Conv2d:
        return self.get_submodule(self._names[k])

    def phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Phi_k(h) for a (B, Cvae, H, W) map in the compute dtype."""
        return h * (1 - self.ratio) + self.conv(k)(h) * self.ratio


class Quantize(nn.Module):
    def __init__(self, cfg: HARTVAEConfig, operations=None):
        super().__init__()
        self.embedding = nnops.resolve(operations).Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = QuantResi(cfg, operations)


class HARTVAE(nn.Module):
    """Inference part of the HART tokenizer: codebook, Phi accumulation, resizes and the decoder."""

    def __init__(self, cfg: HARTVAEConfig, operations=None):
        """``operations``: the layer namespace (fastvar_core.ops; None: torch.nn)."""
        super().__init__()
        self.config = cfg
        self.ops = ops = nnops.resolve(operations)
        self.quantize = Quantize(cfg, ops)
        k = cfg.quant_conv_ks
        self.post_quant_conv = ops.Conv2d(cfg.z_channels, cfg.z_channels, k, padding=k // 2)
        self.decoder = Decoder(cfg, ops)
        # Empty; follows .to(): its device and dtype are the VAE's compute device and dtype, whatever the
        # namespace's layers store (not in the state dict).
        self.register_buffer("compute_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.compute_anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_anchor.dtype

    def codebook(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The codebook (V, Cvae) in ``dtype`` (None: the compute dtype) on the compute device."""
        return nnops.cast_bias_weight(self.quantize.embedding, dtype or self.dtype, self.device, self.ops)[0]

    # ---- multi-scale latent (docs/hart.md §3.4 step 9, §3.5 step 7, §4.3)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: (B, L) int -> (B, L, Cvae) on the compute device."""
        return nnops.embedding(self.quantize.embedding, idx.to(self.device), self.dtype, self.ops)

    def phi(self, h: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        """Apply the Phi conv of scale ``si`` (of ``num_scales``) to a (B, Cvae, H, W) map."""
        resi = self.quantize.quant_resi
        if resi.num_convs == 0:
            return h
        return resi.phi(phi_index(si, num_scales, resi.num_convs), h.to(self.dtype))

    def accumulate(self, f_hat: torch.Tensor, h_BChw: torch.Tensor, si: int, num_scales: int,
                   final_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Add scale ``si``'s feature map (B, Cvae, pn, pn) to the running latent f_hat (B, Cvae, H, W).

        Scales before the last are up-sampled bicubically to ``final_hw`` (default: f_hat's size) and
        passed through Phi; the last scale is added as is (it is already full size). Returns a new tensor.
        """
        final_hw = tuple(final_hw or f_hat.shape[-2:])
        if si == num_scales - 1:
            if tuple(h_BChw.shape[-2:]) != final_hw:
                raise InternalError(f"last scale map has size {list(h_BChw.shape[-2:])}, expected {list(final_hw)}.")
            return f_hat + h_BChw.to(f_hat.dtype)
        up = F.interpolate(h_BChw, size=final_hw, mode="bicubic", align_corners=False)
        return f_hat + self.phi(up, si, num_scales).to(f_hat.dtype)

    @staticmethod
    def next_input(f_hat: torch.Tensor, hw: int | tuple[int, int]) -> torch.Tensor:
        """Area resize (adaptive average pooling) of f_hat to the next scale's side(s)."""
        return F.interpolate(f_hat, size=hw, mode="area")

    # ---- decoding (docs/hart.md §4.4)

    @torch.no_grad()
    def decode(self, f_hat: torch.Tensor, tile: int | tuple[int, int] | None = None, overlap: int = 8,
               callback: TileCallback | None = None) -> torch.Tensor:
        """(B, Cvae, h, w) latent -> (B, 3, 16h, 16w) image in [-1, 1].

        ``tile`` (latent cells, or (rows, columns)) switches to :meth:`decode_tiled` when the latent is
        larger than one tile. ``callback(done, total)`` runs after each tile (once for a one-pass decode);
        raising from it stops.
        """
        if tile is not None:
            th, tw = tile_sides(tile)
            if f_hat.shape[-2] > th or f_hat.shape[-1] > tw:
                return self.decode_tiled(f_hat, (th, tw), overlap, callback)
        z = self.post_quant_conv(f_hat.to(self.device, self.dtype))
        return one_pass(self.decoder, z, callback).clamp_(-1, 1)

    @torch.no_grad()
    def decode_tiled(self, f_hat: torch.Tensor, tile: int | tuple[int, int] = 32, overlap: int = 8,
                     callback: TileCallback | None = None) -> torch.Tensor:
        """Memory-bounded approximation of :meth:`decode` for large latents.

        The decoder's low-resolution part (:meth:`Decoder.forward_coarse`: every attention layer and the
        first level above the latent's resolution; small maps, but most of the receptive field) runs on
        the whole latent, so attention stays exact. The rest (convs, GroupNorm, nearest up-sampling; the
        memory hog) runs on tiles of ``tile`` latent cells (an int: square; or (rows, columns)), one at a
        time, neighbours sharing ``overlap`` cells. A tile's blend weight is 0 on the outer quarter of a
        shared overlap, where its own zero padding reaches (what remains of the receptive field there is
        about 3 latent cells), and ramps linearly to 1 over the middle half (vae_layout.blend_spans), so
        no cell is decoded beyond the tiles themselves. Given the whole image's GroupNorm statistics the
        blend reproduces the one-pass decode closely; the remaining error comes from statistics computed
        per tile, and shrinks with larger tiles.
        """
        th, tw = tile_sides(tile)
        if overlap < 0 or min(th, tw) <= overlap:
            raise ConfigError(f"tile ({tile}) must exceed the overlap ({overlap} latent cells) >= 0.")
        coarse = self.decoder.forward_coarse(self.post_quant_conv(f_hat.to(self.device, self.dtype)))  # (B, C, fh, fw)
        B, _, fh, fw = coarse.shape
        f = self.decoder.coarse_factor
        q = self.config.downsample // f  # output pixels per coarse position
        rows = blend_spans(fh, f * th, f * overlap, q, coarse.device)
        cols = blend_spans(fw, f * tw, f * overlap, q, coarse.device)
        out = torch.zeros(B, 3, q * fh, q * fw, device=coarse.device)  # float32 accumulator
        for i, (y0, y1, wy) in enumerate(rows):
            for j, (x0, x1, wx) in enumerate(cols):
                pixels = self.decoder.forward_fine(coarse[:, :, y0:y1, x0:x1]).float()  # (B, 3, q*th', q*tw')
                out[:, :, q * y0:q * y1, q * x0:q * x1].add_(pixels.mul_(wy[:, None] * wx[None, :]))
                if callback is not None:
                    callback(i * len(cols) + j + 1, len(rows) * len(cols))
        return out.clamp_(-1, 1).to(coarse.dtype)

    def to_image(self, f_hat: torch.Tensor, tile: int | tuple[int, int] | None = None, overlap: int = 8,
                 callback: TileCallback | None = None) -> torch.Tensor:
        """Latent -> (B, H, W, 3) float32 RGB in [0, 1] (ComfyUI IMAGE layout)."""
        img = self.decode(f_hat, tile, overlap, callback)
        return ((img.float() + 1) / 2).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Loading


def _find_tokenizer_folder(path: Path) -> Path:
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"'{path}' does not exist: expected the HART 'tokenizer' folder or the release folder.")
    if not (path / "config.json").is_file() and (path / "tokenizer" / "config.json").is_file():
        path = path / "tokenizer"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"'{path}' has no config.json: expected the HART 'tokenizer' folder (config.json + model.safetensors) "
            f"or the release folder that contains it (found: "
            f"{', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})."
        )
    return path


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{cfg_path}' should hold a JSON object, found {type(cfg).__name__}.")
    model_type = cfg.get("model_type")
    if model_type != MODEL_TYPE:
        hint = (" This is the HART transformer folder ('llm'); pass its sibling 'tokenizer' folder or the release "
                "folder instead." if model_type == "hart_transformer_t2i" else "")
        raise CheckpointError(
            f"'{cfg_path}': model_type is {model_type!r}, expected '{MODEL_TYPE}' (the HART VAE / tokenizer).{hint}"
        )
    return cfg


def _read_weights(folder: Path, weights_file: Path | None) -> tuple[dict[str, torch.Tensor], Path]:
    if weights_file is None:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                weights_file = folder / name
                break
    if weights_file is None:
        if any(folder.glob("*.index.json")):
            return load_sharded_folder(folder), folder
        found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if len(found) != 1:
            raise CheckpointError(
                f"'{folder}' should hold one weight file ({' or '.join(WEIGHT_FILES)}), found "
                f"{[p.name for p in found] or 'none'}."
            )
        weights_file = found[0]
    return flatten_tensors(load_state_dict(weights_file)), weights_file


def filter_hart_vae_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keep the inference tensors of a tokenizer checkpoint, without the ``vae.`` prefix.

    ``disc.*`` (discriminator, including int64 BatchNorm counters) and the encoder-side / training
    tensors are dropped; any other key outside ``vae.`` is an error.
    """
    out, foreign = {}, []
    for key, value in state.items():
        if key.startswith("disc."):
            continue
        if not key.startswith(KEY_PREFIX):
            foreign.append(key)
            continue
        name = key[len(KEY_PREFIX):]
        if not name.startswith(UNUSED_PREFIXES):
            out[name] = value
    if foreign:
        raise CheckpointError(
            f"{source}: {len(foreign)} keys are neither 'vae.*' nor 'disc.*' (e.g. {foreign[:3]}); this is not a "
            f"HART tokenizer checkpoint saved from '{MODEL_TYPE}'."
        )
    if not out:
        raise CheckpointError(f"{source}: no 'vae.*' decoder tensors found.")
    return out


def load_hart_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  operations=None) -> HARTVAE:
    """Load the HART VAE from the ``tokenizer/`` folder, the release folder holding it, or a weight file in it;
    ``operations``: the layer namespace (fastvar_core.ops; None: torch.nn)."""
    path = Path(path)
    folder = _find_tokenizer_folder(path)
    cfg_json = _read_config(folder)
    state, weights_file = _read_weights(folder, path if path.is_file() else None)
    source = f"'{weights_file}'"
    state = filter_hart_vae_state_dict(state, source)
    cfg = detect_hart_vae_config(cfg_json, state, source)

    model = HARTVAE(cfg, operations)
    expected = model.state_dict()
    check_state_keys(expected, state, f"{source} does not match the HART VAE built from config.json",
                     name=lambda k: f"vae.{k}")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise CheckpointError(
                f"{source}: tensor 'vae.{key}' has shape {list(state[key].shape)}, expected {list(ref.shape)}."
            )
        if not state[key].is_floating_point():
            raise CheckpointError(f"{source}: tensor 'vae.{key}' has dtype {state[key].dtype}, expected a float.")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
