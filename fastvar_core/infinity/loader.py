"""Load official Infinity transformer checkpoints (.pth, .safetensors, sharded 8B folder) strictly.

Steps (timm/transformers style): read weights safely -> unwrap a training container -> detect the
config from shapes -> filter/map keys to this implementation (docs/infinity.md §2.1, §2.4) ->
strict ``load_state_dict``. Every problem is reported as a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import ops as nnops
from ..checkpoint import check_state_keys, key_examples, load_state_dict
from ..errors import CheckpointError, IncompatibleModelsError
from .config import TEXT_MAXLEN, InfinityConfig
from .model import InfinityTransformer

LEGACY_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
_CHUNK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_VAE_HINTS = ("decoder.", "encoder.", "quantizer.", "quantize.", "vae.")
_HART_HINTS = (".attn.qkv_proj.", "context_embed", "diffloss.", "word_embed.weight_hart")


def _hart_config(path: Path) -> str | None:
    """model_type of a HART (transformers-style) folder, if ``path`` is one or contains one."""
    for cfg in (path / "config.json", path / "llm" / "config.json"):
        if cfg.is_file():
            try:
                model_type = str(json.loads(cfg.read_text()).get("model_type", ""))
            except (json.JSONDecodeError, OSError, AttributeError):
                continue
            if "hart" in model_type.lower():
                return model_type
    return None


def unwrap_container(obj: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Training checkpoints hold the model under ['trainer']['gpt_fsdp'] (docs/infinity.md §1.2); a plain dict
    is the state dict."""
    trainer = obj.get("trainer")
    if isinstance(trainer, Mapping):
        inner = trainer.get("gpt_fsdp")
        if not isinstance(inner, Mapping):
            raise CheckpointError(
                f"{source} is a training checkpoint but 'trainer' has no 'gpt_fsdp' state dict "
                f"(found {key_examples(trainer.keys())})."
            )
        obj = inner
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    flat = "trainer.gpt_fsdp."  # a training checkpoint converted to safetensors (nested keys flattened)
    if any(k.startswith(flat) for k in state):
        state = {k[len(flat):]: v for k, v in state.items() if k.startswith(flat)}
    if any(k.startswith("module.") for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # DDP/FSDP wrapper prefix
    return state


def _identify(state: Mapping[str, torch.Tensor], top: Mapping[str, object], source: str) -> None:
    """Raise a helpful CheckpointError when the file is clearly not an Infinity transformer."""
    if "word_embed.weight" in state and "cfg_uncond" in state:
        return
    keys = list(top.keys())
    if "vae" in top or (state and all(k.startswith(_VAE_HINTS) for k in state)):
        raise CheckpointError(
            f"{source} is an Infinity VAE checkpoint (top-level entries {key_examples(keys)}), not the transformer: "
            f"load it with the VAE loader and pick the transformer file (e.g. infinity_2b_reg.pth) here."
        )
    if any(h in k for k in state for h in _HART_HINTS):
        raise CheckpointError(
            f"{source} is a HART transformer checkpoint (tensors such as {key_examples([k for k in state if '.attn.' in k])}), "
            f"not Infinity: load it with the HART loader."
        )
    raise CheckpointError(
        f"{source} is not an Infinity transformer checkpoint: expected tensors 'word_embed.weight', 'cfg_uncond', "
        f"'block_chunks.0.module.0.sa.mat_qkv.weight', ...; found {len(state)} tensors such as {key_examples(state.keys())}."
    )


def official_cfg_uncond_init(text_channels: int, rows: int = TEXT_MAXLEN) -> torch.Tensor:
    """The official constructor's cfg_uncond init (truncated normal std 1.2 in [-2, 2], CPU generator seed 0,
    divided by sqrt(Ct5)); the official loader fills missing rows with it (docs/infinity.md §2.4)."""
    out = torch.empty(rows, text_channels)
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.nn.init.trunc_normal_(out, std=1.2, generator=gen)
    return out / text_channels**0.5


def official_key(key: str, config: InfinityConfig) -> str:
    """Spell a model key as the official checkpoints do (block_chunks layout)."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m is None or config.block_chunks == 1:
        return key
    c, j = divmod(int(m[1]), config.blocks_per_chunk)
    return f"block_chunks.{c}.module.{j}.{m[2]}"


def filter_state_dict(state: Mapping[str, torch.Tensor], model: InfinityTransformer, source: str) -> dict[str, torch.Tensor]:
    """Map checkpoint keys onto ``model`` and validate them; the result loads with strict=True.

    * ``block_chunks.{c}.module.{j}.*`` -> ``blocks.{c*per_chunk+j}.*`` (``blocks.{i}.*`` kept);
    * ``scale_mul_1H11`` of shape (1,1,H,1) (customised flash-attn build) -> (1,H,1,1);
    * legacy buffers dropped; ``cfg_uncond`` extended with the official init rows or truncated to 512;
    * missing ``zero_k_bias`` buffers (all zeros by definition) filled with zeros.
    """
    config = model.config
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in LEGACY_KEYS:
            continue
        m = _CHUNK_KEY.match(key)
        if m is not None:
            key = f"blocks.{int(m[1]) * config.blocks_per_chunk + int(m[2])}.{m[3]}"
        if key.endswith("sa.scale_mul_1H11"):
            value = value.reshape(1, -1, 1, 1)
        if key == "cfg_uncond":
            rows = value.shape[0]
            if rows < TEXT_MAXLEN:
                value = torch.cat((value.float(), official_cfg_uncond_init(value.shape[1])[rows:]))
            value = value[:TEXT_MAXLEN]
        out[key] = value
    for key in expected:
        if key.endswith("zero_k_bias") and key not in out:
            out[key] = torch.zeros(expected[key].shape)
    check_state_keys(expected, out, f"{source}: the tensors do not match the detected configuration "
                     f"({config.describe()})", name=lambda k: official_key(k, config))
    bad = [f"'{official_key(k, config)}' {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
           for k, v in out.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensors have the wrong shape for the detected configuration "
            f"({config.describe()}): {', '.join(bad[:4])}."
        )
    return out


def build_infinity_model(obj: dict[str, object], source: str = "state dict", patchify: bool | None = None,
                         operations=None, dtype: torch.dtype = torch.float32,
                         weight_dtype: torch.dtype | None = None, copy: bool = False) -> InfinityTransformer:
    """Build a CPU model from an already read checkpoint object (state dict or container), which it empties.

    ``operations``: the layer namespace (fastvar_core.ops); its layers are built on 'meta' and get the
    checkpoint tensors with ``load_state_dict(assign=True)``. ``dtype``: the blocks' matrices (as
    :meth:`InfinityTransformer.set_block_dtype`; everything else float32). Each tensor is converted to its
    stored dtype on its own and taken out of ``obj``, so the load peaks near the file plus the weights
    instead of holding a float32 copy of the whole model. ``weight_dtype``: the namespace's Linear weights
    go on into this storage dtype (fp8), the bits of :func:`fastvar_core.ops.store_weights` after the load.
    ``copy``: copy the tensors no conversion copies (views of a memory-mapped file, which they would keep mapped).
    """
    state = unwrap_container(obj, source)
    _identify(state, obj, source)
    obj.clear()  # the container's references would keep every source tensor alive
    config = InfinityConfig.from_state_dict(state, source, patchify=patchify)
    with torch.device("meta"):
        model = InfinityTransformer(config, operations)
    filtered = filter_state_dict(state, model, source)
    state.clear()
    target = model.block_dtypes(dtype)
    stored = set(nnops.stored_keys(model, operations)) if weight_dtype is not None else set()
    weights = {}
    for key in list(filtered):
        value = source_value = filtered.pop(key)
        want = target.get(key, torch.float32)
        if value.is_floating_point() and value.dtype != want:
            value = value.float().to(want)  # via float32, as the model computed its dtypes before
        if key in stored:
            value = value.to(weight_dtype)
        if copy and value is source_value:
            value = value.clone()
        weights[key] = value
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_infinity_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, patchify: bool | None = None,
                        operations=None, weight_dtype: torch.dtype | None = None) -> InfinityTransformer:
    """Load an Infinity transformer: ``.pth``/``.safetensors`` file or sharded folder (8B) with its index.

    ``dtype`` applies to the transformer blocks' matrices only (bf16/fp16 on CUDA saves memory and
    time); norms, RoPE, text path, adaLN vectors, head and logits stay float32. ``patchify`` overrides
    the 2x2 spatial patchify detection (default: on for 56-bit models, i.e. Infinity-8B). ``operations``:
    the layer namespace (fastvar_core.ops; None: torch.nn). ``weight_dtype``: store its Linear weights in
    this dtype (fp8) straight from the file, so the load never holds them in ``dtype``.
    """
    path = Path(path)
    source = f"'{path}'"
    if path.is_dir() and (model_type := _hart_config(path)):
        raise CheckpointError(
            f"{source} is a HART checkpoint folder (config model_type '{model_type}'), not an Infinity transformer: "
            f"load it with the HART loader."
        )
    if path.is_dir():
        obj = load_state_dict(path)
    else:
        from ..checkpoint import load_file, prefer_safetensors

        # Not memory-mapped: each tensor is freed once converted (build_infinity_model). Keep the container:
        # it may hold 'trainer' or 'vae'. With a storage weight_dtype every weight is converted anyway: read
        # through a memory map, the process then holds only the converted weights (file pages are cache).
        mapped = weight_dtype is not None
        obj = dict(load_file(prefer_safetensors(path), mmap=mapped))
    model = build_infinity_model(obj, source, patchify=patchify, operations=operations, dtype=dtype,
                                 weight_dtype=weight_dtype, copy=path.is_file() and mapped)
    return model.to(device=device)


def check_vae_matches(model: InfinityTransformer, vae) -> None:
    """Raise IncompatibleModelsError when the VAE's bits per position do not fit the transformer's tokens;
    ``vae``: the VAE or its BSQVAEConfig (read from the file before loading it).

    2B-style models predict d = d_v bits per token; the 8B predicts d = 4*d_v with 2x2 patchify (docs/infinity.md §1.3).
    """
    c = model.config
    vae = getattr(vae, "config", vae)
    d_v = int(vae.codebook_dim)
    if c.vae_bits == d_v:
        return
    hint = ""
    if not c.patchify and c.bits == 4 * d_v:
        hint = " The transformer would fit this VAE with 2x2 spatial patchify: load it with patchify=True."
    elif c.patchify and c.bits == d_v:
        hint = " The transformer would fit this VAE without patchify: load it with patchify=False."
    raise IncompatibleModelsError(
        f"VAE and transformer do not belong together: the transformer ({c.name}) predicts {c.bits} bits per token"
        f"{' = 4 x ' + str(c.vae_bits) + ' with 2x2 patchify' if c.patchify else ''}, so it needs a {c.vae_bits}-bit VAE, "
        f"but the VAE has {d_v}-bit codes (patch {vae.patch_size}). Pairs: Infinity-2B + infinity_vae_d32reg "
        f"(32 bits), Infinity-8B + infinity_vae_d56_f8_14_patchify (14 bits x 4).{hint}"
    )


def check_text_width(model: InfinityTransformer, cond) -> None:
    """Raise IncompatibleModelsError when the text features are not as wide as the model's text input."""
    width = int(cond.kv_compact.shape[-1])
    if width != model.config.text_channels:
        raise IncompatibleModelsError(
            f"text encoder and transformer do not belong together: the text features are {width} wide, but "
            f"{model.config.name} expects {model.config.text_channels} (flan-t5-xl encoder for released Infinity models)."
        )
