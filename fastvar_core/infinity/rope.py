"""Infinity's 2D rotary position embedding (docs/infinity.md §3.4, mode rope2d_normalized_by_hw=2).

Every scale (ph, pw) is placed on the grid of the template's reference scale (UH, UW) (official: the
last scale of the template's 1M schedule): token (r, c) sits at (round(r*UH/ph), round(c*UW/pw)),
evaluated in float32 with round-half-to-even exactly as the official table builder does. The first
half of each head's channel pairs rotate with the row, the second half with the column; pairs are
interleaved channels (2i, 2i+1). Positions are computed per scale on the fly, so any schedule works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROPE_BASE = 10000.0


def inv_frequencies(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(head_dim/4,) float32 inverse frequencies 10000^(-2j/(head_dim/2)) shared by rows and columns."""
    half = head_dim // 2
    # int64 arange / int -> float32, then float ** tensor, as in the official table builder
    return 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64, device=device) / half))


def axis_positions(n: int, ref: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Grid positions (n,) int64 of n tokens along an axis normalised to ``ref`` cells: round(i * ref/n).

    The product is int64 tensor x Python float, i.e. float32, and torch.round is half-to-even:
    0.5-template (30, 60) on a 45-row grid gives 1.5 -> 2 and 4.5 -> 4; 3.0-template row 27 of 54 on
    111 rows gives 55.5 -> 56 in float32 (55.4999... -> 55 in exact arithmetic).
    """
    return (torch.arange(n, device=device) * (ref / n)).round().long()


def scale_positions(hw: tuple[int, int], grid: tuple[int, int],
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions (h*w,) int64 of a scale's tokens in row-major order."""
    h, w = hw
    rows = axis_positions(h, grid[0], device)[:, None].expand(h, w).reshape(-1)
    cols = axis_positions(w, grid[1], device)[None, :].expand(h, w).reshape(-1)
    return rows, cols


def rope_cos_sin(rows: torch.Tensor, cols: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim/2) float32 for tokens at (rows, cols): pairs [0, hd/4) rows, [hd/4, hd/2) columns."""
    inv = inv_frequencies(head_dim, rows.device)
    angles = torch.cat([rows.float()[:, None] * inv, cols.float()[:, None] * inv], dim=-1)  # (N, hd/2)
    return angles.cos(), angles.sin()


@dataclass
class ScaleRope:
    """cos/sin of every token of one scale, (L, hd/2) float32, with a per-row gather for kept tokens."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, hw: tuple[int, int], grid: tuple[int, int], head_dim: int,
              device: torch.device | str | None = None) -> ScaleRope:
        rows, cols = scale_positions(hw, grid, device)
        return cls(*rope_cos_sin(rows, cols, head_dim))

    def select(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to (B, H, K, hd/2): all tokens in order (idx None) or idx (B, K) per row."""
        if idx is None:
            return self.cos[None, None], self.sin[None, None]  # (1, 1, L, hd/2)
        return self.cos[idx].unsqueeze(1), self.sin[idx].unsqueeze(1)  # (B, 1, K, hd/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, H, L, hd) in float32: (a, b) -> (a cos - b sin, a sin + b cos)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, L, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).flatten(-2)
