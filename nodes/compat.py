"""The one place that touches ComfyUI. Every service falls back to a stand-in outside ComfyUI.

Outside ComfyUI (unit tests, scripts) there is no folder registry, no progress hook and no interrupt
flag; node classes still import and run, with model folders given through ``set_model_dirs``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("fastvar")

try:  # pragma: no cover - exercised inside ComfyUI (the e2e run)
    import folder_paths  # type: ignore

    IN_COMFY = True
except ImportError:
    folder_paths = None
    IN_COMFY = False

try:  # pragma: no cover
    import comfy.model_management as mm  # type: ignore
    import comfy.model_patcher as comfy_patcher  # type: ignore
    import comfy.ops as comfy_ops  # type: ignore
    import comfy.utils as comfy_utils  # type: ignore
    from comfy.patcher_extension import CallbacksMP  # type: ignore
except ImportError:
    mm = None
    comfy_patcher = None
    comfy_ops = None
    comfy_utils = None
    CallbacksMP = None

# Folder names the pack reads; its own two are registered with ComfyUI below.
OWN_FOLDERS = ("infinity", "hart")
WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".sft"}
_standalone_dirs: dict[str, list[Path]] = {}


def register_folders() -> None:
    """Add models/infinity and models/hart without overriding paths from extra_model_paths.yaml."""
    if folder_paths is None:
        return
    for name in OWN_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, default)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(folder_paths.supported_pt_extensions))
        os.makedirs(default, exist_ok=True)


def set_model_dirs(mapping: dict[str, list[str | os.PathLike]]) -> None:
    """Outside ComfyUI: where each model folder name lives (tests, scripts)."""
    _standalone_dirs.clear()
    _standalone_dirs.update({k: [Path(p) for p in v] for k, v in mapping.items()})


def model_dirs(name: str) -> list[Path]:
    """The directories registered under a model folder name (existing ones only)."""
    if folder_paths is not None:
        try:
            dirs = folder_paths.get_folder_paths(name)
        except KeyError:
            dirs = []
        return [Path(d) for d in dirs if os.path.isdir(d)]
    return [d for d in _standalone_dirs.get(name, []) if d.is_dir()]


def list_entries(names: tuple[str, ...], want: str, kinds: tuple[str, ...] | None = None) -> list[str]:
    """Relative names of weight files (want='file') or model folders (want='dir') under the folders.

    Folders are listed two levels deep (``release/llm``); a folder counts when it holds a config.json
    or a shard index, and, with ``kinds``, when :func:`folder_kind` is one of them. Hidden entries are
    skipped. Cheap enough for every /object_info request.
    """
    found: set[str] = set()
    for name in names:
        for root in model_dirs(name):
            for path in _walk(root, depth=3 if want == "file" else 2):
                rel = path.relative_to(root).as_posix()
                if want == "file" and path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                    found.add(rel)
                elif want == "dir" and path.is_dir() and _is_model_folder(path):
                    if kinds is None or folder_kind(path) in kinds:
                        found.add(rel)
    return sorted(found)


def _walk(root: Path, depth: int):
    try:
        children = sorted(root.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        yield child
        if depth > 1 and child.is_dir():
            yield from _walk(child, depth - 1)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or any(path.glob("*.index.json")) or (path / "llm").is_dir()


def folder_kind(path: Path) -> str:
    """What a model folder holds: the ``model_type`` of its config.json, 'hart_release' for a folder with
    llm/ and tokenizer/, 'sharded' for a shard index without config (Infinity-8B), else 'unknown'."""
    if (path / "llm").is_dir():
        return "hart_release"
    config = path / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text(encoding="utf-8")).get("model_type", "unknown"))
        except (OSError, ValueError, AttributeError):
            return "unknown"
    return "sharded" if any(path.glob("*.index.json")) else "unknown"


def resolve(names: tuple[str, ...], relative: str) -> Path:
    """Absolute path of a combo entry, searching the folders in order."""
    for name in names:
        for root in model_dirs(name):
            candidate = root / relative
            if candidate.exists():
                return candidate
    from ..fastvar_core.errors import CheckpointError

    raise CheckpointError(f"'{relative}' was not found in the model folders {list(names)}; refresh the node list")


# The kinds of part ComfyUI places differently (--cpu-vae, --highvram, ...): diffusion model, text encoder, VAE.
DIFFUSION, TEXT_ENCODER, VAE = "diffusion", "text_encoder", "vae"


def devices(kind: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) ComfyUI chooses for a kind of part; the CPU outside ComfyUI."""
    if mm is None:
        return torch.device("cpu"), torch.device("cpu")
    load, offload = {DIFFUSION: (mm.get_torch_device, mm.unet_offload_device),
                     TEXT_ENCODER: (mm.text_encoder_device, mm.text_encoder_offload_device),
                     VAE: (mm.vae_device, mm.vae_offload_device)}[kind]
    return load(), offload()


def vae_dtype(load_device: torch.device, working: tuple[torch.dtype, ...]) -> torch.dtype:
    """The dtype a VAE computes in: ComfyUI's ``vae_dtype`` (--fp16-vae, --bf16-vae, --fp32-vae, else the first
    of ``working`` the device runs well: float32 on the CPU); float32 outside ComfyUI."""
    return mm.vae_dtype(load_device, list(working)) if mm is not None else torch.float32


# ComfyUI's text-encoder precision flags (--fp16-text-enc, ...), as comfy.cli_args names them.
TEXT_ENCODER_FLAGS = ("fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc", "fp16_text_enc", "bf16_text_enc", "fp32_text_enc")


