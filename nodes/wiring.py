"""Checks of a node's wiring read from the running prompt (ComfyUI's hidden PROMPT input), made before the
long computation that would otherwise fail at its end."""

from __future__ import annotations

from ..fastvar_core import families

from .objects import check_inputs


def consumers(prompt: dict | None, unique_id, class_type: str) -> list[dict]:
    """The inputs of every node of ``class_type`` in the running prompt whose ``latent`` is this node's output 0."""
    latent = [str(unique_id), 0]
    return [node.get("inputs", {}) for node in (prompt or {}).values()
            if node.get("class_type") == class_type and node.get("inputs", {}).get("latent") == latent]


def feeds_token_map(prompt: dict | None, unique_id) -> bool:
    """Whether a FastVAR Token Map node of the running prompt takes this sampler's latent."""
    return bool(consumers(prompt, unique_id, "FastVAR_TokenMap"))


def decode_vaes(prompt: dict | None, unique_id) -> list[tuple[type, dict]]:
    """(VAE loader node class, its widget values) of every FastVAR Decode that decodes this node's output 0,
    when the Decode's VAE comes straight from one of the pack's VAE loaders."""
    from . import NODE_CLASS_MAPPINGS

    prompt = prompt or {}
    found = []
    for inputs in consumers(prompt, unique_id, "FastVAR_Decode"):
        link = inputs.get("vae")
        loader = prompt.get(str(link[0])) if isinstance(link, list) and link else None
        cls = NODE_CLASS_MAPPINGS.get(loader.get("class_type")) if loader else None
        if cls is not None and hasattr(cls, "vae_path"):
            found.append((cls, loader.get("inputs", {})))
    return found


def check_decode_vae(prompt: dict | None, unique_id, model) -> None:
    """IncompatibleModelsError before sampling when a Decode of this sampler's latent gets a VAE of another
    family, or (from the file's shapes) one that does not belong to the model."""
    for cls, widgets in decode_vaes(prompt, unique_id):
        check_inputs("FastVAR Decode (fed by this sampler)",
                     {"latent": (model.family, "a latent made by {}"), "vae": (cls.FAMILY, "a VAE of {}")})
        values = [v for v in widgets.values() if isinstance(v, str)]
        if len(values) != 1:
            continue  # the file name comes from another node: Decode checks the loaded VAE
        path = cls.vae_path(values[0])
        families.check_vae_file(model.family, model.module, path, f"FastVAR Decode's VAE '{values[0]}'")
