"""Dense layers on the fastest CPU kernel PyTorch ships.

PyTorch's CPU float32 ``F.linear`` calls MKL's sgemm, which on non-Intel x86 CPUs (AMD EPYC, Ryzen)
runs generic kernels at about half the speed of oneDNN's: on this project's benchmark machine
(2 Zen cores) oneDNN reaches 330-390 GFLOP/s where MKL gets 170-190. :func:`linear` routes CPU
float32 products through ``torch.ops.mkldnn._linear_pointwise``, the oneDNN op TorchInductor uses for
the same purpose, optionally with the GELU-tanh activation fused. Everywhere else (CUDA, half
precision, autograd, builds without oneDNN) it is ``F.linear``. The oneDNN results are float32
products summed in another order: they differ from MKL's by a few ulp, like results on another CPU.
Infinity runs all its dense layers through it; HART only its diffusion head (see ``hart/model.py``).

The oneDNN op is a private PyTorch API: it is used only after a probe at first use has called it and
found ``F.linear``'s result; a build without it, or where it changed, gets ``F.linear`` everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_enabled = True
_ACTIVATIONS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh")}


def set_onednn(enabled: bool) -> None:
    """Use oneDNN for CPU float32 dense layers (default) or PyTorch's ``F.linear`` (to compare)."""
    global _enabled
    _enabled = bool(enabled)


def probe_onednn():
    """``torch.ops.mkldnn._linear_pointwise`` if it exists and computes ``F.linear`` on a tiny probe, else None.

    The probe's products and sums are small integers, exact in any summation order.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        with torch.no_grad():
            x = torch.arange(6, dtype=torch.float32).view(2, 3)
            w = torch.arange(12, dtype=torch.float32).view(4, 3) - 5
            b = torch.arange(4, dtype=torch.float32)
            works = torch.equal(op(x, w, b, "none", [], ""), F.linear(x, w, b))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if works else None


@functools.cache
def _onednn_op():
    """The probed oneDNN op (or None), found once per process."""
    return probe_onednn()


@contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """:func:`set_onednn` for the block only; the previous setting is back afterwards."""
    before = _enabled
    set_onednn(enabled)
    try:
        yield
    finally:
        set_onednn(before)


def onednn_available() -> bool:
    return _onednn_op() is not None


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and _onednn_op() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``; activation None or "gelu_tanh"."""
    if _use_onednn(x, weight):
        attr, algorithm = _ACTIVATIONS[activation]
        return _onednn_op()(x, weight, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`Linear` (in place; weights untouched).

    Only exact ``nn.Linear`` layers change: a host namespace's layers (docs/architecture.md §5), which may
    store their weights in another dtype or device, keep their own forward.
    """
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = Linear
    return module
