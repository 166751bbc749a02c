"""Attention backends agree; the flash-attn path keeps its call contract (checked with a stand-in module)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastvar_core import attention as attn
from fastvar_core.errors import ConfigError


def _qkv(b=2, h=3, lq=5, lk=7, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, h, lk, d, generator=g, dtype=dtype),
            torch.randn(b, h, lk, d, generator=g, dtype=dtype))


def _reference(q, k, v, scale, mask=None):
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("backend", ["sdpa", "math", None])
def test_self_attention_backends_agree(backend):
    q, k, v = _qkv()
    out = attn.attention(q, k, v, scale=0.3, backend=backend)
    torch.testing.assert_close(out, _reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def _varlen(lens, h=3, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return attn.VarlenKV(torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g), cu, max(lens))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_varlen_cross_attention_sees_only_its_own_text(backend):
    lens = [2, 5, 3]
    kv = _varlen(lens)
    q = torch.randn(3, 3, 4, 8)
    out = attn.varlen_cross_attention(q, kv, scale=0.35, backend=backend)
    for b, n in enumerate(lens):
        s, e = kv.cu_seqlens[b], kv.cu_seqlens[b + 1]
        k = kv.k[s:e].transpose(0, 1)[None]  # (1, H, n, D)
        v = kv.v[s:e].transpose(0, 1)[None]
        torch.testing.assert_close(out[b : b + 1], _reference(q[b : b + 1], k, v, 0.35), atol=1e-5, rtol=1e-5)


def test_bf16_matches_fp32_within_dtype_tolerance():
    q, k, v = _qkv()
    ref = attn.attention(q, k, v, scale=0.3, backend="math")
    out = attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.3, backend="sdpa")
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in flash_attn module that checks the call contract and computes with plain math."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=True):
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]  # (B, L, H, D)
        assert causal is False and softmax_scale is not None
        calls.append("func")
        return _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=True):
        assert q.dim() == 3 and k.dim() == 3  # packed (N, H, D)
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q[-1] == q.shape[0] and cu_seqlens_k[-1] == k.shape[0]
        assert causal is False
        calls.append("varlen")
        out = torch.empty_like(q)
        for b in range(cu_seqlens_q.numel() - 1):
            qs, qe = cu_seqlens_q[b], cu_seqlens_q[b + 1]
            ks, ke = cu_seqlens_k[b], cu_seqlens_k[b + 1]
            assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
            out[qs:qe] = _reference(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                    v[ks:ke].transpose(0, 1)[None], softmax_scale)[0].transpose(0, 1)
        return out

    module = types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attn, "flash_usable", lambda *t: True)  # CPU tensors stand in for CUDA here
    monkeypatch.setattr(attn, "_default_backend", "auto")
    return calls


def test_auto_picks_flash_when_usable(fake_flash):
    q, k, v = _qkv()
    out = attn.attention(q, k, v, scale=0.3)
    assert fake_flash == ["func"]
    torch.testing.assert_close(out, _reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_flash_varlen_contract(fake_flash):
    kv = _varlen([4, 1])
    q = torch.randn(2, 3, 6, 8)
    out = attn.varlen_cross_attention(q, kv, scale=0.2, backend="flash")
    assert fake_flash == ["varlen"]
    ref = attn.varlen_cross_attention(q, kv, scale=0.2, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flash_refused_with_a_clear_reason(monkeypatch):
    monkeypatch.setattr(attn, "flash_module", lambda: None)
    q, k, v = _qkv()
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        attn.attention(q, k, v, scale=1.0, backend="flash")
    with pytest.raises(ConfigError, match="unknown"):
        attn.set_default_backend("xformers")


def test_use_backend_restores_the_default():
    before = attn.default_backend()
    with attn.use_backend("math"):
        assert attn.default_backend() == "math"
    assert attn.default_backend() == before
    with pytest.raises(RuntimeError), attn.use_backend("math"):
        raise RuntimeError("inside the block")
    assert attn.default_backend() == before
    with pytest.raises(ConfigError, match="unknown"), attn.use_backend("xformers"):
        pass
    assert attn.default_backend() == before


def test_flash_needs_cuda_half(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace())
    q, k, v = _qkv()
    with pytest.raises(ConfigError, match="needs CUDA fp16/bf16 tensors, got cpu torch.float32"):
        attn.attention(q, k, v, scale=1.0, backend="flash")
