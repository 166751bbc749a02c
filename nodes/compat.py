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
    import comfy.utils as comfy_utils  # type: ignore
except ImportError:
    mm = None
    comfy_utils = None

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


def compute_device() -> torch.device:
    return mm.get_torch_device() if mm is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def free_memory_for(module: torch.nn.Module, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``module`` fits on ``device``."""
    if mm is None or device.type == "cpu":
        return
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    mm.free_memory(int(size * 1.3), device)


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
