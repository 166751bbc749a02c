"""What both VAE decoders share: the activations' memory layout, a GroupNorm exact in it, the x2
upsampling convolution, tiles and their progress.

On the CPU both decoders run channels-last (B, H, W, C in memory): oneDNN convolves that layout
directly, while an NCHW input is reordered to and from its blocked layout on every call, which made
convolutions about 2x slower (docs/architecture.md §6). Other devices keep NCHW, the layout
their convolution and GroupNorm kernels are tuned for.

torch's channels-last CPU GroupNorm accumulates sum and sum of squares sequentially in float32; on
a full-resolution map (hundreds of thousands of values per group) that moves outputs by ~3e-4,
above the decoders' parity tolerance. :func:`group_norm` computes the statistics there with
torch's pairwise reductions of squares centred on each channel's mean, combined in float64
(outputs within ~5e-6 of a float64 reference): four whole-map operations, one buffer.
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


BAND_BYTES = 64 * 2**20  # input rows per band (:func:`norm_silu_conv`, :func:`upsample_conv`); above glibc's largest
# mmap threshold (32 MiB), so a freed band goes back to the system: 16 MiB bands raised the 1024 peak by ~0.05 GiB


def _band_rows(x: torch.Tensor) -> int:
    """Rows of ``x`` (B, C, H, W) in one band of about :data:`BAND_BYTES` (at least one)."""
    B, C, H, W = x.shape
    return max(1, BAND_BYTES // max(1, B * W * C * x.element_size()))


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


def takes_bands(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decoder computing in ``dtype`` on ``device`` runs this module's banded, in-place GroupNorm and
    convolutions (float32 on the CPU) rather than the plain ops (cost.decode_memory counts both)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def _exact_path(x: torch.Tensor) -> bool:
    """Whether ``x`` takes :func:`group_norm`'s own statistics (channels-last float32 on the CPU)."""
    return (takes_bands(x.device, x.dtype) and x.shape[-2] * x.shape[-1] > 1
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def norm(layer: nn.Module, x: torch.Tensor, operations=None, inplace: bool = False) -> torch.Tensor:
    """A namespace GroupNorm ``layer`` applied to ``x`` (into ``x`` itself when ``inplace``); channels-last
    CPU input takes :func:`group_norm`."""
    if not _exact_path(x):
        return x.copy_(layer(x)) if inplace else layer(x)
    w, b = nnops.cast_bias_weight(layer, x.dtype, x.device, operations) if layer.affine else (None, None)
    return group_norm(x, layer.num_groups, w, b, layer.eps, inplace)


def banded_norm_silu_conv(norm_layer: nn.Module, conv: nn.Module, x: torch.Tensor,
                          operations=None, inplace: bool = False) -> torch.Tensor | None:
    """``conv(silu(norm_layer(x)))`` of namespace layers by :func:`norm_silu_conv` (``inplace``: into ``x``), or
    None where it does not apply (the caller runs its own ops)."""
    if not (_exact_path(x) and not torch.is_grad_enabled() and tuple(conv.padding) == (1, 1)
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1):
        return None
    if x.shape[2] <= _band_rows(x):
        return None  # one band: nothing to save, skip the weight casts
    nw, nb = (nnops.cast_bias_weight(norm_layer, x.dtype, x.device, operations) if norm_layer.affine
              else (None, None))
    w, b = nnops.cast_bias_weight(conv, x.dtype, x.device, operations)
    return norm_silu_conv(x, norm_layer.num_groups, nw, nb, norm_layer.eps, w, b, inplace)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, inplace: bool = False) -> torch.Tensor:
    """``F.group_norm`` with float64-combined statistics for channels-last CPU input; same layout out.

    ``inplace``: normalise ``x`` itself (for a map that is dead after this), so only one transient
    scratch of ``x``'s size is used and none is returned; the values are the same as out of place.
    """
    if not _exact_path(x):
        out = F.group_norm(x, num_groups, weight, bias, eps)
        return x.copy_(out) if inplace else out
    B, C, H, W = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view: channels-last memory
    scale, shift, work = _affine(rows, num_groups, weight, bias, eps, keep_work=not inplace)
    out = rows if inplace else work
    torch.addcmul(shift, rows, scale, out=out)  # (B, HW, C)
    return out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


