"""Dense layers: the oneDNN path (a private PyTorch op, docs in fastvar_core/linear.py) and its F.linear fallback."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from fastvar_core import linear as linear_mod


def _inputs(seed=0, rows=5, cin=24, cout=40):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, rows, cin, generator=g), torch.randn(cout, cin, generator=g),
            torch.randn(cout, generator=g))


def _reference(x, w, b, activation):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_both_paths_compute_f_linear(monkeypatch, activation, with_bias):
    x, w, b = _inputs()
    b = b if with_bias else None
    expected = _reference(x, w, b, activation)
    if linear_mod.onednn_available():  # oneDNN sums in another order: a few ulp apart
        torch.testing.assert_close(linear_mod.linear(x, w, b, activation), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(linear_mod, "_onednn_op", lambda: None)  # the fallback a build without the op gets
    assert not linear_mod.onednn_available()
    assert torch.equal(linear_mod.linear(x, w, b, activation), expected)


def test_probe_finds_the_op_or_none():
    op = linear_mod.probe_onednn()
    assert (op is not None) == linear_mod.onednn_available()


@pytest.mark.parametrize("breakage", ["no_mkldnn", "no_op", "raises", "wrong"])
def test_probe_falls_back_when_the_private_op_is_missing_or_changed(monkeypatch, breakage):
    if breakage == "no_mkldnn":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    elif breakage == "no_op":
        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    else:
        def op(x, w, b, *args):
            if breakage == "raises":
                raise RuntimeError("unknown signature")
            return F.linear(x, w, b) + 1

        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_linear_pointwise=op))
    assert linear_mod.probe_onednn() is None


def test_linear_module_keeps_nn_linear_state_dict():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3))
    fast = linear_mod.use_fast_linears(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    fast.load_state_dict(plain.state_dict())
    assert type(fast[0]) is linear_mod.Linear
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)


def test_use_onednn_restores_the_setting(monkeypatch):
    assert linear_mod._enabled
    with linear_mod.use_onednn(False):
        assert not linear_mod._enabled
    assert linear_mod._enabled
    with pytest.raises(RuntimeError), linear_mod.use_onednn(False):
        raise RuntimeError("inside the block")
    assert linear_mod._enabled
