"""Small injected faults for the parity self-check (``make parity-mutants``, docs/parity.md "Mutants").

tests/conftest.py installs the mutant named by the environment variable FASTVAR_MUTANT before any test
module is imported. Each fault is small enough to hide in float noise if the parity rule were loose;
the self-check passes only when every one makes a parity test fail.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F

from fastvar_core import hart, infinity
from fastvar_core.hart import sampler as hart_sampler
from fastvar_core.infinity import sampler as infinity_sampler
from fastvar_core.pruning import run as pruning_run
from fastvar_core.pruning import tokens as pruning_tokens


def _scaled_logits() -> None:
    """Logits scaled by 1.0005 right before top-k/top-p and the draw (both families)."""
    for module, name in ((hart_sampler, "filter_logits_"), (infinity_sampler, "filter_bit_logits")):
        original = getattr(module, name)

        @functools.wraps(original)
        def scaled(logits, *args, _original=original, **kwargs):
            return _original(logits.mul_(1.0005), *args, **kwargs)

        setattr(module, name, scaled)


def _neighbour_token() -> None:
    """In the first pruned sub-layer of every run, the most distinct kept token is replaced by its neighbour."""
    original_sublayer = pruning_run.PruningRun.add_sublayer
    original_top = pruning_run.top_tokens
    armed = {"on": False}

    def add_sublayer(self, layer, name, x, branch):
        first = self.prunes(layer) and not getattr(self, "_mutated", False)
        if first:
            self._mutated = True
        armed["on"] = first
        try:
            return original_sublayer(self, layer, name, x, branch)
        finally:
            armed["on"] = False

    def top_tokens(scores, keep):
        idx = original_top(scores, keep)
        if armed["on"]:
            idx = idx.clone()
            j = int(scores[0].gather(0, idx[0]).argmax())
            idx[0, j] = (idx[0, j] + 1) % scores.shape[1]
        return idx

    pruning_run.PruningRun.add_sublayer = add_sublayer
    pruning_run.top_tokens = top_tokens


def _cfg_offset() -> None:
    """Classifier-free guidance strength off by 0.01 (both families, every scale)."""

    def shifted(cfg):
        return [c + 0.01 for c in cfg] if isinstance(cfg, (list, tuple)) else cfg + 0.01

    for modules, name in (((infinity, infinity_sampler), "sample_infinity"), ((hart, hart_sampler), "sample_hart")):
        original = getattr(modules[1], name)

        @functools.wraps(original)
        def wrapped(*args, _original=original, **kwargs):
            if "cfg" in kwargs:
                kwargs["cfg"] = shifted(kwargs["cfg"])
            return _original(*args, **kwargs)

        for module in modules:
            setattr(module, name, wrapped)


def _bilinear_restore() -> None:
    """Pruned tokens restored from the cache with bilinear instead of area interpolation."""

    def resize(tokens, src_hw, dst_hw):
        b, _, c = tokens.shape
        grid = tokens.reshape(b, *src_hw, c).permute(0, 3, 1, 2)
        full = F.interpolate(grid, size=dst_hw, mode="bilinear", align_corners=False)
        return full.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], c)

    pruning_tokens.resize_token_map = resize


MUTANTS = {
    "logits-x1.0005": _scaled_logits,
    "kept-token-neighbour": _neighbour_token,
    "cfg+0.01": _cfg_offset,
    "restore-bilinear": _bilinear_restore,
}


def install(name: str) -> None:
    if name not in MUTANTS:
        raise SystemExit(f"FASTVAR_MUTANT={name!r} is not a mutant; known: {', '.join(MUTANTS)}")
    MUTANTS[name]()
