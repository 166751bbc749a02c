"""The HART text-to-image transformer (hart-0.7b-1024px structure), inference only.

A llama-style pre-norm transformer over [300 text tokens; token maps of scales 1..S-1] with a KV cache,
a 1D RoPE on the text and HART's peculiar 2D RoPE on image tokens, an AdaLN head conditioned on the
max-pooled text, and the residual diffusion head (docs/hart.md §2). Parameter names equal the checkpoint
keys, so the official state dict loads strictly (after dropping two training buffers).

Every attention and FFN branch goes through :meth:`PruningRun.add_sublayer`, which is where FastVAR drops
and restores tokens; the attention then sees only the kept tokens, at their original RoPE positions,
and appends only their keys/values to the cache (docs/fastvar.md §3.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops as nnops
from ..attention import attention
from ..errors import ConfigError
from ..kvcache import KVBuffer
from ..linear import use_fast_linears
from ..pruning.run import PruningRun
from ..pruning.tokens import gather_tokens
from .config import HARTConfig
from .diffusion import ResidualDiffusion, TimestepEmbedder

ROPE_BASE = 10000


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, statistics in fp32, output in the input dtype (docs/hart.md §2.6)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (docs/hart.md §2.5)


def rope_context(position_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1D RoPE of the text tokens: position_ids (B, T) -> cos, sin (B, T, hd) float32.

    Frequencies 10000^(-2j/hd); the angle table is [p*w | p*w] (rotate-half pairing d <-> d + hd/2).
    """
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def image_positions(hw: tuple[int, int], grid: tuple[int, int], offset: torch.Tensor) -> torch.Tensor:
    """(B, h*w, 2) float32 positions (row, col) of an h x w map, raster order.

    Each axis is scaled to the last map's ``grid`` (H, W) as (i / h) * H in fp32, in this order (the
    official rounding; upstream has only square maps, i / pn * 64 at 1024 px), then shifted by each
    row's last text position ``offset`` (B,).
    """
    (h, w), (gh, gw) = hw, grid
    rows = torch.arange(h, device=offset.device) / h * gh  # (h,) float32
    cols = torch.arange(w, device=offset.device) / w * gw  # (w,) float32
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)  # (h*w, 2)
    return coords[None] + offset[:, None, None]


def rope_image(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HART's 2D RoPE: positions (B, L, 2) -> cos, sin (B, L, hd) float32.

    Frequencies u_k = 10000^(-4k/hd); the angle table per token is [a*u | a*u | b*u | b*u] with
    (a, b) = (row, col) position, applied with the ordinary rotate-half over the whole head, so dim d
    pairs with d + hd/2 although they carry different angles. Copied as is (docs/hart.md §2.5).
    """
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 4, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, L, 2, hd/4)
    emb = torch.cat([angles, angles], dim=-1).flatten(2)  # (B, L, hd): [a u, a u, b u, b u]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd), cos/sin (B, L, hd): x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])  # x1 cos - x2 sin
    out[..., half:].add_(x[..., :half] * sin[..., half:])  # x2 cos + x1 sin
    return out


# ------------------------------------------------------------------------------------------------
# Blocks


class KVCache:
    """Keys (after RoPE) and values of every layer, one :class:`KVBuffer` each, grown scale by scale.

    ``capacity``: token slots per layer (``PruningRun.kv_capacity``); None lets the buffers grow.
    """

    def __init__(self, depth: int, capacity: Sequence[int] | None = None):
        self.layers = [KVBuffer(None if capacity is None else capacity[i]) for i in range(depth)]
        self.store = True  # False at the last scale: nothing attends to it afterwards

    @property
    def k(self) -> list[torch.Tensor | None]:
        """Held keys per layer, (B, H, T, hd) or None."""
        return [layer.k for layer in self.layers]

    @property
    def v(self) -> list[torch.Tensor | None]:
        return [layer.v for layer in self.layers]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values to attend to: the cached ones plus the new ones, of which ``keep`` (None: all) are
        stored unless ``store`` is off."""
        keep = (k.shape[2] if keep is None else keep) if self.store else 0
        return self.layers[layer].extend(k, v, keep)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()


class Attention(nn.Module):
    """Llama-style self-attention with HART's q/v biases, zero k bias and optional l2-normalised q/k."""

    def __init__(self, cfg: HARTConfig, operations=None):
        super().__init__()
        self.ops = ops = nnops.resolve(operations)
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.qkv_proj = ops.Linear(C, 3 * C, bias=False)  # rows [q; k; v], heads contiguous
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = ops.Linear(C, C)
        if cfg.attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.scale = 1.0
        else:
            self.scale_mul_1H11 = None
            self.scale = 0.25 / math.sqrt(self.head_dim)  # not 1/sqrt(hd) (docs/hart.md §2.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                keep: int | None = None) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C); ``keep`` of the L keys stay in the cache (None: all)."""
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        w, _ = nnops.cast_bias_weight(self.qkv_proj, x.dtype, x.device, self.ops)
        # 3 x (B, H, L, hd), views of one tensor that goes once v is in the cache
        q, k, v = F.linear(x, w, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.scale_mul_1H11 is not None:
            # before RoPE (which is not norm-preserving here); q scale exp(min(s, ln 100)) (docs/hart.md §2.4)
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100)).exp()
            k = F.normalize(k, dim=-1)
        cos, sin = cos.to(v.dtype), sin.to(v.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.extend(layer, k, v, keep)
        out = attention(q, k, v, scale=self.scale)  # (B, H, L, hd)
        del q, k, v  # at the last scale the keys are a released buffer or a copy: gone before the projection
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.gate_proj = ops.Linear(dim, hidden, bias=False)
        self.up_proj = ops.Linear(dim, hidden, bias=False)
        self.down_proj = ops.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate_proj(x), inplace=True)  # (B, L, hidden), in place: two such tensors at a time
        return self.down_proj(hidden.mul_(self.up_proj(x)))


