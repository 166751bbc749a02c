"""The decoders' channels-last CPU layout: GroupNorm statistics exact there, results equal to NCHW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvar_core.infinity.vae import Upsample
from fastvar_core.hart.vae import Upsample2x
from fastvar_core import vae_layout
from fastvar_core.vae_layout import blend_spans, decoder_layout, group_norm, norm_silu_conv, upsample_conv


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


def test_group_norm_in_place_writes_the_same_values_into_its_input():
    x = decoder_layout(_offset_map(5))
    w, b = torch.randn(64), torch.randn(64)
    expected = group_norm(x, 32, w, b, 1e-6)
    y = x.clone()
    out = group_norm(y, 32, w, b, 1e-6, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal(y, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("band_rows", [1, 5, 23])
def test_banded_norm_silu_conv_equals_the_one_shot_ops(monkeypatch, band_rows):
    g = torch.Generator().manual_seed(6)
    x = decoder_layout(_offset_map(6, (2, 64, 24, 16)))
    nw, nb = torch.randn(64, generator=g), torch.randn(64, generator=g)
    w, b = torch.randn(32, 64, 3, 3, generator=g) * 0.05, torch.randn(32, generator=g)
    monkeypatch.setattr(vae_layout, "BAND_BYTES", band_rows * 2 * 16 * 64 * 4)
    with torch.no_grad():
        reference = F.conv2d(F.silu(group_norm(x, 32, nw, nb, 1e-6)), w, b, padding=1)
        out = norm_silu_conv(x, 32, nw, nb, 1e-6, w, b)
    assert out.shape == (2, 32, 24, 16) and out.is_contiguous(memory_format=torch.channels_last)
    # oneDNN may pick another kernel for a band at this small width (bit-equal at the decoders' widths)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert torch.equal(x, decoder_layout(_offset_map(6, (2, 64, 24, 16))))  # the input is left as it was


def test_banded_norm_silu_conv_declines_what_it_does_not_cover(monkeypatch):
    monkeypatch.setattr(vae_layout, "BAND_BYTES", 16 * 64 * 4)
    x, w = _offset_map(7, (1, 64, 8, 16)), torch.randn(8, 64, 3, 3)
    with torch.no_grad():
        assert norm_silu_conv(x, 32, None, None, 1e-6, w, None) is None  # NCHW: not the exact path
        assert norm_silu_conv(decoder_layout(x), 32, None, None, 1e-6, torch.randn(8, 64, 1, 1), None) is None
    assert norm_silu_conv(decoder_layout(x), 32, None, None, 1e-6, w, None) is None  # autograd on


@pytest.mark.parametrize("band_rows", [1, 4])
def test_upsample_conv_in_row_bands_equals_nearest_then_conv(monkeypatch, band_rows):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 32, 9, 7, generator=g)
    w, b = torch.randn(16, 32, 3, 3, generator=g) * 0.05, torch.randn(16, generator=g)
    reference = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    monkeypatch.setattr(vae_layout, "BAND_BYTES", band_rows * 7 * 32 * 4)
    for layout in (x, decoder_layout(x)):
        torch.testing.assert_close(upsample_conv(layout, w, b), reference, atol=1e-5, rtol=0)
