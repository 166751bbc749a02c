"""Infinity transformer (FoundationVision/Infinity), inference only, with FastVAR hooks.

Math per docs/infinity.md §3; module and parameter names are the official checkpoint keys
(blocks live in one flat ``blocks`` list; the loader maps ``block_chunks.{c}.module.{j}`` onto it).
Every residual branch (self-attention, cross-attention, FFN) goes through ``PruningRun.add_sublayer`` so
FastVAR can run it on a subset of tokens. Run state (KV caches, pruning cache) lives outside the
module, owned by the sampler, so nothing leaks between generations.

Precision: the blocks' matrices may be bf16/fp16 (``set_block_dtype``); the residual stream, norms,
adaLN vectors, q/k normalisation, RoPE, the text path, the head and the logits stay float32 (docs/infinity.md §3.7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops as nnops
from ..attention import VarlenKV, attention, varlen_cross_attention
from ..kvcache import KVBuffer
from ..linear import use_fast_linears
from ..pruning.run import PruningRun
from .config import NORM_EPS, TEXT_MAXLEN, InfinityConfig
from .rope import ScaleRope

# Cosine attention clamps the learned log-scale at ln(100), evaluated in float32 as the official code does.
MAX_LOG_SCALE = torch.log(torch.tensor(100.0)).item()
# Parameters that stay float32 when the blocks run in half precision (adaLN offsets, norms, head scales).
_FP32_BLOCK_PARAMS = ("ada_gss", "ca_norm.weight", "ca_norm.bias", "sa.scale_mul_1H11")


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine (eps 1e-6) in float32, then x * (1 + scale) + shift."""
    x = F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS)
    return x.mul(scale.add(1)).add_(shift)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rope.apply_rope` with fewer temporaries (same float32 values): x (B, H, L, hd) -> contiguous."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, hd/2) each, strided
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    even, odd = out.unflatten(-1, (-1, 2)).unbind(-1)
    torch.mul(a, cos, out=even).sub_(b * sin)  # a cos - b sin
    torch.mul(a, sin, out=odd).add_(b * cos)  # a sin + b cos
    return out


class SelfAttention(nn.Module):
    """Cosine self-attention with 2D RoPE and a KV cache over scales (docs/infinity.md §3.3)."""

    def __init__(self, embed_dim: int, num_heads: int, operations=None):
        super().__init__()
        self.ops = ops = nnops.resolve(operations)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_qkv = ops.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))  # its dtype is the block's compute dtype
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, num_heads, 1, 1))  # log of per-head q scale
        self.proj = ops.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVBuffer, keep: int) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C); ``keep``: how many of the L keys stay in ``cache`` (KVBuffer.extend)."""
        B, L, C = x.shape
        dtype = self.q_bias.dtype
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(dtype)
        qkv = nnops.linear(self.mat_qkv, x.to(dtype), self.ops, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each, views of qkv
        del qkv  # its memory goes once v is in the cache
        q_scale = self.scale_mul_1H11.float().clamp_max(MAX_LOG_SCALE).exp()  # (1, H, 1, 1)
        q = F.normalize(q.float(), dim=-1, eps=1e-12).mul_(q_scale)
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        k, v = cache.extend(k.to(dtype), v, keep)
        out = attention(q.to(dtype), k, v, scale=1.0)  # (B, H, L, hd); the learned q scale is the temperature
        del q, k, v  # at the last scale the keys are a released buffer or a copy: gone before the projection
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Attention from image tokens to the (variable-length) text tokens of their own prompt (docs/infinity.md §3.5)."""

    def __init__(self, embed_dim: int, num_heads: int, operations=None):
        super().__init__()
        self.ops = ops = nnops.resolve(operations)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_q = ops.Linear(embed_dim, embed_dim)
        self.mat_kv = ops.Linear(embed_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))  # its dtype is the block's compute dtype
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = ops.Linear(embed_dim, embed_dim)

    def text_kv(self, ca_kv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> VarlenKV:
        """Project the text memory (N, C) once per generation -> packed keys/values (N, H, hd)."""
        dtype = self.v_bias.dtype
        bias = torch.cat((self.zero_k_bias, self.v_bias)).to(dtype)
        kv = nnops.linear(self.mat_kv, ca_kv.to(dtype), self.ops, bias).view(-1, 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(1)
        return VarlenKV(k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen)

    def forward(self, x: torch.Tensor, kv: VarlenKV) -> torch.Tensor:
        B, L, C = x.shape
        q = self.mat_q(x.to(self.v_bias.dtype)).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out = varlen_cross_attention(q, kv, scale=1 / math.sqrt(self.head_dim))  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    """fc2(GELU-tanh(fc1(x))), the activation fused into fc1's product where oneDNN runs it."""

    def __init__(self, embed_dim: int, hidden: int, operations=None):
        super().__init__()
        self.ops = ops = nnops.resolve(operations)
        self.fc1 = ops.Linear(embed_dim, hidden)
        self.fc2 = ops.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) in the block's compute dtype -> (B, L, C)."""
        return self.fc2(nnops.linear(self.fc1, x, self.ops, activation="gelu_tanh"))


class Block(nn.Module):
    """Pre-norm block with shared adaLN: x += g1*SA(...); x += CA(ca_norm(x)); x += g2*FFN(...) (docs/infinity.md §3.2)."""

    SUBLAYERS = ("sa", "ca", "ffn")  # the residual branches, in the order they go through PruningRun.add_sublayer

    def __init__(self, config: InfinityConfig, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        C = config.embed_dim
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))  # added to the shared adaLN vector
        self.sa = SelfAttention(C, config.num_heads, ops)
        self.ca = CrossAttention(C, config.num_heads, ops)
        self.ca_norm = ops.LayerNorm(C, eps=NORM_EPS)
        self.ffn = FFN(C, config.ffn_hidden, ops)

    def forward(self, x: torch.Tensor, layer: int, ctx: TextContext, rope: ScaleRope, run: PruningRun,
                cache: KVBuffer, store_kv: bool) -> torch.Tensor:
        # order of the 6 vectors: gamma1, gamma2, scale1, scale2, shift1, shift2 (each (bs, 1, C))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + ctx.ada).unbind(2)
        text_kv = ctx.ca_kv[layer]

        def sa_branch(xs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            cos, sin = rope.select(idx)  # kept tokens rotate at their original positions
            keep = run.kv_keep(xs.shape[1]) if store_kv else 0
            return self.sa(ada_layer_norm(xs, scale1, shift1), cos, sin, cache, keep).float().mul_(gamma1)

        def ca_branch(xs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            return self.ca(self.ca_norm(xs.float()), text_kv).float()  # ca_gamma = 1 in released models

        def ffn_branch(xs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            return self.ffn(ada_layer_norm(xs, scale2, shift2).to(self.sa.q_bias.dtype)).float().mul_(gamma2)

        run.add_sublayer(layer, "sa", x, sa_branch)  # in place: x is the residual stream
        run.add_sublayer(layer, "ca", x, ca_branch)
        return run.add_sublayer(layer, "ffn", x, ffn_branch)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight in float32 (the official non-fused RMSNorm, docs/infinity.md §3.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(NORM_EPS))) * self.weight


class TextAttentionPool(nn.Module):
    """One learned query per head pools each prompt's tokens into the start token / condition (docs/infinity.md §3.1)."""

    def __init__(self, text_channels: int, embed_dim: int, num_heads: int, operations=None):
        super().__init__()
        self.ca = _PoolAttention(text_channels, embed_dim, num_heads, operations)

    def forward(self, kv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        return self.ca(kv, cu_seqlens, max_seqlen)


class _PoolAttention(nn.Module):
    def __init__(self, text_channels: int, embed_dim: int, num_heads: int, operations=None):
        super().__init__()
        self.ops = ops = nnops.resolve(operations)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.mat_kv = ops.Linear(text_channels, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = ops.Linear(embed_dim, embed_dim)

    def forward(self, kv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """kv (N, Ct5) packed text features -> (B, C) pooled vector per sequence."""
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        k, v = nnops.linear(self.mat_kv, kv, self.ops, bias).view(-1, 2, self.num_heads, self.head_dim).unbind(1)
        batch = cu_seqlens.numel() - 1
        q = self.mat_q.expand(batch, -1, -1).unsqueeze(2)  # (B, Hp, 1, dh)
        out = varlen_cross_attention(q, VarlenKV(k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen),
                                     scale=1 / math.sqrt(self.head_dim))  # (B, Hp, 1, dh)
        return self.proj(out.reshape(batch, -1))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, operations=None):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nnops.resolve(operations).Linear(embed_dim, 2 * embed_dim))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, h.shape[-1]).unbind(2)
        return ada_layer_norm(h, scale, shift)


@dataclass
class TextContext:
    """Per-generation text conditioning: rows [0, B) conditional, [B, 2B) unconditional when guided."""

    cond: torch.Tensor  # (bs, C) pooled text vector (start token and head adaLN input)
    ada: torch.Tensor  # (bs, 1, 6, C) shared adaLN vector
    ca_kv: list[VarlenKV]  # per layer: projected text keys/values
    batch: int  # B (images)

    @property
    def rows(self) -> int:
        return self.cond.shape[0]

    def conditional(self) -> TextContext:
        """The conditional rows [0, B) only (past a CFG cut-off)."""
        if self.rows == self.batch:
            return self
        return TextContext(self.cond[: self.batch], self.ada[: self.batch],
                           [leading_rows(kv, self.batch) for kv in self.ca_kv], self.batch)


def leading_rows(kv: VarlenKV, rows: int) -> VarlenKV:
    """The text keys/values of the first ``rows`` sequences (packed and padded forms share storage)."""
    k_pad, v_pad, mask = kv.padded()
    end = int(kv.cu_seqlens[rows])
    return VarlenKV(kv.k[:end], kv.v[:end], kv.cu_seqlens[: rows + 1], kv.max_seqlen,
                    _padded=(k_pad[:rows], v_pad[:rows], mask[:rows]))


class InfinityTransformer(nn.Module):
    """The Infinity bitwise next-scale transformer (text-to-image)."""

    def __init__(self, config: InfinityConfig, operations=None):
        """``operations``: the layer namespace (fastvar_core.ops; None: torch.nn)."""
        super().__init__()
        self.config = config
        self.ops = ops = nnops.resolve(operations)
        C, Ct5 = config.embed_dim, config.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(TEXT_MAXLEN, Ct5))  # "empty prompt" T5 features, pre-norm
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = ops.Embedding(config.lvl_embed_rows, C)
        self.word_embed = ops.Linear(config.bits, C)
        self.text_norm = RMSNorm(Ct5)
        self.text_proj_for_sos = TextAttentionPool(Ct5, C, config.pool_heads, ops)
        self.text_proj_for_ca = nn.Sequential(ops.Linear(Ct5, C), nn.GELU(approximate="tanh"), ops.Linear(C, C))
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(Block(config, ops) for _ in range(config.depth))
        self.head_nm = AdaLNBeforeHead(C, ops)
        self.head = ops.Linear(C, 2 * config.bits)
        use_fast_linears(self)  # plain nn.Linear layers only (the default namespace)

    # ----- precision -----
    @property
    def block_dtype(self) -> torch.dtype:
        """The blocks' compute dtype: that of their own bias vectors (namespace layers may store another)."""
        return self.blocks[0].sa.q_bias.dtype

    def block_dtypes(self, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """The stored dtype of every block tensor (state-dict key) when the blocks run in ``dtype``; tensors
        outside the blocks are float32."""
        out = {}
        for i, block in enumerate(self.blocks):
            for name, _ in block.named_parameters():
                out[f"blocks.{i}.{name}"] = torch.float32 if name in _FP32_BLOCK_PARAMS else dtype
            for name, _ in block.named_buffers():
                out[f"blocks.{i}.{name}"] = dtype
        return out

    def set_block_dtype(self, dtype: torch.dtype) -> InfinityTransformer:
        """Run the blocks' matrices in ``dtype``; everything numerically sensitive stays float32."""
        for block in self.blocks:
            for name, p in block.named_parameters():
                p.data = p.data.to(torch.float32 if name in _FP32_BLOCK_PARAMS else dtype)
            for b in block.buffers():
                b.data = b.data.to(dtype)
        return self

    # ----- per generation -----
    def encode_text(self, kv_compact: torch.Tensor, lens: list[int], negative=None, guidance: bool = False) -> TextContext:
        """Text path (docs/infinity.md §3.1) for B prompts; with ``guidance`` append the unconditional half
        (docs/infinity.md §4.2 step 2).

        The unconditional text of prompt i is ``cfg_uncond[:lens[i]]`` unless ``negative`` (an object
        with ``kv_compact`` and ``lens``, one prompt per image or a single one for all) is given.
        """
        device = self.pos_start.device
        kv = kv_compact.to(device=device, dtype=torch.float32)
        lens = [int(n) for n in lens]
        if guidance:
            if negative is None:
                uncond = torch.cat([self.cfg_uncond[:n] for n in lens]).float()
                lens_un = lens
            else:
                neg_lens = [int(n) for n in negative.lens]
                neg_kv = negative.kv_compact.to(device=device, dtype=torch.float32)
                if len(neg_lens) == 1 and len(lens) > 1:
                    neg_kv, neg_lens = neg_kv.repeat(len(lens), 1), neg_lens * len(lens)
                uncond, lens_un = neg_kv, neg_lens
            kv, lens = torch.cat((kv, uncond)), lens + lens_un
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.tensor(lens, dtype=torch.int32, device=device).cumsum(0)
        max_len = max(lens)

        kv = self.text_norm(kv)
        cond = self.text_proj_for_sos(kv, cu, max_len)  # (bs, C)
        ca_kv = self.text_proj_for_ca(kv)  # (N, C)
        ada = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim)
        per_layer = [blk.ca.text_kv(ca_kv, cu, max_len) for blk in self.blocks]
        return TextContext(cond=cond, ada=ada, ca_kv=per_layer, batch=len(lens) // (2 if guidance else 1))

    def start_tokens(self, ctx: TextContext) -> torch.Tensor:
        """Scale-0 input (bs, 1, C): pooled text + pos_start."""
        return ctx.cond.unsqueeze(1) + self.pos_start.expand(ctx.rows, 1, -1)

    def embed_tokens(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """Next-scale input: code features (B, L, d) -> (rows, L, C), repeated over the CFG halves."""
        x = self.word_embed(tokens.float())
        return x.repeat(rows // x.shape[0], 1, 1)

    def forward_scale(self, x: torch.Tensor, scale: int, ctx: TextContext, rope: ScaleRope, run: PruningRun,
                      caches: list[KVBuffer], store_kv: bool = True) -> torch.Tensor:
        """Run every block on one scale's tokens x (bs, L, C) -> hidden states (bs, L, C) float32."""
        lvl = nnops.cast_bias_weight(self.lvl_embed, torch.float32, x.device, self.ops)[0][scale]  # (C,)
        x = x + lvl  # level embedding once, before the first block
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, ctx, rope, run, caches[layer], store_kv)
        return x

    def get_logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Bit logits (rows, L, 2d) float32; channel 2j+c is bit j taking value c."""
        return self.head(self.head_nm(h.float(), cond))

    # ----- introspection -----
    def extra_repr(self) -> str:
        return self.config.describe()
