"""Safe reading of weight files: safetensors, weights-only torch pickles and sharded folders.

Nothing here can execute code from a file: pickles go through ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# A pickle that asks for objects of these modules wants to run code or touch the system (the pattern of
# malicious files): they are never allowed, not even on request.
CODE_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "pathlib", "shutil", "io", "socket",
    "pickle", "marshal", "types", "code", "codeop", "ctypes", "functools", "operator", "pty", "tempfile", "webbrowser",
})


def runs_code(name: str) -> bool:
    """Whether a pickle global ('module.Name'; a bare name is a builtin) belongs to CODE_MODULES."""
    return "." not in name or name.split(".")[0] in CODE_MODULES


def key_examples(keys, n: int = 4) -> str:
    """The first ``n`` of ``keys`` in sorted order, quoted, with how many more there are."""
    keys = sorted(keys)
    return ", ".join(f"'{k}'" for k in keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_keys(expected, found, what: str, name=None) -> None:
    """CheckpointError when the tensor names ``found`` differ from ``expected`` (strict loading).

    The message is ``what`` (the file and the model it should hold), then the missing and unexpected
    names, counted and with a few examples, each shown as ``name(key)`` (default: the key itself).
    """
    name = name or str
    missing = [name(k) for k in set(expected) - set(found)]
    unexpected = [name(k) for k in set(found) - set(expected)]
    parts = [f"{len(keys)} {kind} tensor{'' if len(keys) == 1 else 's'}: {key_examples(keys)}"
             for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        raise CheckpointError(f"{what}: {'; '.join(parts)}.")


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


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's text, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0] if text else "no detail"
    return f"{type(exc).__name__}: {line.split('. ')[0].rstrip('.')}"


def _unsafe_globals(path: Path, exc: pickle.UnpicklingError) -> list[str]:
    """The Python objects a refused pickle asks for, e.g. ['argparse.Namespace'] (read, never executed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # zip checkpoints only
    except Exception:  # legacy (non-zip) format or unreadable: fall back to the refusal message
        names = []
    return sorted(set(names) or set(re.findall(r"GLOBAL (\S+) was not an allowed global", str(exc))))


def resolve_globals(names: Sequence[str]) -> list[object]:
    """Import 'module.attr' names for ``torch.serialization.safe_globals`` (convert --allow-global)."""
    objects = []
    for name in names:
        if runs_code(name):
            raise CheckpointError(
                f"--allow-global {name!r} would let the file run code or touch the system; it is never allowed."
            )
        module_name, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(module_name or "builtins")
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError, ValueError):
            raise CheckpointError(
                f"--allow-global {name!r} names nothing importable: expected 'module.Name' as printed in the "
                f"refusal message, e.g. 'argparse.Namespace'."
            ) from None
        objects.append(obj)
    return objects


def _load_pickle(path: Path, allow_globals: Sequence[str] = (), mmap: bool = True) -> object:
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(resolve_globals(allow_globals)):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, exc)
        convert = f"python -m fastvar_core convert {path} {path.with_suffix(SAFETENSORS_SUFFIX)}"
        if any(runs_code(n) for n in names):
            raise CheckpointError(
                f"{_describe(path)} needs an arbitrary Python pickle to load (it asks for {', '.join(names)}), "
                f"whose objects run code: that is what malicious files do. It is refused, nothing in it was "
                f"executed, and 'python -m fastvar_core convert' will not allow these objects either: get the "
                f"checkpoint from its official release."
            ) from None
        if names:
            raise CheckpointError(
                f"{_describe(path)} needs an arbitrary Python pickle to load (it asks for {', '.join(names)}); "
                f"unpickling that can run code, so it is refused and nothing in it was executed. If you trust "
                f"the file, convert it once with '{convert} "
                + " ".join(f"--allow-global {n}" for n in names)
                + "' (only the tensors are kept), or download the safetensors release."
            ) from None
        detail = re.search(r"Unsupported operand \d+|invalid load key[^\n]*", str(exc))
        raise CheckpointError(
            f"{_describe(path)} is not a weights-only PyTorch checkpoint (the safe unpickler stopped at "
            f"{detail[0] if detail else _first_sentence(exc)}): it is corrupt (download it again) or not a file "
            f"written by torch.save; an arbitrary Python pickle can run code and is refused."
        ) from None
    except Exception as exc:  # any other reader failure means a damaged file, never a crash
        raise CheckpointError(
            f"{_describe(path)} could not be read as a PyTorch checkpoint ({_first_sentence(exc)}); "
            f"it may be truncated or corrupt: download it again."
        ) from None