def text_encoder_dtype(load_device: torch.device) -> torch.dtype | None:
    """The text-encoder dtype the user forced with a ComfyUI flag (ComfyUI's ``text_encoder_dtype``); None
    without a flag, or outside ComfyUI. ComfyUI's unflagged default (float16, also on the CPU) is not taken:
    the pack's default keeps float32 on the CPU (docs/comfyui.md §4.1). The fp8 flags store weights in comfy.ops
    layers, which our transformers-built encoders do not have: they are reported and ignored."""
    if mm is None:
        return None
    try:
        from comfy.cli_args import args  # type: ignore
    except ImportError:
        return None
    if not any(getattr(args, flag, False) for flag in TEXT_ENCODER_FLAGS):
        return None
    dtype = mm.text_encoder_dtype(load_device)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        log.warning("FastVAR: the text encoders cannot store fp8 weights; %s is ignored for them", dtype)
        return None
    return dtype


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def operations(weight_dtype: torch.dtype | None, compute_dtype: torch.dtype | None, load_device: torch.device,
               fast: bool = False):
    """The layer namespace for a part: ComfyUI's ``pick_operations`` (lowvram casting, fp8 storage; ``fast``:
    fp8 matrix products where supported) with its ``cast_bias_weight`` as the hook (docs/architecture.md §5).
    Outside ComfyUI: torch.nn (None), or ``CastOps`` when ``weight_dtype`` stores the weights differently."""
    if comfy_ops is None:
        from ..fastvar_core.ops import CastOps

        return None if weight_dtype is None else CastOps
    picked = comfy_ops.pick_operations(weight_dtype or compute_dtype, compute_dtype, load_device,
                                       fp8_optimizations=fast)
    return type(f"FastVAR_{picked.__name__}", (picked,), {"cast_bias_weight": staticmethod(comfy_ops.cast_bias_weight)})


class Holder:
    """Outside ComfyUI: what a ``ModelPatcher`` holds (model, load device, offload device)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> None:
        self.model, self.load_device, self.offload_device = model, load_device, offload_device


class _Carrier(torch.nn.Module):
    """The module a ModelPatcher holds: ComfyUI writes a ``device`` attribute on it, which our parts compute
    as a property."""

    def __init__(self, part: torch.nn.Module) -> None:
        super().__init__()
        self.part = part


def patcher(module: torch.nn.Module, kind: str):
    """A ComfyUI ModelPatcher (a Holder outside ComfyUI) for a loaded part on the devices of its ``kind``."""
    load, offload = devices(kind)
    if comfy_patcher is None:
        return Holder(module, load, offload)
    held = comfy_patcher.ModelPatcher(_Carrier(module), load_device=load, offload_device=offload)
    # Part of every ModelPatcher.load (and kept by clone()); its unload (detach/unpatch_model) moves the whole
    # model back to the offload device with model.to(), own tensors included.
    held.add_callback(CallbacksMP.ON_LOAD, _own_tensors_on_load)
    return held


def load_models(patchers: list, memory_required: int, full: bool = False) -> torch.device:
    """Bring parts to their load device through ComfyUI's ``load_models_gpu``, which unloads other models
    (or loads ours partially, lowvram) so that the weights plus ``memory_required`` bytes fit; ``full``:
    never partially (parts without ComfyUI layers: the text encoders). Returns the first part's load device.
    Outside ComfyUI the parts simply sit on the CPU."""
    if mm is None:
        for p in patchers:
            p.model.to("cpu")
        return torch.device("cpu")
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=full)
    return patchers[0].load_device


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` by ComfyUI's count; None outside ComfyUI (the library's defaults apply)."""
    return mm.get_free_memory(device) if mm is not None else None


def _own_tensors_on_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """ModelPatcher's ON_LOAD callback (docs/comfyui.md §4.1). A partial (lowvram) load moves only what fits of
    the layers with ``comfy_cast_weights`` and of leaf modules; the tensors a module holds beside its child
    layers (a model's own biases, scales and anchors, docs/architecture.md §5) stay behind. They follow to
    ``device_to``, where the library computes; ComfyUI's own models cast such tensors at use instead."""
    model = patcher.model
    if device_to is None or not getattr(model, "model_lowvram", False):
        return  # a full load has moved the whole model
    for m in model.modules():
        if hasattr(m, "comfy_cast_weights"):
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.device != device_to:
                m._parameters[name] = torch.nn.Parameter(p.data.to(device_to), requires_grad=p.requires_grad)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.device != device_to:
                m._buffers[name] = b.to(device_to)


def soft_empty_cache() -> None:
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar with previews; a no-op outside ComfyUI."""

    def __init__(self, total: int) -> None:
        self.bar = comfy_utils.ProgressBar(total) if comfy_utils is not None else None
        self.total = total

    def update(self, step: int, preview_rgb: torch.Tensor | None = None, total: int | None = None) -> None:
        if self.bar is None:
            return
        preview = None
        # Our preview is a cheap projection, not a decode, so it is always sent (ComfyUI's default
        # --preview-method 'none' is about its own latent decoders).
        if preview_rgb is not None:
            from PIL import Image

            array = (preview_rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            preview = ("JPEG", Image.fromarray(array), preview_size())
        self.total = total or self.total  # skipped scales shorten the run
        self.bar.update_absolute(step, self.total, preview)


def preview_size() -> int:
    try:
        from comfy.cli_args import args  # type: ignore
    except ImportError:
        return 512
    return int(getattr(args, "preview_size", 512) or 512)
