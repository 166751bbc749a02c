"""Load the official HART transformer (``llm/`` folder) and check it against the VAE and text encoder.

Layout (docs/hart.md §1.1-1.2): ``llm/config.json`` + a transformers weight file (``model.safetensors`` or
``pytorch_model.bin``) + ``ema_model.bin``, a flat weights-only state dict with the same keys, which
the official scripts sample with. The training-only buffers ``attn_bias_for_masking`` (380 MB causal
mask) and ``lvl_1L`` (level indices) are dropped; everything else loads strictly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .. import ops as nnops
from ..checkpoint import check_state_keys, flatten_tensors, load_sharded_folder, load_state_dict
from ..errors import CheckpointError, IncompatibleModelsError
from .config import MODEL_TYPE, VAE_MODEL_TYPE, HARTConfig, detect_hart_config
from .model import HARTTransformer

log = logging.getLogger("fastvar")

EMA_FILES = ("ema_model.safetensors", "ema_model.bin")  # a converted safetensors twin is preferred
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DROPPED_KEYS = ("attn_bias_for_masking", "lvl_1L")  # training buffers, rebuilt by nothing (docs/hart.md §1.2)


def _model_type(config_path: Path) -> object:
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{config_path}' is not valid JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{config_path}' should hold a JSON object, found {type(cfg).__name__}.")
    return cfg.get("model_type")


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "nothing"


def find_llm_folder(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Resolve the ``llm`` folder from itself, the release folder holding it, or a weight file inside it.

    Returns (folder, weight file or None to choose by preference).
    """
    path = Path(path)
    expected = (
        f"expected the HART transformer folder 'llm' (config.json with model_type '{MODEL_TYPE}' plus "
        f"ema_model.bin / model.safetensors) or the release folder that contains it"
    )
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist: {expected}.")
    if path.is_file():
        beside = path.parent / "config.json"
        if beside.is_file() and _model_type(beside) == MODEL_TYPE:
            return path.parent, path
        raise CheckpointError(
            f"'{path}' is a single weight file without a HART config.json beside it: {expected}. "
            f"Single-file .pth checkpoints are Infinity models; load those with the Infinity loader."
        )
    if not (path / "config.json").is_file() and (path / "llm" / "config.json").is_file():
        path = path / "llm"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"'{path}' has no config.json (found: {_listing(path)}): {expected}.")
    model_type = _model_type(config_path)
    if model_type == VAE_MODEL_TYPE:
        raise CheckpointError(
            f"'{config_path}' describes the HART VAE (model_type '{VAE_MODEL_TYPE}', the 'tokenizer' folder): "
            f"{expected}. Load this folder as the VAE instead."
        )
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"'{config_path}': model_type is {model_type!r}, {expected}.")
    return path, None


def _choose_weights(folder: Path, use_ema: bool) -> Path:
    if use_ema:
        for name in EMA_FILES:
            if (folder / name).is_file():
                return folder / name
        log.info("HART: no ema_model.bin in '%s'; using the regular (non-EMA) weights", folder)
    for name in WEIGHT_FILES + SHARD_INDEXES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"'{folder}' holds no transformer weights: expected {' or '.join(EMA_FILES[1:] + WEIGHT_FILES)} "
        f"(found: {_listing(folder)})."
    )


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    if weights.name in SHARD_INDEXES:
        return load_sharded_folder(weights.parent)
    return flatten_tensors(load_state_dict(weights, mmap=False))  # each tensor freed once converted


def filter_hart_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the training buffers; refuse non-float tensors (everything left is a weight)."""
    out = {k: v for k, v in state.items() if k not in DROPPED_KEYS}
    for key, value in out.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{key}' has dtype {value.dtype}, expected a float weight.")
    return out


def load_hart_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    operations=None,
    weight_dtype: torch.dtype | None = None,
) -> HARTTransformer:
    """Load the HART transformer from ``llm/``, the release folder, or a weight file inside ``llm/``.

    ``use_ema`` (official default) prefers ``ema_model.bin``; otherwise, or when it is absent, the
    regular ``model.safetensors`` / ``pytorch_model.bin`` is used. ``operations``: the layer namespace
    (fastvar_core.ops; None: torch.nn), built on 'meta' and loaded with ``assign=True``. ``weight_dtype``:
    its Linear weights go from the file into this storage dtype (fp8) via ``dtype``, the bits of
    :func:`fastvar_core.ops.store_weights` after the load, without holding them in ``dtype`` first.
    """
    folder, weights = find_llm_folder(path)
    weights = weights or _choose_weights(folder, use_ema)
    source = f"'{weights}'"
    cfg_json = json.loads((folder / "config.json").read_text())
    state = filter_hart_state_dict(_read_state(weights), source)
    config = detect_hart_config(cfg_json, state, source)

    with torch.device("meta"):
        model = HARTTransformer(config, operations)
    expected = model.state_dict()
    check_state_keys(expected, state, f"{source} does not match the HART transformer of its config.json")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {list(state[key].shape)}, expected {list(ref.shape)}."
            )
    # One tensor at a time, each source dropped once converted: no second copy of the whole model.
    stored = set(nnops.stored_keys(model, operations)) if weight_dtype is not None else set()
    for key in list(state):
        value = state.pop(key).to(device=device, dtype=dtype)
        state[key] = value.to(weight_dtype) if key in stored else value
    model.load_state_dict(state, strict=True, assign=True)
    log.info("HART: loaded %s (%s)", weights, config.describe())
    return model.eval().requires_grad_(False)  # every tensor is a checkpoint key, already in place


def check_vae_matches(model: HARTTransformer, vae) -> None:
    """The transformer's vocabulary and latent width must be the VAE's (codebook rows and width)."""
    cfg: HARTConfig = model.config
    v, c = vae.config.vocab_size, vae.config.z_channels
    if (v, c) != (cfg.vocab_size, cfg.vae_channels):
        raise IncompatibleModelsError(
            f"the HART transformer predicts {cfg.vocab_size} codes of width {cfg.vae_channels}, but the VAE has "
            f"vocab_size={v}, z_channels={c}: load the 'tokenizer' folder of the same release."
        )


def check_text_width(model: HARTTransformer, cond) -> None:
    """The text conditioning must be (B, context_token, context_dim) with matching mask/position ids."""
    cfg: HARTConfig = model.config
    ctx = cond.context
    if ctx.ndim != 3 or tuple(ctx.shape[1:]) != (cfg.context_token, cfg.context_dim):
        raise IncompatibleModelsError(
            f"the HART transformer expects text features of shape (B, {cfg.context_token}, {cfg.context_dim}) "
            f"(Qwen2 1.5B hidden states, {cfg.context_token} tokens), found {tuple(ctx.shape)}: use the text "
            f"encoder that belongs to this model."
        )
    for name in ("mask", "position_ids"):
        t = getattr(cond, name)
        if tuple(t.shape) != tuple(ctx.shape[:2]):
            raise IncompatibleModelsError(
                f"text conditioning {name} has shape {tuple(t.shape)}, expected {tuple(ctx.shape[:2])}."
            )
