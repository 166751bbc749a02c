"""Pivotal token selection and cached token restoration (FastVAR, paper §3.2-3.3)."""

from __future__ import annotations

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


# Channels of the cache resized at once when restoring: the resized block is (B, L, channels), at most this
# many values, so restoring needs no full-size buffer beside the residual stream.
RESTORE_BLOCK_VALUES = 1 << 22


def resize_token_map(tokens: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Area-resize a row-major token map (B, h*w, C) from ``src_hw`` to ``dst_hw`` -> (B, H*W, C) contiguous.

    The map is viewed channels-last (B, h, w, C) -> NCHW strides, so the pooling kernel works on whole
    channel vectors and its output is already the token layout (also for B = 1, where a transposed
    view would fall back to the slow planar kernel).
    """
    b, _, c = tokens.shape
    grid = tokens.reshape(b, *src_hw, c).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last strides
    grid = F.adaptive_avg_pool2d(grid, dst_hw)  # = interpolate(mode="area"); (B, C, H, W) channels-last
    return grid.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], c)


def add_restored_(
    x: torch.Tensor,
    kept_x: torch.Tensor,
    cached: torch.Tensor,
    cached_hw: tuple[int, int],
    hw: tuple[int, int],
    kept_out: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Add a pruned sub-layer's full output to the residual stream x (B, h*w, C) in place and return x.

    The full output is the cache (B, ch*cw, C) area-resized to ``hw``, with the kept tokens' outputs
    ``kept_out`` (B, K, C) at ``idx`` (B, K); ``kept_x`` is x at ``idx`` before the call (the branch input).
    The cache is resized a block of channels at a time (pooling treats channels alike, so the values are
    those of one full-size pass) and added to every token; the kept tokens are then overwritten with
    ``kept_x + kept_out``. Each token thus gets x + its output, as with a full-size output tensor.
    """
    b, length, c = x.shape
    cached = cached.to(kept_out.dtype)
    step = max(64, RESTORE_BLOCK_VALUES // (b * length) // 64 * 64)
    if step >= c:
        x.add_(resize_token_map(cached, cached_hw, hw))
    else:
        for a in range(0, c, step):
            x[..., a: a + step].add_(resize_token_map(cached[..., a: a + step].contiguous(), cached_hw, hw))
    x.view(b * length, c).index_copy_(0, _flat_rows(idx, length), (kept_x + kept_out).to(x.dtype).reshape(-1, c))
    return x
