"""Loader nodes: transformer, VAE and text encoder of each family, from ComfyUI's model folders."""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import torch

from ..fastvar_core import families
from ..fastvar_core.families import get_family
from ..fastvar_core.ops import WEIGHT_DTYPES

from . import compat
from .objects import MODEL, TEXT_ENCODER, VAE, Part

INFINITY_MODEL_DIRS = ("infinity", "diffusion_models")
INFINITY_VAE_DIRS = ("vae", "infinity")
HART_DIRS = ("hart",)
# Hugging Face text-encoder folders may sit in models/text_encoders or in the family's own folder.
T5_DIRS = ("text_encoders", "infinity")
QWEN_DIRS = ("text_encoders", "hart")
T5_KINDS = ("t5",)
QWEN_KINDS = ("qwen2", "qwen2_vl")
HART_MODEL_KINDS = ("hart_release", "hart_transformer_t2i")
HART_VAE_KINDS = ("hart_release", "hart_autoencoder_with_disc")
DTYPES = ["auto", "float32", "bfloat16", "float16"]
ATTENTION = ["auto", "sdpa", "flash", "math"]


DTYPE_TOOLTIP = "Precision the model computes in. auto: bfloat16 on GPUs that support it, float32 on the CPU."
WEIGHT_DTYPE_TOOLTIP = ("How the transformer's weights are stored. default: in the compute precision. fp8: half the "
                        "memory of bfloat16, cast at use, slightly different images; fp8_e4m3fn_fast also multiplies "
                        "in fp8 on GPUs that support it.")
ATTENTION_TOOLTIP = ("Attention kernel. auto: flash-attn when installed and on a CUDA GPU in 16-bit, "
                     "else PyTorch SDPA. math is slow and only for checking.")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weights_info(part: Part, storage: str) -> str:
    """The loader's info text: the bytes the part holds and how they are stored, e.g.
    "weights: 4.21 GiB (default, bfloat16 + float32)"; a companion part (HART's VAE) is named after it."""
    from ..fastvar_core.memory import amount, tensor_bytes

    text = f"weights: {amount(tensor_bytes(part.module))} ({storage})"
    if part.companion is not None:
        text += f"; its VAE: {amount(tensor_bytes(part.companion.module))}"
    return text