def load_file(path: str | os.PathLike, *, allow_globals: Sequence[str] = (), mmap: bool = True) -> Mapping[str, object]:
    """Read one weight file into a (possibly nested) dict of tensors, on the CPU.

    ``.safetensors`` is read with safetensors; ``.pth/.pt/.bin/.ckpt`` with
    ``torch.load(weights_only=True)``. Any other suffix is sniffed by content. ``allow_globals``
    ('module.Name', e.g. 'argparse.Namespace') are the only extra objects a pickle may build; only the
    convert command passes them, on the user's explicit request. ``mmap``: a zip pickle's tensors are views
    of one memory map of the file (nothing read until used, but the whole map stays resident while any view
    lives); False reads each tensor into its own memory, so a loader that converts tensor by tensor frees
    each source as it goes.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, allow_globals, mmap)
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        obj = _load_pickle(path, allow_globals, mmap) if head[:2] in (b"PK", b"\x80\x02") else _load_safetensors(path)
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
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{_describe(index_path)} is not a valid shard index ({type(exc).__name__}: {exc}).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{_describe(index_path)}: 'weight_map' should map tensor names to shard file names, found "
            f"{type(weight_map).__name__}."
        )
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


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read a file or a sharded folder into a flat state dict, preferring a ``.safetensors`` twin
    (``mmap``: as :func:`load_file`)."""
    path = Path(path)
    if path.is_dir():
        return load_sharded_folder(path)
    return dict(load_file(prefer_safetensors(path), mmap=mmap))


def read_shapes(path: str | os.PathLike) -> Mapping[str, object]:
    """The tensors of a weight file or sharded folder as data-less ``meta`` tensors of the stored shapes: from
    safetensors headers, or a memory-mapped pickle whose data is never touched (its nesting kept). Cheap enough to
    tell a configuration or check a file before a long computation; CheckpointError as :func:`load_state_dict`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{_describe(path)} holds no .safetensors shards.")
    else:
        path = prefer_safetensors(path)
        _check_file(path)
        if path.suffix != SAFETENSORS_SUFFIX:
            return _to_meta(load_file(path))  # a zip pickle is memory-mapped (_load_pickle)
        files = [path]
    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{_describe(file)} has no readable safetensors header ({exc}); it may be "
                                  f"truncated or corrupt: download it again.") from None
        for key, entry in header.items():
            if key != "__metadata__" and isinstance(entry, dict) and "shape" in entry:
                shapes[key] = torch.empty(entry["shape"], device="meta")
    return shapes


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, Mapping):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal calls NaN unequal to itself)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, allow_globals: Sequence[str] = ()) -> int:
    """Convert a weights-only pickle to safetensors, verify it bit for bit, return the tensor count.

    ``allow_globals``: objects the pickle may additionally build (named in the loaders' refusal message,
    e.g. a training checkpoint's 'argparse.Namespace'); they are dropped, only tensors are written.
    """
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"output {_describe(dst)} must end in .safetensors.")
    tensors = flatten_tensors(load_file(src, allow_globals=allow_globals))
    if not tensors:
        raise CheckpointError(f"{_describe(src)} holds no tensors.")
    # safetensors refuses shared storage; contiguous copies are what the loaders expect anyway.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if not dst.parent.is_dir():
        raise CheckpointError(f"cannot write {_describe(dst)}: its folder does not exist.")
    try:
        save_file(tensors, str(dst), metadata={"format": "pt", "converted_from": src.name})
    except Exception as exc:  # disk full, permissions, a folder of that name ...
        raise CheckpointError(f"cannot write {_describe(dst)} ({type(exc).__name__}: {exc}).") from None
    back = st_load(str(dst))
    for key, value in tensors.items():
        if key not in back or back[key].dtype != value.dtype or not _same_bits(back[key], value):
            raise CheckpointError(f"verification of {_describe(dst)} failed at tensor '{key}'.")
    return len(tensors)
