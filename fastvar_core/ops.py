"""The operations namespace: where the models take their weight-holding layers from.

Every model class takes ``operations=`` (None: :class:`TorchOps`, i.e. torch.nn) and builds its
``Linear``, ``LayerNorm``, ``Conv2d``, ``Embedding`` and ``GroupNorm`` layers from it, the way
ComfyUI's own models take ``comfy.ops``. A host can thus hand in layer classes that keep their weights
in another dtype (fp8) or on another device (lowvram offload) and cast them at call time.

Code that needs a layer's weight itself (fused products, fp32 heads, codebook reads, the phase-split
upsampling) gets it through :func:`cast_bias_weight`, never from ``.weight`` directly. The contract a
host must meet is in docs/architecture.md ("Operations namespace").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import linear as fast


# How a transformer's Linear weights may be stored, by the names of ComfyUI's Load Diffusion Model node
# ("default": in the compute dtype; "_fast" also multiplies in fp8 where the host supports it).
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}


class TorchOps:
    """The default namespace: torch.nn's layers (weights stored in the compute dtype and device)."""

    Linear = nn.Linear
    LayerNorm = nn.LayerNorm
    Conv2d = nn.Conv2d
    Embedding = nn.Embedding
    GroupNorm = nn.GroupNorm


class CastOps(TorchOps):
    """torch.nn's layers, but ``Linear`` may store its weights in another dtype (e.g. fp8, see
    :func:`store_weights`) and casts them to the input's dtype and device at call time."""

    class Linear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, *CastOps.cast_bias_weight(self, dtype=x.dtype, device=x.device, bias_dtype=x.dtype))

    @staticmethod
    def cast_bias_weight(layer, dtype=None, device=None, bias_dtype=None):
        bias = getattr(layer, "bias", None)
        return layer.weight.to(device, dtype), None if bias is None else bias.to(device, bias_dtype or dtype)


def stored_keys(model: nn.Module, operations) -> list[str]:
    """State-dict keys of the parameters :func:`store_weights` converts (those of every ``operations.Linear``),
    so a loader can put them in their storage dtype straight from the file."""
    return [f"{name}.{p}" if name else p for name, m in model.named_modules()
            if isinstance(m, resolve(operations).Linear) for p, _ in m.named_parameters(recurse=False)]


def store_weights(model: nn.Module, dtype: torch.dtype, operations) -> int:
    """Keep the weights and biases of every ``operations.Linear`` of ``model`` in ``dtype`` (the bulk of a
    transformer's weights; the namespace casts them at call time). Returns how many layers changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, operations.Linear):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            n += 1
    return n


# Layer classes whose weights are plain tensors used as stored (fastvar's Linear is nn.Linear on oneDNN).
_PLAIN = (nn.Linear, fast.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding, nn.GroupNorm)


def resolve(operations) -> type | object:
    return TorchOps if operations is None else operations


def is_plain(layer: nn.Module) -> bool:
    """True for an exact torch.nn (or fastvar Linear) layer, whose ``.weight`` is what it computes with."""
    return type(layer) in _PLAIN


def cast_bias_weight(layer: nn.Module, dtype: torch.dtype, device: torch.device | str,
                     operations=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s (weight, bias) in ``dtype`` on ``device`` (bias None when it has none).

    A plain torch layer's tensors are returned as stored (or converted with ``.to``); any other layer
    goes through the namespace's ``cast_bias_weight(layer, dtype=, device=, bias_dtype=)`` when it has
    one (ComfyUI's ``comfy.ops.cast_bias_weight`` fits), else through ``.to(device, dtype)``.
    """
    hook = getattr(resolve(operations), "cast_bias_weight", None)
    if hook is not None and not is_plain(layer):
        return hook(layer, dtype=dtype, device=device, bias_dtype=dtype)
    bias = getattr(layer, "bias", None)
    return layer.weight.to(device, dtype), None if bias is None else bias.to(device, dtype)


def linear(layer: nn.Module, x: torch.Tensor, operations=None, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """activation(x @ W.T + b) of a namespace ``Linear`` in x's dtype; ``bias`` replaces the layer's own.

    A plain layer runs on :func:`fastvar_core.linear.linear` (oneDNN on CPU float32); any other on
    ``F.linear`` with the weight from :func:`cast_bias_weight`.
    """
    w, b = cast_bias_weight(layer, x.dtype, x.device, operations)
    b = b if bias is None else bias
    if is_plain(layer):
        return fast.linear(x, w, b, activation)
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def embedding(layer: nn.Module, idx: torch.Tensor, dtype: torch.dtype, operations=None) -> torch.Tensor:
    """Rows ``idx`` of a namespace ``Embedding`` in ``dtype``, on idx's device."""
    w, _ = cast_bias_weight(layer, dtype, idx.device, operations)
    return F.embedding(idx, w)
