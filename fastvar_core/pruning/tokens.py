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


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), idx (B, K) -> (B, K, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def resize_token_map(tokens: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Area-resize a row-major token map (B, h*w, C) from ``src_hw`` to ``dst_hw`` -> (B, H*W, C)."""
    b, _, c = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, c, *src_hw)  # (B, C, h, w)
    grid = F.interpolate(grid, size=dst_hw, mode="area")  # (B, C, H, W)
    return grid.flatten(2).transpose(1, 2)


def restore_tokens(
    cached: torch.Tensor,
    cached_hw: tuple[int, int],
    hw: tuple[int, int],
    kept_out: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Full (B, h*w, C) sub-layer output: the cache area-resized to ``hw``, with kept tokens' outputs at ``idx``."""
    full = resize_token_map(cached.to(kept_out.dtype), cached_hw, hw).contiguous()
    return full.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, kept_out.shape[-1]), kept_out)
