"""Pivotal token selection and cached token restoration (FastVAR, paper §3.2-3.3)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# On the CPU, per-token temporaries larger than this many floats are computed in blocks of tokens: a
# block stays in the cache, whereas one full-size temporary is a fresh allocation (page faults at 2K).
CPU_BLOCK_FLOATS = 1 << 19


def pivotal_scores(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every token to its token map's mean, per row. (B, L, C) -> (B, L) float32."""
    b, length, c = x.shape
    mean = x.mean(dim=1, keepdim=True, dtype=torch.float32)  # (B, 1, C)
    step = max(1, CPU_BLOCK_FLOATS // (b * c)) if x.device.type == "cpu" else length
    if step >= length:
        return (x.float() - mean).square_().sum(dim=-1)
    scores = torch.empty(b, length, dtype=torch.float32, device=x.device)
    for start in range(0, length, step):  # the same arithmetic per token as one full-size pass
        block = x[:, start: start + step].float()
        scores[:, start: start + step] = (block - mean).square_().sum(dim=-1)
    return scores


def top_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` highest scores (B, L) of each row.

    Order inside a row is unspecified (top-k without sorting): every consumer is permutation invariant.
    """
    return scores.topk(keep, dim=1, sorted=False).indices


def select_pivotal(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` tokens of each row farthest from the row's spatial mean."""
    return top_tokens(pivotal_scores(x), keep)


def _flat_rows(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row token indices (B, K) -> indices (B*K,) into the rows of a flattened (B*L, C) tensor."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * length).flatten()


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), idx (B, K) -> (B, K, C).

    A row copy (``index_select`` on the flattened tokens) rather than ``gather``, which reads element by
    element and costs several times more.
    """
    b, length, c = x.shape
    return x.reshape(b * length, c).index_select(0, _flat_rows(idx, length)).view(b, idx.shape[1], c)


def pool_into_public(grid: torch.Tensor, dst_hw: tuple[int, int], *, out: torch.Tensor) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(grid, dst_hw)`` copied into ``out``."""
    return out.copy_(F.adaptive_avg_pool2d(grid, dst_hw))


def probe_pool_into():
    """``torch._C._nn.adaptive_avg_pool2d`` (a private API writing into ``out=``) if it exists and pools
    like ``F.adaptive_avg_pool2d`` on a tiny probe, else the public pool plus a copy (one more temporary)."""
    try:
        private = torch._C._nn.adaptive_avg_pool2d
        grid = torch.arange(12, dtype=torch.float32).view(1, 2, 2, 3).permute(0, 3, 1, 2)  # channels-last
        out = torch.full((1, 3, 3, 3), float("nan")).permute(0, 3, 1, 2)
        private(grid, (3, 3), out=out)
        if torch.equal(out, F.adaptive_avg_pool2d(grid, (3, 3))):
            return private
    except (AttributeError, RuntimeError, TypeError):
        pass
    return pool_into_public


@functools.cache
def _pool_into():
    """The probed pooling-into-``out`` function, found once per process."""
    return probe_pool_into()


def resize_token_map(tokens: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Area-resize a row-major token map (B, h*w, C) from ``src_hw`` to ``dst_hw`` -> (B, H*W, C) contiguous.

    The map is viewed channels-last (B, h, w, C) -> NCHW strides, so the pooling kernel works on whole
    channel vectors and its output is already the token layout (also for B = 1, where a transposed
    view would fall back to the slow planar kernel). ``out``: a contiguous (B, H*W, C) tensor to write into.
    """
    b, _, c = tokens.shape
    grid = tokens.reshape(b, *src_hw, c).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last strides
    if out is None:
        grid = F.adaptive_avg_pool2d(grid, dst_hw)  # = interpolate(mode="area"); (B, C, H, W) channels-last
        return grid.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], c)
    _pool_into()(grid, dst_hw, out=out.view(b, *dst_hw, c).permute(0, 3, 1, 2))
    return out


def restore_tokens(
    cached: torch.Tensor,
    cached_hw: tuple[int, int],
    hw: tuple[int, int],
    kept_out: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full (B, h*w, C) sub-layer output: the cache area-resized to ``hw``, with kept tokens' outputs at ``idx``.

    ``out``: a contiguous (B, h*w, C) tensor of ``kept_out``'s dtype to fill and return (a reused
    workspace saves a fresh full-size allocation per sub-layer).
    """
    b, c = kept_out.shape[0], kept_out.shape[-1]
    length = hw[0] * hw[1]
    if out is not None and (tuple(out.shape) != (b, length, c) or out.dtype != kept_out.dtype
                            or out.device != kept_out.device or not out.is_contiguous()):
        raise ValueError(f"restore_tokens: out must be a contiguous {(b, length, c)} {kept_out.dtype} tensor "
                         f"on {kept_out.device}, found {tuple(out.shape)} {out.dtype} on {out.device}")
    full = resize_token_map(cached.to(kept_out.dtype), cached_hw, hw, out).contiguous()
    full.view(b * length, c).index_copy_(0, _flat_rows(idx, length), kept_out.reshape(-1, c))
    return full
