"""Safe reading of weight files: safetensors, weights-only torch pickles and sharded folders.

Nothing here can execute code from a file: pickles go through ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


def _describe(path: Path) -> str:
    return f"'{path}'"


def prefer_safetensors(path: str | os.PathLike) -> Path:
    """Return ``X.safetensors`` when it sits beside a pickle ``X.pth`` (it loads faster and safer)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        sibling = path.with_suffix(SAFETENSORS_SUFFIX)
        if sibling.is_file():
            return sibling
    return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{_describe(path)} does not exist: expected a weight file.")
    if path.is_dir():
        raise CheckpointError(
            f"{_describe(path)} is a folder, but a single weight file "
            f"(.safetensors, .pth, .pt, .bin) was expected here."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{_describe(path)} is empty (0 bytes): the download is incomplete.")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{_describe(path)} is not a readable safetensors file ({exc}); "
            f"it may be truncated or corrupt: download it again."
        ) from None


def _load_pickle(path: Path) -> object:
    try:
        # mmap keeps multi-GB official checkpoints out of RAM until a tensor is used.
        mmap = zipfile.is_zipfile(path)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{_describe(path)} needs an arbitrary Python pickle to load, which can run code, so it is "
            f"refused ({str(exc).splitlines()[0] if str(exc) else 'weights-only load failed'}). "
            f"If you trust the file, convert it once with "
            f"'python -m fastvar_core convert {path} {path.with_suffix(SAFETENSORS_SUFFIX)}' "
            f"in an environment where you accept that risk, or download the safetensors release."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{_describe(path)} could not be read as a PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it may be truncated or corrupt: "
            f"download it again."
        ) from None


def load_file(path: str | os.PathLike) -> Mapping[str, object]:
    """Read one weight file into a (possibly nested) dict of tensors, on the CPU.

    ``.safetensors`` is read with safetensors; ``.pth/.pt/.bin/.ckpt`` with
    ``torch.load(weights_only=True)``. Any other suffix is sniffed by content.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path)
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        obj = _load_pickle(path) if head[:2] in (b"PK", b"\x80\x02") else _load_safetensors(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{_describe(path)} holds a {type(obj).__name__}, but a dict of tensors (a state dict) was expected."
        )
    return obj


def load_sharded_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Hugging Face style sharded folder (``*.safetensors.index.json`` + shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{_describe(folder)} is not a folder: expected a folder of weight shards.")
    indexes = sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json"))
    if not indexes:
        singles = sorted(folder.glob("*.safetensors"))
        if len(singles) == 1:
            return dict(load_file(singles[0]))
        raise CheckpointError(
            f"{_describe(folder)} has no 'model.safetensors.index.json' (found: "
            f"{', '.join(p.name for p in sorted(folder.iterdir())[:8]) or 'nothing'})."
        )
    index_path = indexes[0]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{_describe(index_path)} is not a valid shard index ({exc}).") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(folder / shard)
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(
            f"{_describe(index_path)} lists {len(missing)} tensors that no shard holds, e.g. '{missing[0]}': "
            f"a shard is incomplete."
        )
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file or a sharded folder into a flat state dict, preferring a ``.safetensors`` twin."""
    path = Path(path)
    if path.is_dir():
        return load_sharded_folder(path)
    return dict(load_file(prefer_safetensors(path)))


def flatten_tensors(obj: Mapping[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten nested dicts of tensors to ``{'a.b.c': tensor}`` (non-tensor leaves are dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(flatten_tensors(value, name + "."))
    return out


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Convert a weights-only pickle to safetensors, verify it bit for bit, return the tensor count."""
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"output {_describe(dst)} must end in .safetensors.")
    tensors = flatten_tensors(load_file(src))
    if not tensors:
        raise CheckpointError(f"{_describe(src)} holds no tensors.")
    # safetensors refuses shared storage; contiguous copies are what the loaders expect anyway.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata={"format": "pt", "converted_from": src.name})
    back = st_load(str(dst))
    for key, value in tensors.items():
        if key not in back or back[key].dtype != value.dtype or not torch.equal(back[key], value):
            raise CheckpointError(f"verification of {_describe(dst)} failed at tensor '{key}'.")
    return len(tensors)
