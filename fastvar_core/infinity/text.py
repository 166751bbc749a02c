"""Infinity's text conditioning: the flan-t5-xl encoder and its compacted variable-length features.

Reproduces the official prompt encoding (docs/infinity.md §5): T5 tokenizer with ``legacy=True``,
``max_length=512``, ``padding='max_length'``, ``truncation=True`` (``</s>`` appended), the encoder's
``last_hidden_state`` cast to float32, and the real tokens of every prompt (EOS included) packed
into one ``(sum(lens), 2048)`` tensor with ``cu_seqlens`` for varlen cross-attention.

Two on-disk layouts load: a Hugging Face folder (``config.json`` + weights, sharded or not, +
tokenizer files) and a single encoder-only weight file (``shared.weight`` + ``encoder.*``, the
layout of the community / ComfyUI "T5 encoder" files) plus a tokenizer folder.
Nothing is ever downloaded: every transformers call uses ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import check_state_keys, load_file, prefer_safetensors
from ..errors import CheckpointError, ConfigError
from ..hf_utils import HFTextEncoder, check_prompts, dtype_kwargs, quiet_transformers

T5_MAX_LENGTH = 512  # tokenizer limit used by Infinity for training and inference (docs/infinity.md §5)
# The released encoder's shape (google/flan-t5-xl's config, docs/infinity.md §5): random-weight builds only.
FLAN_T5_XL = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ENCODER_PREFIX_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"


# ------------------------------------------------------------------------------------------------
# Conditioning container
# ------------------------------------------------------------------------------------------------


@dataclass
class InfinityTextConditioning:
    """Compacted T5 features of a batch of prompts (docs/infinity.md §5).

    kv_compact: (sum(lens), C_text) float32, the real tokens of prompt 0, then prompt 1, ...
    lens:       tokens per prompt (EOS included)
    cu_seqlens: (B+1,) int32, [0, cumsum(lens)]
    max_seqlen: max(lens)
    """

    kv_compact: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lens = [int(n) for n in self.lens]
        self.max_seqlen = int(self.max_seqlen)
        if not self.prompts:
            self.prompts = [""] * len(self.lens)
        b = len(self.lens)
        if b == 0:
            raise ConfigError("text conditioning holds no prompt: expected at least one.")
        if self.kv_compact.ndim != 2:
            raise ConfigError(
                f"kv_compact must be (tokens, channels), found shape {tuple(self.kv_compact.shape)}."
            )
        if len(self.prompts) != b:
            raise ConfigError(f"{len(self.prompts)} prompt strings for {b} lengths.")
        if min(self.lens) < 1:
            raise ConfigError(f"every prompt needs at least one token, found lens={self.lens}.")
        if sum(self.lens) != self.kv_compact.shape[0]:
            raise ConfigError(
                f"sum(lens)={sum(self.lens)} does not match the {self.kv_compact.shape[0]} rows of kv_compact."
            )
        expected_cu = [0]
        for n in self.lens:
            expected_cu.append(expected_cu[-1] + n)
        if self.cu_seqlens.dtype != torch.int32 or self.cu_seqlens.tolist() != expected_cu:
            raise ConfigError(
                f"cu_seqlens must be int32 {expected_cu}, found {self.cu_seqlens.dtype} {self.cu_seqlens.tolist()}."
            )
        if self.max_seqlen != max(self.lens):
            raise ConfigError(f"max_seqlen={self.max_seqlen} but max(lens)={max(self.lens)}.")
        bad_rows = (~torch.isfinite(self.kv_compact).all(dim=1)).nonzero()
        if bad_rows.numel():
            row = int(bad_rows[0])
            i = int(torch.searchsorted(self.cu_seqlens.cpu(), torch.tensor(row, dtype=torch.int32), right=True)) - 1
            raise ConfigError(
                f"text features of prompt {i} ({self.prompts[i][:60]!r}) contain NaN or Inf. A T5 encoder run in "
                f"float16 can overflow: load it in bfloat16 or float32."
            )

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @classmethod
    def from_padded(cls, features: torch.Tensor, lens: Sequence[int], prompts: Sequence[str]) -> "InfinityTextConditioning":
        """Pack (B, L, C) padded features whose first ``lens[b]`` rows are real into the compact form."""
        kv = torch.cat([features[b, :n] for b, n in enumerate(lens)], dim=0).float()  # (sum(lens), C)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=kv.device)
        cu[1:] = torch.tensor(list(lens), dtype=torch.int32).cumsum(0)
        return cls(kv, list(lens), cu, max(lens), list(prompts))

    def to(self, device: torch.device | str) -> "InfinityTextConditioning":
        return InfinityTextConditioning(
            self.kv_compact.to(device), list(self.lens), self.cu_seqlens.to(device), self.max_seqlen, list(self.prompts)
        )

    def select(self, indices: Sequence[int]) -> "InfinityTextConditioning":
        """A new batch made of the given prompts, in the given order (repeats allowed)."""
        if not len(indices):
            raise ConfigError("select() needs at least one prompt index.")
        for i in indices:
            if not 0 <= i < self.batch_size:
                raise ConfigError(f"prompt index {i} is out of range for a batch of {self.batch_size}.")
        cu = self.cu_seqlens.tolist()
        kv = torch.cat([self.kv_compact[cu[i] : cu[i + 1]] for i in indices], dim=0)
        lens = [self.lens[i] for i in indices]
        new_cu = torch.tensor([0] + [sum(lens[: k + 1]) for k in range(len(lens))], dtype=torch.int32,
                              device=self.cu_seqlens.device)
        return InfinityTextConditioning(kv, lens, new_cu, max(lens), [self.prompts[i] for i in indices])

    def repeat(self, n: int) -> "InfinityTextConditioning":
        """Each prompt ``n`` times in a row: [p0, p0, p1, p1] for n=2 (one prompt per image)."""
        if n < 1:
            raise ConfigError(f"repeat count must be >= 1, found {n}.")
        return self.select([i for i in range(self.batch_size) for _ in range(n)])

    @staticmethod
    def cat(items: Sequence["InfinityTextConditioning"]) -> "InfinityTextConditioning":
        """Concatenate batches, e.g. [conditional ; negative] for classifier-free guidance."""
        if not items:
            raise ConfigError("cat() needs at least one conditioning.")
        widths = {it.kv_compact.shape[1] for it in items}
        if len(widths) != 1:
            raise ConfigError(f"cannot concatenate text features of different widths {sorted(widths)}.")
        device = items[0].kv_compact.device
        kv = torch.cat([it.kv_compact.to(device) for it in items], dim=0)
        lens = [n for it in items for n in it.lens]
        cu = torch.tensor([0] + [sum(lens[: k + 1]) for k in range(len(lens))], dtype=torch.int32, device=device)
        return InfinityTextConditioning(kv, lens, cu, max(lens), [p for it in items for p in it.prompts])


def _read_config_json(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{path}' is not valid JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{path}' holds a {type(cfg).__name__}, expected a JSON object.")
    return cfg


def _check_t5_config(cfg: dict, path: Path) -> None:
    model_type = cfg.get("model_type")
    if model_type != "t5":
        arch = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"'{path}' describes a '{model_type}' model ({arch}), not a T5 encoder: Infinity needs the "
            f"flan-t5-xl text encoder (config.json with model_type 't5')."
        )


def _check_t5_tokenizer_files(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder '{folder}' does not exist (expected tokenizer.json or spiece.model).")
    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"'{folder}' has no T5 tokenizer file: expected 'tokenizer.json' (or 'spiece.model') from "
            f"google/flan-t5-xl, found: {present}."
        )


def _load_t5_tokenizer(folder: Path, vocab_size: int):
    from transformers import AutoTokenizer

    _check_t5_tokenizer_files(folder)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, legacy=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"could not build the T5 tokenizer from '{folder}' ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            f"With only 'spiece.model', transformers needs sentencepiece and protobuf; copying "
            f"'tokenizer.json' from google/flan-t5-xl avoids that."
        ) from None
    tok.model_max_length = T5_MAX_LENGTH  # as Infinity sets it after loading
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise CheckpointError(
            f"the tokenizer in '{folder}' defines no pad/eos token (pad={tok.pad_token!r}, eos={tok.eos_token!r}): "
            f"expected T5's '<pad>' and '</s>'; copy 'tokenizer_config.json' and 'special_tokens_map.json' "
            f"from google/flan-t5-xl."
        )
    if len(tok) > vocab_size:
        raise CheckpointError(
            f"the tokenizer in '{folder}' has {len(tok)} tokens but the encoder only {vocab_size} embeddings: "
            f"they do not belong together."
        )
    return tok


# ------------------------------------------------------------------------------------------------
# Single-file encoder: key filter and config detection
# ------------------------------------------------------------------------------------------------


def t5_config_from_state_dict(state: dict[str, torch.Tensor]):
    """Detect a T5 encoder config from the tensor shapes (used when no config.json is at hand)."""
    from transformers import T5Config

    try:
        vocab_size, d_model = state["shared.weight"].shape
        rel = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, heads)
        inner = state[_ENCODER_PREFIX_PROBE].shape[0]  # heads * d_kv
    except KeyError as exc:
        raise CheckpointError(f"cannot detect the T5 config: tensor {exc} is missing.") from None
    num_buckets, num_heads = rel.shape
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block."))
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=wi.shape[0],
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",  # T5 v1.1 / flan-t5 vs original T5
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _filter_t5_encoder_keys(raw: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Keep the encoder half of a T5 state dict, with the tied embedding under both of its names."""
    if _ENCODER_PREFIX_PROBE not in raw:
        sample = ", ".join(f"'{k}'" for k in sorted(raw)[:4]) or "no tensors"
        raise CheckpointError(
            f"'{source}' is not a T5 encoder: expected keys like 'shared.weight' and '{_ENCODER_PREFIX_PROBE}', "
            f"found {sample}."
        )
    state = {k: v for k, v in raw.items() if not (k.startswith("decoder.") or k == "lm_head.weight")}
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5EncoderModel
    return state


