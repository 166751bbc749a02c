"""Pivotal token selection and cached token restoration (FastVAR, paper §3.2-3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pivotal_scores(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every token to its token map's mean, per row. (B, L, C) -> (B, L) float32."""
    xf = x.float()
    return (xf - xf.mean(dim=1, keepdim=True)).square_().sum(dim=-1)


def select_pivotal(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` tokens of each row farthest from the row's spatial mean.

    Order inside a row is unspecified (top-k without sorting): every consumer is permutation invariant.
    """
    return pivotal_scores(x).topk(keep, dim=1, sorted=False).indices


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


def restore_tokens(
    cached: torch.Tensor,
    cached_hw: tuple[int, int],
    hw: tuple[int, int],
    kept_out: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Full (B, h*w, C) sub-layer output: the cache area-resized to ``hw``, with kept tokens' outputs at ``idx``."""
    full = resize_token_map(cached.to(kept_out.dtype), cached_hw, hw).contiguous()
    b, length, c = full.shape
    full.view(b * length, c).index_copy_(0, _flat_rows(idx, length), kept_out.reshape(-1, c))
    return full