def _affine(rows: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float, keep_work: bool, band: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GroupNorm of ``rows`` (B, HW, C) as a per-channel affine map: float32 (scale, shift), each (B, 1, C),
    and the scratch of ``rows``' size used for the statistics when ``keep_work`` (else it is freed).

    ``band``: take the squares ``band`` positions at a time (a band-sized scratch instead of a map-sized
    one), their float32 pairwise sums combined in float64; as accurate, not bit-identical.
    """
    B, hw, C = rows.shape
    per_group = C // num_groups
    # Per channel: the sum of (x - m)^2 around its mean m (no cancellation); pairwise (cascade) sums,
    # so the float32 error does not grow with the pixel count.
    centre = rows.sum(1).div_(hw)  # (B, C)
    if band is not None and not keep_work:
        s2 = torch.zeros(B, C, dtype=torch.float64, device=rows.device)
        for a in range(0, hw, band):
            part = rows[:, a : a + band]
            s2 += F.mse_loss(part, centre[:, None].expand_as(part), reduction="none").sum(1)
        work = None
    else:
        work = F.mse_loss(rows, centre[:, None].expand_as(rows), reduction="none")  # (x - m)^2, (B, HW, C)
        s2 = work.sum(1)
        if not keep_work:
            work = None
    # Exact float64 combination of the channels' centred sums into group mean and variance.
    s = centre.double().view(B, num_groups, per_group)
    mean = s.mean(-1, keepdim=True)  # (B, G, 1)
    var = (s2.double().view_as(s) + hw * (s - mean).square()).sum(-1, keepdim=True) / (hw * per_group)
    scale = var.clamp_(min=0).add_(eps).rsqrt_()
    if weight is not None:
        scale = scale * weight.double().view(1, num_groups, -1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.double().view(1, num_groups, -1)
    scale, shift = scale.expand(B, num_groups, per_group), shift.expand(B, num_groups, per_group)
    return scale.reshape(B, 1, C).float(), shift.reshape(B, 1, C).float(), work


def norm_silu_conv(x: torch.Tensor, num_groups: int, norm_weight: torch.Tensor | None,
                   norm_bias: torch.Tensor | None, eps: float, weight: torch.Tensor,
                   bias: torch.Tensor | None, inplace: bool = False) -> torch.Tensor | None:
    """``conv3x3(silu(group_norm(x)))`` (padding 1) without a normalised copy of the whole of ``x``.

    Output rows a..b need normalised input rows a-1..b+1 only, so the map is done in row bands, each
    normalised into a small buffer and convolved (zero rows outside the map, as padding) into one
    preallocated output. The elementwise steps are those of the one-shot path and oneDNN convolves a band
    like the whole map at the decoders' widths; the statistics are taken per band (:func:`_affine`), so
    the output is within float rounding of the one-shot ops (~1e-6; not bit-identical). Returns None unless
    ``x`` takes :func:`group_norm`'s exact path without autograd and is large enough for bands to matter (the
    caller then runs the plain ops).
    """
    B, C, H, W = x.shape
    band = _band_rows(x)
    if not _exact_path(x) or torch.is_grad_enabled() or band >= H or weight.shape[-2:] != (3, 3):
        return None
    if inplace and weight.shape[0] != C:
        return None
    rows = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view: channels-last memory
    scale, shift, _ = _affine(rows, num_groups, norm_weight, norm_bias, eps, keep_work=False,
                              band=band * W)
    grid = x.permute(0, 2, 3, 1)  # (B, H, W, C) view
    out = grid if inplace else x.new_empty(B, H, W, weight.shape[0])  # channels-last memory of (B, O, H, W)
    buf = x.new_empty(B, band + 2, W, C)
    halo = x.new_empty(B, 1, W, C) if inplace else None  # normalised row a-1, already overwritten in x
    for a in range(0, H, band):
        b = min(a + band, H)
        lo, hi = max(a - 1, 0), min(b + 1, H)  # input rows a-1..b (clipped to the map)
        piece = buf[:, : b - a + 2]
        piece[:, : lo - a + 1].zero_()  # top padding row (first band only)
        piece[:, hi - a + 1 :].zero_()  # bottom padding row (last band only)
        if inplace and a > 0:
            piece[:, :1].copy_(halo)
            lo = a
        src = piece[:, lo - a + 1 : hi - a + 1]
        torch.addcmul(shift[:, None], grid[:, lo:hi], scale[:, None], out=src)
        F.silu(src, inplace=True)
        if inplace:
            halo.copy_(piece[:, b - a : b - a + 1])  # row b-1, the next band's top halo
        conv = F.conv2d(piece.permute(0, 3, 1, 2), weight, bias, padding=(0, 1))  # (B, O, b-a, W)
        out[:, a:b] = conv.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)  # (B, O, H, W), channels-last


def add_shortcut(h: torch.Tensor, x: torch.Tensor, shortcut: nn.Module, operations=None) -> torch.Tensor:
    """``h += shortcut(x)`` for a 1x1 conv ``shortcut``, in row bands of a large channels-last map (no map-sized
    shortcut output); any other case adds the whole shortcut."""
    band = _band_rows(x)
    if torch.is_grad_enabled() or band >= x.shape[2] or not (_exact_path(x) and _exact_path(h)):
        return h.add_(shortcut(x))
    weight, bias = nnops.cast_bias_weight(shortcut, x.dtype, x.device, operations)
    for a in range(0, x.shape[2], band):
        h[:, :, a : a + band].add_(F.conv2d(x[:, :, a : a + band], weight, bias))
    return h


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


# _PHASE_MIX[a][k, t] = 1 if tap t of a 3x3 kernel row lands on input offset k of the 2-tap window of
# output phase a (phase 0 sees input offsets -1, 0; phase 1 sees 0, +1).
_PHASE_MIX = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2), weight, bias, padding=1)`` without the 4x larger input.

    Output pixel (2i+a, 2j+b) only sees input rows i-1..i (a = 0) or i..i+1 (a = 1), same for columns,
    so each of the four phases is a 2x2 conv of ``x`` whose taps are sums of the 3x3 taps: the same
    result up to float rounding, 2.25x fewer MACs and no nearest-upsampled temporary. The phases are
    interleaved in ``x``'s layout (channels-last in, channels-last out).
    """
    B, C, H, W = x.shape
    mix = _PHASE_MIX.to(weight.device)
    kernels = torch.einsum("aik,ockl,bjl->abocij", mix, weight.float(), mix).to(x.dtype)  # (2, 2, O, C, 2, 2)
    O = kernels.shape[2]
    bias = None if bias is None else bias.to(x.dtype)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    # The four phases interleave in the input's layout: (B, H, 2, W, 2, O) or (B, O, H, 2, W, 2) memory.
    out = x.new_empty(B, H, 2, W, 2, O) if channels_last else x.new_empty(B, O, H, 2, W, 2)
    # Input rows in bands (rows r0..r1 need r0-1..r1+1), so that only a band is padded at a time.
    band = _band_rows(x)
    for r0 in range(0, H, band):
        r1 = min(r0 + band, H)
        padded = F.pad(x[:, :, max(r0 - 1, 0) : min(r1 + 1, H)], (1, 1, int(r0 == 0), int(r1 == H)))  # (B, C, r1-r0+2, W+2)
        for a in (0, 1):
            for b in (0, 1):
                window = padded[:, :, a : a + r1 - r0 + 1, b : b + W + 1]  # valid 2x2 conv -> (B, O, r1-r0, W)
                phase = F.conv2d(window, kernels[a, b], bias)
                if channels_last:
                    out[:, r0:r1, a, :, b] = phase.permute(0, 2, 3, 1)
                else:
                    out[:, :, r0:r1, a, :, b] = phase
    if channels_last:
        return out.view(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)  # (B, O, 2H, 2W)
    return out.view(B, O, 2 * H, 2 * W)
