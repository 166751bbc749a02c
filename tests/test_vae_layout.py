"""The decoders' channels-last CPU layout: GroupNorm statistics exact there, results equal to NCHW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvar_core.infinity.vae import Upsample
from fastvar_core.hart.vae import Upsample2x
from fastvar_core.vae_layout import blend_spans, decoder_layout, group_norm


def _offset_map(seed: int, shape=(2, 64, 96, 80)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a large mean next to a small spread: where sum-of-squares statistics lose digits
    return torch.randn(shape, generator=g) * 0.5 + 6.0


@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_group_norm_matches_a_float64_reference(affine):
    x = _offset_map(0)
    g = torch.Generator().manual_seed(1)
    weight, bias = (torch.randn(64, generator=g), torch.randn(64, generator=g)) if affine else (None, None)
    ref = F.group_norm(x.double(), 32, None if weight is None else weight.double(),
                       None if bias is None else bias.double(), 1e-6)
    out = group_norm(decoder_layout(x), 32, weight, bias, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 2e-5
    # torch's own channels-last kernel, for scale: the error this module exists to avoid
    native = F.group_norm(decoder_layout(x), 32, weight, bias, 1e-6)
    assert (native.double() - ref).abs().max().item() > 5 * (out.double() - ref).abs().max().item()


def test_group_norm_on_nchw_input_is_torchs():
    x = _offset_map(2)
    w, b = torch.randn(64), torch.randn(64)
    assert torch.equal(group_norm(x, 32, w, b, 1e-6), F.group_norm(x, 32, w, b, 1e-6))


def test_upsample_gives_the_same_map_in_both_layouts():
    torch.manual_seed(3)
    up = Upsample(32).eval()
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        nchw = up(x)
        cl = up(decoder_layout(x))
    assert cl.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    torch.testing.assert_close(cl, nchw, atol=1e-5, rtol=0)
    reference = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.conv.weight, up.conv.conv.bias,
                         padding=1)
    torch.testing.assert_close(cl, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,tile,overlap", [(48, 32, 8), (96, 32, 16), (100, 40, 10), (64, 64, 16)])
def test_blend_weights_sum_to_one(size, tile, overlap):
    spans = blend_spans(size, tile, overlap, 4, "cpu")
    total = torch.zeros(4 * size)
    for i, (start, end, weight) in enumerate(spans):
        assert end - start == min(tile, size) and weight.shape == (4 * (end - start),)
        if i:
            assert spans[i - 1][1] - start >= overlap  # neighbours share at least `overlap` positions
        total[4 * start : 4 * end] += weight
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_hart_upsample_equals_nearest_then_conv_in_both_layouts():
    torch.manual_seed(4)
    up = Upsample2x(32).eval()
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        reference = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
        nchw, cl = up(x), up(decoder_layout(x))
    assert cl.shape == (2, 32, 18, 22) and cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nchw, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(cl, reference, atol=1e-5, rtol=0)