def _dtype_name(module: torch.nn.Module) -> str:
    """The floating dtypes a part's tensors are stored in, most bytes first ("float32", "bfloat16 + float32")."""
    sizes: dict[torch.dtype, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel() * t.element_size()
    return " + ".join(str(d).removeprefix("torch.") for d in sorted(sizes, key=sizes.get, reverse=True)) or "none"


def shown(part: Part, storage: str) -> dict:
    """A loader node's return: the part, with its weight bytes as UI text (ComfyUI keeps it in the history)
    and in the log."""
    info = weights_info(part, storage)
    compat.log.info("FastVAR: %s: %s", Path(part.source).name, info)
    return {"ui": {"text": [info]}, "result": (part,)}


def load_model_part(family: str, path, dtype: str, attention: str, weight_dtype: str = "default") -> Part:
    """A transformer Part; a family whose sampler needs the VAE (HART) gets its release's VAE as companion."""
    fam = get_family(family)
    load, offload = compat.devices(compat.DIFFUSION)
    dt, storage = pick_dtype(dtype, load), WEIGHT_DTYPES[weight_dtype]
    ops = compat.operations(storage, dt, load, fast=weight_dtype.endswith("_fast"))
    # fp8 storage goes straight from the file into fp8: the load never holds the weights in the compute dtype.
    model = fam.load_model(path, device=offload, dtype=dt, operations=ops, weight_dtype=storage)
    companion = None
    if fam.sampler_needs_vae():
        # Like upstream, the transformer samples with its release's VAE codebook (HART: tokenizer/ beside llm/).
        companion = load_vae_part(family, fam.default_vae(path))
        families.check_pair(fam, model, companion.module)
    return Part(fam.name, model, str(path), compat.patcher(model, compat.DIFFUSION), attention, companion=companion)


# Loaded VAEs by (family, folder or file): the HART model's companion and Load HART VAE share one; an entry
# goes when ComfyUI drops the last output holding it (a loader input changed).
_vaes: weakref.WeakValueDictionary[tuple[str, str], Part] = weakref.WeakValueDictionary()


def load_vae_part(family: str, path) -> Part:
    fam = get_family(family)
    where = Path(fam.default_vae(path) if fam.has_default_vae else path).resolve()
    part = _vaes.get((fam.name, str(where)))
    if part is None:
        load, offload = compat.devices(compat.VAE)
        dtype = compat.vae_dtype(load, fam.vae_dtypes)  # decode casts the latent in and the image back to float32
        vae = fam.load_vae(where, device=offload, dtype=dtype, operations=compat.operations(None, dtype, load))
        part = _vaes[(fam.name, str(where))] = Part(fam.name, vae, str(where), compat.patcher(vae, compat.VAE))
    return part


def load_text_encoder_part(family: str, path, tokenizer, dtype: str) -> Part:
    load, offload = compat.devices(compat.TEXT_ENCODER)
    # "auto" follows ComfyUI's text-encoder flags (--bf16-text-enc, ...) when one is given.
    forced = compat.text_encoder_dtype(load) if dtype == "auto" else None
    enc = get_family(family).load_text_encoder(path, tokenizer, device=offload, dtype=forced or pick_dtype(dtype, load))
    return Part(family, enc, str(path), compat.patcher(enc, compat.TEXT_ENCODER))


SHARD = re.compile(r"-\d{5}-of-\d{5}\.")  # model-00001-of-00002.safetensors: one piece of a folder's weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def _choices(names: tuple[str, ...], want: str, keep=lambda name: True, kinds=None) -> list[str]:
    return [n for n in compat.list_entries(names, want, kinds) if keep(n)]


def _whole_file(names: tuple[str, ...], name: str) -> bool:
    """False for a shard or a file in a tokenizer folder: pieces of a folder, not a model of their own."""
    if SHARD.search(name):
        return False
    folder = compat.resolve(names, name).parent
    return not any((folder / f).is_file() for f in TOKENIZER_FILES)


def _releases_once(folders: list[str]) -> list[str]:
    """Release folders without their own sub-folders (``hart-0.7b-1024px/llm``): one entry per release."""
    return [f for f in folders if not any(f.startswith(r + "/") for r in folders)]


class LoadInfinityModel:
    DESCRIPTION = ("Loads an official Infinity transformer: infinity_2b_reg.pth (or .safetensors) or the sharded "
                   "infinity_8b_weights folder. Size and settings are detected from the file.")
    FAMILY, DIRS = "infinity", INFINITY_MODEL_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = _choices(INFINITY_MODEL_DIRS, "dir", kinds=("sharded",))
        inside = tuple(d + "/" for d in _choices(INFINITY_MODEL_DIRS, "dir"))  # shards, T5 folders, ...
        files = _choices(INFINITY_MODEL_DIRS, "file", lambda n: "vae" not in n.lower() and not n.startswith(inside)
                         and _whole_file(INFINITY_MODEL_DIRS, n))
        return {"required": {
            "model_name": (sorted(files + folders), {"tooltip": "File or sharded folder in models/infinity or models/diffusion_models."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
            "attention": (ATTENTION, {"default": "auto", "tooltip": ATTENTION_TOOLTIP}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": WEIGHT_DTYPE_TOOLTIP}),
        }}

    def load(self, model_name, dtype, attention, weight_dtype="default"):
        path = compat.resolve(INFINITY_MODEL_DIRS, model_name)
        part = load_model_part("infinity", path, dtype, attention, weight_dtype)
        return shown(part, f"{weight_dtype}, {_dtype_name(part.module)}")


class LoadInfinityVAE:
    DESCRIPTION = ("Loads Infinity's BSQ VAE (infinity_vae_d32reg.pth for 2B, infinity_vae_d56_f8_14_patchify.pth "
                   "for 8B). Its bit depth is checked against the model before sampling.")
    FAMILY, DIRS = "infinity", INFINITY_VAE_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        inside = tuple(d + "/" for d in _choices(INFINITY_VAE_DIRS, "dir"))
        files = (_choices(("vae",), "file", lambda n: _whole_file(("vae",), n))
                 + _choices(("infinity",), "file", lambda n: "vae" in n.lower()))
        return {"required": {
            "vae_name": (sorted({f for f in files if not f.startswith(inside)}), {"tooltip": "VAE file in models/vae (or a file named *vae* in models/infinity)."}),
        }}

    FAMILY = "infinity"

    @classmethod
    def vae_path(cls, vae_name) -> Path:
        return compat.resolve(INFINITY_VAE_DIRS, vae_name)

    def load(self, vae_name):
        part = load_vae_part(self.FAMILY, self.vae_path(vae_name))
        return shown(part, _dtype_name(part.module))


class LoadT5TextEncoder:
    DESCRIPTION = ("Loads the flan-t5-xl encoder that conditions Infinity: the Hugging Face folder, or a single "
                   "encoder file plus a tokenizer folder. Nothing is downloaded.")
    FAMILY, DIRS = "infinity", T5_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = _choices(T5_DIRS, "dir", kinds=T5_KINDS)
        files = _choices(("text_encoders",), "file", lambda n: "/" not in n and _whole_file(("text_encoders",), n))
        return {"required": {
            "text_encoder": (sorted(folders + files), {"tooltip": "flan-t5-xl folder (models/text_encoders or models/infinity), or an encoder-only .safetensors file in models/text_encoders."}),
            "tokenizer": (["same folder"] + folders, {"default": "same folder", "tooltip": "For a single encoder file: the folder holding tokenizer.json and config.json (e.g. the flan-t5-xl folder)."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, text_encoder, tokenizer, dtype):
        tok = None if tokenizer == "same folder" else compat.resolve(T5_DIRS, tokenizer)
        part = load_text_encoder_part("infinity", compat.resolve(T5_DIRS, text_encoder), tok, dtype)
        return shown(part, _dtype_name(part.module))


class LoadHARTModel:
    DESCRIPTION = ("Loads the HART transformer from the hart-0.7b-1024px release folder (or its llm/ folder), "
                   "using the EMA weights as the official scripts do.")
    FAMILY, DIRS = "hart", HART_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = _releases_once(_choices(HART_DIRS, "dir", kinds=HART_MODEL_KINDS))
        return {"required": {
            "model_folder": (folders, {"tooltip": "Release folder (holding llm/ and tokenizer/) or its llm/ folder, in models/hart."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
            "attention": (ATTENTION, {"default": "auto", "tooltip": ATTENTION_TOOLTIP}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": WEIGHT_DTYPE_TOOLTIP}),
        }}

    def load(self, model_folder, dtype, attention, weight_dtype="default"):
        part = load_model_part("hart", compat.resolve(HART_DIRS, model_folder), dtype, attention, weight_dtype)
        return shown(part, f"{weight_dtype}, {_dtype_name(part.module)}")


class LoadHARTVAE:
    DESCRIPTION = "Loads HART's VAE (the tokenizer/ folder of the release)."
    FAMILY, DIRS = "hart", HART_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = _releases_once(_choices(HART_DIRS, "dir", kinds=HART_VAE_KINDS))
        return {"required": {
            "vae_folder": (folders, {"tooltip": "The release folder or its tokenizer/ folder, in models/hart."}),
        }}

    FAMILY = "hart"

    @classmethod
    def vae_path(cls, vae_folder) -> Path:
        return compat.resolve(HART_DIRS, vae_folder)

    def load(self, vae_folder):
        part = load_vae_part(self.FAMILY, self.vae_path(vae_folder))
        return shown(part, _dtype_name(part.module))


class LoadQwen2TextEncoder:
    DESCRIPTION = ("Loads the Qwen2-VL-1.5B-Instruct text model that conditions HART (a Hugging Face folder). "
                   "Nothing is downloaded.")
    FAMILY, DIRS = "hart", QWEN_DIRS  # the family of what it loads (read by the frontend's routes)
    CATEGORY = "FastVAR/loaders"
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (_choices(QWEN_DIRS, "dir", kinds=QWEN_KINDS), {"tooltip": "Qwen2-VL-1.5B-Instruct folder in models/text_encoders or models/hart."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, text_encoder, dtype):
        part = load_text_encoder_part("hart", compat.resolve(QWEN_DIRS, text_encoder), None, dtype)
        return shown(part, _dtype_name(part.module))
