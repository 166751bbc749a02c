"""Attention kernels behind one call: flash-attn (CUDA, fp16/bf16), PyTorch SDPA, or explicit math.

Tensors use the (B, H, L, D) layout. ``backend=None`` picks flash-attn when it is importable and the
inputs allow it, SDPA otherwise; the per-call ``backend`` argument or, for a block of calls, the
``use_backend`` context manager override it (``set_default_backend`` changes it for the whole process).
The choice is logged once per backend.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger("fastvar")
BACKENDS = ("auto", "flash", "sdpa", "math")
_default_backend = "auto"
_logged: set[str] = set()


def set_default_backend(name: str) -> None:
    """Choose the backend used when a call does not name one (auto, flash, sdpa, math)."""
    global _default_backend
    if name not in BACKENDS:
        raise ConfigError(f"attention backend {name!r} is unknown; allowed: {list(BACKENDS)}")
    if name == "flash" and flash_module() is None:
        raise ConfigError("attention backend 'flash' needs the flash-attn package, which is not installed")
    _default_backend = name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend inside the block; the previous default is back afterwards."""
    before = _default_backend
    set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(before)


def default_backend() -> str:
    """The backend used when a call does not name one."""
    return _default_backend


def flash_module():
    """The flash_attn module, or None when it is not installed."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def flash_usable(*tensors: torch.Tensor) -> bool:
    """flash-attn needs CUDA tensors in fp16/bf16."""
    return all(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def _resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    name = backend or _default_backend
    if name == "auto":
        name = "flash" if flash_module() is not None and flash_usable(*tensors) else "sdpa"
    elif name == "flash":
        if flash_module() is None:
            raise ConfigError("attention backend 'flash' needs the flash-attn package, which is not installed")
        if not flash_usable(*tensors):
            raise ConfigError(
                f"attention backend 'flash' needs CUDA fp16/bf16 tensors, got {tensors[0].device} {tensors[0].dtype}"
            )
    elif name not in BACKENDS:
        raise ConfigError(f"attention backend {name!r} is unknown; allowed: {list(BACKENDS)}")
    if name not in _logged:
        _logged.add(name)
        log.info("FastVAR attention backend: %s", name)
    return name


def _math(q, k, v, scale, mask=None):
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Unmasked attention softmax(q k^T * scale) v. q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D)."""
    name = _resolve(backend, q, k, v)
    if name == "flash":
        fn = flash_module().flash_attn_func
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False)
        return out.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _math(q, k, v, scale)


@dataclass
class VarlenKV:
    """Keys and values of variable-length sequences (one per batch row), packed without padding.

    k, v: (N, H, D) with row b owning ``k[cu_seqlens[b]:cu_seqlens[b+1]]``. The padded form used by
    SDPA is built once and reused for every query scale.
    """

    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int
    _padded: tuple | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k (B, H, T, D), v (B, H, T, D), mask (B, 1, 1, T) bool) with T = max_seqlen."""
        if self._padded is None:
            b, t = self.batch_size, self.max_seqlen
            lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
            mask = torch.arange(t, device=self.k.device)[None, :] < lens[:, None]  # (B, T)
            shape = (b, t, *self.k.shape[1:])
            k_pad = self.k.new_zeros(shape)
            v_pad = self.v.new_zeros(shape)
            k_pad[mask] = self.k
            v_pad[mask] = self.v
            self._padded = (k_pad.transpose(1, 2), v_pad.transpose(1, 2), mask[:, None, None, :])
        return self._padded


def varlen_cross_attention(
    q: torch.Tensor,
    kv: VarlenKV,
    *,
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Each row of q (B, H, Lq, D) attends only to its own sequence in ``kv`` -> (B, H, Lq, D)."""
    name = _resolve(backend, q, kv.k, kv.v)
    b, h, lq, d = q.shape
    if name == "flash":
        fn = flash_module().flash_attn_varlen_func
        q_packed = q.transpose(1, 2).reshape(b * lq, h, d)  # (B*Lq, H, D)
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        out = fn(q_packed, kv.k, kv.v, cu_q, kv.cu_seqlens, lq, kv.max_seqlen, softmax_scale=scale, causal=False)
        return out.view(b, lq, h, d).transpose(1, 2)
    k_pad, v_pad, mask = kv.padded()
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k_pad, v_pad, attn_mask=mask, scale=scale)
    return _math(q, k_pad, v_pad, scale, mask)
