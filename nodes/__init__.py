"""ComfyUI node classes of the pack. Import-safe without ComfyUI (see compat.py)."""

from . import compat
from .generation import FastVARDecode, FastVARPruning, FastVARSampler, FastVARTokenMap, TextEncode
from .loaders import (
    LoadHARTModel,
    LoadHARTVAE,
    LoadInfinityModel,
    LoadInfinityVAE,
    LoadQwen2TextEncoder,
    LoadT5TextEncoder,
)

compat.register_folders()

_NODES = {
    "FastVAR_LoadInfinityModel": (LoadInfinityModel, "Load Infinity Model"),
    "FastVAR_LoadInfinityVAE": (LoadInfinityVAE, "Load Infinity VAE"),
    "FastVAR_LoadT5TextEncoder": (LoadT5TextEncoder, "Load T5 Text Encoder"),
    "FastVAR_LoadHARTModel": (LoadHARTModel, "Load HART Model"),
    "FastVAR_LoadHARTVAE": (LoadHARTVAE, "Load HART VAE"),
    "FastVAR_LoadQwen2TextEncoder": (LoadQwen2TextEncoder, "Load Qwen2 Text Encoder"),
    "FastVAR_TextEncode": (TextEncode, "FastVAR Text Encode"),
    "FastVAR_Pruning": (FastVARPruning, "FastVAR Pruning"),
    "FastVAR_Sampler": (FastVARSampler, "FastVAR Sampler"),
    "FastVAR_Decode": (FastVARDecode, "FastVAR Decode"),
    "FastVAR_TokenMap": (FastVARTokenMap, "FastVAR Token Map"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _NODES.items()}

from . import routes  # noqa: E402,F401  (registers the schedule-chart endpoint inside ComfyUI)
