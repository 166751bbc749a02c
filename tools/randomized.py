"""Random-weight models of the released architectures, for the demo and the benchmark.

Same module shapes as the official models (each family's released configs and VAE layout, from its
``Family``); depth, width, heads and text width can be changed. Weights are drawn from PyTorch's default
initialisers under a fixed seed, so timings and memory are those of the real shapes while no download
is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastvar_core.families import FAMILIES, family_names, get_family


@dataclass(frozen=True)
class ModelShape:
    """A released model's config (the defaults) or one resized with ``--depth --width ...``."""

    family: str
    name: str
    config: object  # the family's transformer config
    vae_base: int | None = None  # VAE decoder base width (None: the release's)

    @property
    def sizes(self) -> dict[str, int]:
        """``depth``, ``width``, ``heads`` and ``text_width`` of the config (the family's ``sizes``)."""
        return get_family(self.family).sizes(self.config)

    @property
    def depth(self) -> int:
        return self.sizes["depth"]

    @property
    def width(self) -> int:
        return self.sizes["width"]

    @property
    def heads(self) -> int:
        return self.sizes["heads"]

    @property
    def text_width(self) -> int:
        return self.sizes["text_width"]

    def with_overrides(self, depth=None, width=None, heads=None, text_width=None) -> ModelShape:
        config = get_family(self.family).with_sizes(self.config, depth=depth, width=width, heads=heads,
                                                    text_width=text_width)
        return replace(self, config=config)


def released_shapes() -> dict[str, ModelShape]:
    """Every registered family's released models, keyed by lower-case name ("infinity-2b")."""
    family_names()  # the built-in families register on first use
    return {name.lower(): ModelShape(fam.name, name, config)
            for fam in FAMILIES.values() for name, config in fam.released_configs().items()}


SHAPES = released_shapes()


def build_transformer(shape: ModelShape, seed: int = 0, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """A random-weight transformer of ``shape``."""
    torch.manual_seed(seed)
    return get_family(shape.family).random_model(shape.config).to(device=device, dtype=dtype)


def build_vae(shape: ModelShape, seed: int = 1, device="cpu") -> torch.nn.Module:
    """A random-weight VAE (decoder side) of the family's released layout."""
    torch.manual_seed(seed)
    return get_family(shape.family).random_vae(shape.config, shape.vae_base).to(device)


PROMPT_TOKENS = 24  # a typical prompt's length (one sentence), for the random conditioning and the text encoder


def build_text_encoder(shape: ModelShape, depth: int | None = None, seed: int = 3, device="cpu",
                       dtype=torch.float32) -> torch.nn.Module:
    """A random-weight text encoder of the family's release (``depth`` layers; None: the release's)."""
    torch.manual_seed(seed)
    return get_family(shape.family).random_text_encoder(depth).to(device=device, dtype=dtype)


def random_conditioning(shape: ModelShape, batch: int = 1, tokens: int = PROMPT_TOKENS, seed: int = 2, device="cpu"):
    """Text features standing in for the text encoder's output (no encoder weights needed)."""
    g = torch.Generator().manual_seed(seed)
    return get_family(shape.family).random_conditioning(shape.config, batch, tokens, g).to(device)