def _gather_rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """t (B, L, D), idx (B, K) -> (B, K, D); idx None -> t."""
    return t if idx is None else gather_tokens(t, idx)


class Block(nn.Module):
    """x <- x + Attn(N(x)); x <- x + FFN(N(x)) with one RMSNorm ``ln_wo_grad`` used twice (docs/hart.md §2.2).

    x is updated in place: at 2K one full-size copy of the hidden states less at the peak.
    """

    SUBLAYERS = ("attn", "ffn")  # the residual branches, in the order they go through PruningRun.add_sublayer

    def __init__(self, cfg: HARTConfig, index: int, operations=None):
        super().__init__()
        self.index = index
        self.ln_wo_grad = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.attn = Attention(cfg, operations)
        self.ffn = SwiGLU(cfg.embed_dim, cfg.ffn_hidden, operations)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, run: PruningRun) -> torch.Tensor:
        def attn_branch(xs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            # kept tokens keep their original positions: gather their cos/sin rows
            return self.attn(self.ln_wo_grad(xs), _gather_rows(cos, idx), _gather_rows(sin, idx), cache, self.index,
                             run.kv_keep(xs.shape[1]))

        def ffn_branch(xs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            return self.ffn(self.ln_wo_grad(xs))

        run.add_sublayer(self.index, "attn", x, attn_branch)  # in place: x is the residual stream
        return run.add_sublayer(self.index, "ffn", x, ffn_branch)


class HeadNorm(nn.Module):
    """``head_nm``: RMSNorm modulated by scale/shift from the max-pooled text condition."""

    def __init__(self, cfg: HARTConfig, operations=None):
        super().__init__()
        C = cfg.embed_dim
        self.ln_wo_grad = RMSNorm(C, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nnops.resolve(operations).Linear(C, 2 * C))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond (B, T, C) -> scale, shift (B, 1, C): max over all T text tokens, padding included."""
        pooled = cond.max(dim=1, keepdim=True).values
        scale, shift = self.ada_lin(pooled).unflatten(-1, (2, -1)).unbind(-2)
        return scale, shift

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x) * (scale + 1) + shift


class HARTTransformer(nn.Module):
    """HART transformer with its residual diffusion head. Build with a :class:`HARTConfig`."""

    def __init__(self, cfg: HARTConfig, operations=None):
        """``operations``: the layer namespace (fastvar_core.ops; None: torch.nn)."""
        super().__init__()
        self.config = cfg
        self.ops = ops = nnops.resolve(operations)
        C = cfg.embed_dim
        self.word_embed = ops.Linear(cfg.vae_channels, C)
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else None
        self.context_embed = ops.Linear(cfg.context_dim, C)
        self.lvl_embed = TimestepEmbedder(C, ops) if cfg.use_timestep_embed else ops.Embedding(cfg.num_scales, C)
        self.blocks = nn.ModuleList(Block(cfg, i, ops) for i in range(cfg.depth))
        self.head_nm = HeadNorm(cfg, ops)
        self.head = ops.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)  # its weight's device and dtype are the model's
        self.diffloss = ResidualDiffusion(cfg.vae_channels, cfg.diff_width, C, cfg.diff_depth, cfg.num_sampling_steps,
                                          ops)
        # The diffusion head runs on the faster oneDNN kernels (fastvar_core.linear). The blocks keep
        # PyTorch's default ones: another summation order moves HART's logits by ~1e-4 and flips
        # near-tied draws of the official token sequences that the parity cases replay.
        use_fast_linears(self.diffloss)

    @property
    def device(self) -> torch.device:
        """The compute device: that of the model's own parameters (namespace layers may keep theirs elsewhere)."""
        return self.decoder_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, likewise."""
        return self.decoder_norm.weight.dtype

    # ---- pieces used by the sampler

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text features (B, T, D_ctx) -> cond (B, T, C): the scale-0 input and the head's condition."""
        x = context.to(self.device, self.dtype)
        if self.context_norm is not None:
            x = self.context_norm(x)
        return self.context_embed(x)

    def level_embedding(self, num_levels: int) -> torch.Tensor:
        """(num_levels, C): level 0 for the text tokens, level k for scale k (docs/hart.md §2.1)."""
        levels = torch.arange(num_levels, device=self.device)
        if isinstance(self.lvl_embed, TimestepEmbedder):
            return self.lvl_embed(levels, self.dtype)
        if num_levels > self.lvl_embed.num_embeddings:
            raise ConfigError(
                f"this HART checkpoint has a level embedding for {self.lvl_embed.num_embeddings} scales, "
                f"the schedule needs {num_levels}"
            )
        return nnops.embedding(self.lvl_embed, levels, self.dtype, self.ops)

    def forward_blocks(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, run: PruningRun
    ) -> torch.Tensor:
        """Run all blocks on one scale's tokens x (2B, L, C) with RoPE tables cos/sin (2B, L, hd)."""
        for block in self.blocks:
            x = block(x, cos, sin, cache, run)
        return x

    def logits(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Hidden states (2B, L, C) -> logits (2B, L, V) float32 (head in fp32 like the official code)."""
        h = self.head_nm(x.float(), scale.float(), shift.float())
        w, b = nnops.cast_bias_weight(self.head, torch.float32, h.device, self.ops)
        return F.linear(h, w, b)
