"""Values that travel along the pack's links. Each custom type carries its model family so that a
HART part wired into an Infinity graph (or the reverse) fails with a clear message, not a crash."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..fastvar_core.errors import IncompatibleModelsError
from ..fastvar_core.families import family_names, get_family

MODEL = "FASTVAR_MODEL"
VAE = "FASTVAR_VAE"
TEXT_ENCODER = "FASTVAR_TEXT_ENCODER"
CONDITIONING = "FASTVAR_CONDITIONING"
PRUNING = "FASTVAR_PRUNING"
LATENT = "FASTVAR_LATENT"


def family_label(name: str) -> str:
    """A family's display name ("Infinity", "HART"); an unregistered name as given."""
    return get_family(name).label if name in family_names() else name


@dataclass
class Part:
    """A loaded model part: transformer, VAE or text encoder."""

    family: str
    module: torch.nn.Module
    source: str
    patcher: object  # ComfyUI's ModelPatcher holding ``module`` (compat.Holder outside ComfyUI)
    attention: str = "auto"
    companion: Part | None = None  # the VAE part the sampler itself needs (Family.sampler_needs_vae: HART)


@dataclass
class Conditioning:
    family: str
    value: object  # InfinityTextConditioning or HARTTextConditioning
    prompts: list[str] = field(default_factory=list)


@dataclass
class Latent:
    family: str
    result: object  # fastvar_core.sampling.SampleResult
    info: str = ""
    rerun: object = None  # () -> SampleResult recording kept tokens, when this run did not record them


def same_family(what: str, expected: str, found: str, hint: str = "") -> None:
    """Raise IncompatibleModelsError when two connected parts belong to different families."""
    if expected != found:
        raise IncompatibleModelsError(
            f"{what} is for {family_label(found)}, but the model is {family_label(expected)}"
            f"{': ' + hint if hint else ''}"
        )
