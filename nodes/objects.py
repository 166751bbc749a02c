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
    model: object = None  # the transformer that made it, for Decode's VAE check
    sampling_bytes: int | None = None  # working memory of sampling this image unpruned: the decode's cap


def check_inputs(node: str, inputs: dict[str, tuple[str, str]]) -> None:
    """IncompatibleModelsError naming the miswired inputs when the parts wired into ``node`` are of different
    families. ``inputs``: input name -> (family, what it holds with ``{}`` for the family's label, e.g. "a {} model");
    the first one is what the others must match."""
    (ref, (family, what)), *others = inputs.items()
    wrong = [(name, f, w) for name, (f, w) in others if f != family]
    if wrong:
        held = "; ".join(f"'{name}' holds {w.format(family_label(f))}" for name, f, w in wrong)
        encoders = ", ".join(f"{get_family(f).label}: {get_family(f).text_encoder_name}" for f in family_names())
        raise IncompatibleModelsError(
            f"{node}: input '{ref}' holds {what.format(family_label(family))}, but {held}. Connect parts of one model family "
            f"(each family's text encoder: {encoders}; its VAE: Load {family_label(family)} VAE)."
        )
