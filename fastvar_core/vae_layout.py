"""What both VAE decoders share: the activations' memory layout, a GroupNorm exact in it, tiles and their progress.

On the CPU both decoders run channels-last (B, H, W, C in memory): oneDNN convolves that layout
directly, while an NCHW input is reordered to and from its blocked layout on every call, which made
convolutions about 2x slower (docs/architecture.md §6). Other devices keep NCHW, the layout
their convolution and GroupNorm kernels are tuned for.

torch's channels-last CPU GroupNorm accumulates sum and sum of squares sequentially in float32; on
a full-resolution map (hundreds of thousands of values per group) that moves outputs by ~3e-4,
above the decoders' parity tolerance. :func:`group_norm` computes the statistics there with
blocked matrix-vector sums of values centred on a per-channel estimate of the mean, combined in
float64 (outputs within ~1e-6 of a float64 reference), and applies them in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops as nnops

# callback(done, total) after each decoded tile: progress, and a way to stop (raise) between tiles.
TileCallback = Callable[[int, int], None]

_ROWS = 16384  # pixels per statistics block: the squared block stays in cache


def decoder_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) in the decoders' layout for its device (channels-last on the CPU)."""
    if x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def one_pass(decoder: nn.Module, z: torch.Tensor, callback: TileCallback | None) -> torch.Tensor:
    """A whole-latent decode reported as one tile of one."""
    out = decoder(z)
    if callback is not None:
        callback(1, 1)
    return out


def _exact_path(x: torch.Tensor) -> bool:
    """Whether ``x`` takes :func:`group_norm`'s own statistics (channels-last float32 on the CPU)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-2] * x.shape[-1] > 1
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def norm(layer: nn.Module, x: torch.Tensor, operations=None) -> torch.Tensor:
    """A namespace GroupNorm ``layer`` applied to ``x``; channels-last CPU input takes :func:`group_norm`."""
    if not _exact_path(x):
        return layer(x)
    w, b = nnops.cast_bias_weight(layer, x.dtype, x.device, operations) if layer.affine else (None, None)
    return group_norm(x, layer.num_groups, w, b, layer.eps)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm`` with float64-combined statistics for channels-last CPU input; same layout out."""
    B, C, H, W = x.shape
    if not _exact_path(x):
        return F.group_norm(x, num_groups, weight, bias, eps)
    rows = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view: channels-last memory
    block = min(_ROWS, H * W)
    ones = x.new_ones(1, block)
    work = x.new_empty(block, C)
    # Per channel: sums of (x - s) and (x - s)^2 around a shift s near its mean (no cancellation).
    centre = torch.stack([(ones @ rows[b, :block])[0] / block for b in range(B)])  # (B, C)
    sums = torch.zeros(2, B, C, dtype=torch.float64)
    for b in range(B):
        for start in range(0, H * W, block):
            part = rows[b, start:start + block]  # (n, C)
            n = part.shape[0]
            centred = torch.sub(part, centre[b], out=work[:n])
            sums[0, b] += (ones[:, :n] @ centred)[0]
            sums[1, b] += (ones[:, :n] @ centred.mul_(centred))[0]
    # Exact float64 combination of the channels' shifted sums into group mean and variance.
    hw, per_group = H * W, C // num_groups
    s = centre.double().view(B, num_groups, per_group)
    s1, s2 = sums.view(2, B, num_groups, per_group).unbind(0)
    mean = (s1 + hw * s).sum(-1, keepdim=True) / (hw * per_group)  # (B, G, 1)
    d = s - mean
    var = (s2 + 2 * d * s1 + hw * d.square()).sum(-1, keepdim=True) / (hw * per_group)
    scale = var.clamp_(min=0).add_(eps).rsqrt_()
    if weight is not None:
        scale = scale * weight.double().view(1, num_groups, -1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.double().view(1, num_groups, -1)
    scale, shift = scale.expand(B, num_groups, C // num_groups), shift.expand(B, num_groups, C // num_groups)
    out = torch.addcmul(shift.reshape(B, 1, C).float(), rows, scale.reshape(B, 1, C).float())  # (B, HW, C)
    return out.view(B, H, W, C).permute(0, 3, 1, 2)


def tile_sides(tile: int | tuple[int, int]) -> tuple[int, int]:
    """A decode tile as (rows, columns) in latent cells: an int is a square tile."""
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


def blend_spans(size: int, tile: int, overlap: int, q: int, device) -> list[tuple[int, int, torch.Tensor]]:
    """Tiles (start, end, per-pixel weight) along one axis of ``size`` feature positions.

    Tiles of ``tile`` positions are spread evenly so neighbours share at least ``overlap`` positions.
    Each tile's weight (``q`` output pixels per position) is 0 on the outer quarter of an inner
    overlap, where the tile's own zero padding reaches, and ramps linearly to 1 over its middle half;
    weights are normalised to sum to 1 per pixel, so the 2-D blend weight of a tile is the product of
    its row and column weights.
    """
    if size <= tile:
        return [(0, size, torch.ones(q * size, device=device))]
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    dist = torch.arange(q * tile, device=device, dtype=torch.float32) + 0.5  # pixel distance from the start edge
    o = q * overlap
    ramp = ((dist - o / 4) / (o / 2)).clamp(0, 1) if o else torch.ones_like(dist)
    spans, total = [], torch.zeros(q * size, device=device)
    for s in starts:
        weight = torch.ones_like(dist)
        if s > 0:
            weight = torch.minimum(weight, ramp)
        if s + tile < size:
            weight = torch.minimum(weight, ramp.flip(0))
        total[q * s : q * (s + tile)] += weight
        spans.append((s, s + tile, weight))
    return [(s, e, weight / total[q * s : q * e]) for s, e, weight in spans]