def _check_keys(state: dict[str, torch.Tensor], model: nn.Module, source: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_keys(expected, state, f"'{source}' does not match the T5 encoder config")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(
                f"'{source}': tensor '{k}' has shape {tuple(state[k].shape)}, the config expects {tuple(shape)}."
            )


def _build_t5_from_file(file: Path, config_folder: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    file = prefer_safetensors(file)
    state = _filter_t5_encoder_keys(dict(load_file(file)), file)
    cfg_json = _read_config_json(config_folder)
    if cfg_json is not None:
        _check_t5_config(cfg_json, config_folder / "config.json")
        config = T5Config.from_pretrained(str(config_folder), local_files_only=True)
    else:
        config = t5_config_from_state_dict(state)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    _check_keys(state, model, file)
    state = {k: v.to(dtype) for k, v in state.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # keep the tie after the dtype cast
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one Parameter, so .to(device) keeps one copy
    return model


def _build_t5_from_folder(folder: Path, dtype: torch.dtype):
    from transformers import T5EncoderModel

    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"'{folder}' holds no T5 weights: expected one of {', '.join(_WEIGHT_FILES)}, found: {present}."
        )
    try:
        with quiet_transformers():
            model, info = T5EncoderModel.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, **dtype_kwargs(dtype)
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CheckpointError(
            f"could not load the T5 encoder weights from '{folder}' ({type(exc).__name__}: {first}); "
            f"a shard may be truncated or belong to another model."
        ) from None
    # decoder.* and lm_head.weight are expected extras; anything the encoder lacks is an error.
    missing = sorted(k for k in info["missing_keys"] if k != "encoder.embed_tokens.weight")
    if missing:
        raise CheckpointError(
            f"'{folder}' lacks {len(missing)} T5 encoder tensors (e.g. {', '.join(repr(k) for k in missing[:3])}): "
            f"the download is incomplete."
        )
    return model


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------


class T5TextEncoder(HFTextEncoder):
    """flan-t5-xl encoder + tokenizer producing :class:`InfinityTextConditioning`."""

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Infinity's tokenization: ids and attention mask, both (B, 512) int64; warns on truncation."""
        prompts = check_prompts(prompts)
        full_lens = [len(ids) for ids in self.tokenizer(prompts, verbose=False).input_ids]
        for i, n in enumerate(full_lens):
            if n > T5_MAX_LENGTH:
                warnings.warn(
                    f"prompt {i} is {n} tokens long (with </s>), more than the T5 limit of {T5_MAX_LENGTH}: "
                    f"its last {n - T5_MAX_LENGTH} tokens were dropped.",
                    stacklevel=2,
                )
        tokens = self.tokenizer(
            prompts, max_length=T5_MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        )
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> InfinityTextConditioning:
        """Encode prompts into Infinity's compacted text conditioning (float32, on the encoder's device)."""
        prompts = check_prompts(prompts)
        ids, mask = self.tokenize(prompts)  # (B, 512)
        lens = mask.sum(dim=1).tolist()
        # Columns that are padding in every row are masked out of every real token's attention, so
        # running only the first max(lens) columns gives the official 512-column features up to
        # float rounding (models/README.md §5: within 1e-5) at a fraction of the cost.
        width = max(lens)
        ids, mask = ids[:, :width].to(self.device), mask[:, :width].to(self.device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, width, C)
        return InfinityTextConditioning.from_padded(features.float(), lens, prompts)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, width={self.width}, max_length={T5_MAX_LENGTH}"


def load_t5_encoder(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> T5TextEncoder:
    """Load the flan-t5-xl encoder from a Hugging Face folder or from a single encoder-only file.

    path: a folder (config.json + weights + tokenizer files) or a ``.safetensors``/``.bin`` file with
        ``shared.weight`` + ``encoder.*``.
    tokenizer_path: folder with the tokenizer files. Defaults to ``path`` for a folder and to the
        file's own folder for a single file. For a single file its ``config.json`` gives the model
        config; without one the config is detected from the tensor shapes.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"T5 text encoder '{path}' does not exist: expected a flan-t5-xl folder or file.")
    if path.is_dir():
        cfg = _read_config_json(path)
        if cfg is None:
            raise CheckpointError(f"'{path}' has no config.json: expected a Hugging Face flan-t5-xl folder.")
        _check_t5_config(cfg, path / "config.json")
        tok_folder = Path(tokenizer_path) if tokenizer_path is not None else path
        _check_t5_tokenizer_files(tok_folder)
        model = _build_t5_from_folder(path, dtype)
    else:
        if tokenizer_path is None:
            if not any((path.parent / n).is_file() for n in ("tokenizer.json", "spiece.model")):
                raise CheckpointError(
                    f"'{path}' is a single weight file with no tokenizer beside it: choose as its tokenizer the "
                    f"folder holding flan-t5-xl's 'tokenizer.json' (or 'spiece.model') and 'tokenizer_config.json' "
                    f"(e.g. the flan-t5-xl folder)."
                )
            tokenizer_path = path.parent
        tok_folder = Path(tokenizer_path)
        _check_t5_tokenizer_files(tok_folder)
        model = _build_t5_from_file(path, tok_folder, dtype)
    tokenizer = _load_t5_tokenizer(tok_folder, model.config.vocab_size)
    return T5TextEncoder(model.to(device), tokenizer, source=str(path))


def random_t5_encoder(depth: int | None = None) -> T5TextEncoder:
    """flan-t5-xl's encoder with default initialisation and no tokenizer (build under a meta device for shapes);
    ``depth`` encoder layers (None: the release's 24)."""
    from transformers import T5Config, T5EncoderModel

    config = FLAN_T5_XL if depth is None else {**FLAN_T5_XL, "num_layers": depth}
    with quiet_transformers():
        return T5TextEncoder(T5EncoderModel(T5Config(**config)), None, "random flan-t5-xl")
