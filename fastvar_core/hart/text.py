"""HART's text conditioning: Qwen2 (mit-han-lab/Qwen2-VL-1.5B-Instruct) hidden states.

Reproduces HART's prompt encoding (docs/hart.md §1.5, §3.2): every prompt is tokenized alone, padded on
the right to ``max_token_length`` (300) and truncated; ``mask = ids != pad_id``;
``position_ids = cumsum(mask) - 1``; the bare Qwen2 decoder runs on [system prompt ; prompt] with
the mask [ones ; mask]; the last hidden state minus the S system positions, cast to float32, is the
context. Padding positions are kept: HART attends to all 300 context tokens.
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

from ..errors import CheckpointError, ConfigError
from ..hf_utils import HFTextEncoder, check_prompts, dtype_kwargs, quiet_transformers

HART_MAX_TOKENS = 300  # --max_token_length of every HART entry point (docs/hart.md §3.1)
# The released text model's shape (its qwen2 config, docs/hart.md §1.5): random-weight builds only.
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True)

# HART's `llm_system_prompt`, verbatim (docs/hart.md §3.2 step 4): 705 characters, ending in "User Prompt:\n".
HART_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation.\n"
    "\n"
    "Examples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.\n"
    "\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any "
    'additional sentences. Start your response with "Enhanced Prompt:".\n'
    "\n"
    "User Prompt:\n"
)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------------------------------------
# Conditioning container
# ------------------------------------------------------------------------------------------------


@dataclass
class HARTTextConditioning:
    """Qwen2 context of a batch of prompts (docs/hart.md §3.2).

    context:      (B, T, C_ctx) float32, T = max tokens (300), padding positions included
    mask:         (B, T) bool, ids != pad id
    position_ids: (B, T) int64, cumsum(mask) - 1
    """

    context: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.context.ndim != 3:
            raise ConfigError(f"context must be (B, T, C), found shape {tuple(self.context.shape)}.")
        b, t, _ = self.context.shape
        if b == 0:
            raise ConfigError("text conditioning holds no prompt: expected at least one.")
        if not self.prompts:
            self.prompts = [""] * b
        if len(self.prompts) != b:
            raise ConfigError(f"{len(self.prompts)} prompt strings for a context batch of {b}.")
        if self.mask.shape != (b, t) or self.mask.dtype != torch.bool:
            raise ConfigError(f"mask must be bool {(b, t)}, found {self.mask.dtype} {tuple(self.mask.shape)}.")
        if self.position_ids.shape != (b, t) or self.position_ids.dtype != torch.int64:
            raise ConfigError(
                f"position_ids must be int64 {(b, t)}, found {self.position_ids.dtype} {tuple(self.position_ids.shape)}."
            )
        finite = torch.isfinite(self.context).flatten(1).all(dim=1)  # (B,)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            raise ConfigError(
                f"text features of prompt {i} ({self.prompts[i][:60]!r}) contain NaN or Inf. A Qwen2 model run "
                f"in float16 can overflow: load it in bfloat16 or float32."
            )

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def to(self, device: torch.device | str) -> "HARTTextConditioning":
        return HARTTextConditioning(
            self.context.to(device), self.mask.to(device), self.position_ids.to(device), list(self.prompts)
        )

    def select(self, indices: Sequence[int]) -> "HARTTextConditioning":
        """A new batch made of the given prompts, in the given order (repeats allowed)."""
        if not len(indices):
            raise ConfigError("select() needs at least one prompt index.")
        for i in indices:
            if not 0 <= i < self.batch_size:
                raise ConfigError(f"prompt index {i} is out of range for a batch of {self.batch_size}.")
        idx = torch.tensor(list(indices), dtype=torch.long, device=self.context.device)
        return HARTTextConditioning(
            self.context[idx], self.mask[idx], self.position_ids[idx], [self.prompts[i] for i in indices]
        )

    def repeat(self, n: int) -> "HARTTextConditioning":
        """Each prompt ``n`` times in a row: [p0, p0, p1, p1] for n=2 (one prompt per image)."""
        if n < 1:
            raise ConfigError(f"repeat count must be >= 1, found {n}.")
        return self.select([i for i in range(self.batch_size) for _ in range(n)])


def _check_qwen_folder(folder: Path) -> None:
    if not folder.exists():
        raise CheckpointError(
            f"HART text model '{folder}' does not exist: expected the Qwen2-VL-1.5B-Instruct folder "
            f"(git clone https://huggingface.co/mit-han-lab/Qwen2-VL-1.5B-Instruct)."
        )
    if not folder.is_dir():
        raise CheckpointError(
            f"'{folder}' is a file, but HART's text model is a folder (config.json, tokenizer files, weights)."
        )
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{folder}' has no config.json (found: {present}).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON ({exc}).") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "qwen2":
        arch = ", ".join(cfg.get("architectures") or []) if isinstance(cfg, dict) else ""
        raise CheckpointError(
            f"'{cfg_path}' describes a '{model_type}' model ({arch or 'unknown architecture'}), not Qwen2: HART "
            f"needs mit-han-lab/Qwen2-VL-1.5B-Instruct (config.json with model_type 'qwen2')."
        )
    if not ((folder / "tokenizer.json").is_file() or
            ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise CheckpointError(
            f"'{folder}' has no Qwen2 tokenizer file: expected 'tokenizer.json' (or 'vocab.json' + "
            f"'merges.txt'), found: {present}."
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise CheckpointError(
            f"'{folder}' holds no weights: expected one of {', '.join(_WEIGHT_FILES)}, found: {present}."
        )


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------


class QwenTextEncoder(HFTextEncoder):
    """Qwen2 decoder (no LM head) + tokenizer producing :class:`HARTTextConditioning`."""

    def tokenize(self, prompts: Sequence[str], max_tokens: int = HART_MAX_TOKENS) -> torch.Tensor:
        """HART's tokenization: (B, max_tokens) int64 ids, right-padded; warns on truncation."""
        prompts = check_prompts(prompts)
        for i, ids in enumerate(self.tokenizer(prompts, verbose=False).input_ids):
            if len(ids) > max_tokens:
                warnings.warn(
                    f"prompt {i} is {len(ids)} tokens long, more than HART's limit of {max_tokens}: "
                    f"its last {len(ids) - max_tokens} tokens were dropped.",
                    stacklevel=2,
                )
        return self.tokenizer(
            prompts, max_length=max_tokens, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        max_tokens: int = HART_MAX_TOKENS,
        use_system_prompt: bool = True,
        system_prompt: str = HART_SYSTEM_PROMPT,
    ) -> HARTTextConditioning:
        """Encode prompts into HART's context (float32, on the encoder's device)."""
        prompts = check_prompts(prompts)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, found {max_tokens!r}.")
        ids = self.tokenize(prompts, max_tokens).to(self.device)  # (B, T)
        mask = ids != self.tokenizer.pad_token_id  # (B, T) bool
        position_ids = torch.cumsum(mask, dim=1) - 1  # (B, T) int64
        if use_system_prompt:
            # HART tokenizes the system prompt alone (padding "longest" = none) with the same limit.
            sys_ids = self.tokenizer(
                [system_prompt], max_length=max_tokens, padding="longest", truncation=True, return_tensors="pt"
            ).input_ids.to(self.device).expand(len(prompts), -1)  # (B, S)
            s = sys_ids.shape[1]
            llm_ids = torch.cat([sys_ids, ids], dim=1)  # (B, S+T)
            llm_mask = torch.cat([torch.ones_like(sys_ids, dtype=torch.bool), mask], dim=1)
        else:
            s, llm_ids, llm_mask = 0, ids, mask
        # last_hidden_state is hidden_states[-1] (after the final RMSNorm), docs/hart.md §3.2 step 6.
        hidden = self.model(input_ids=llm_ids, attention_mask=llm_mask).last_hidden_state
        context = hidden[:, s:].float()  # (B, T, C_ctx)
        return HARTTextConditioning(context, mask, position_ids, prompts)

    def token_columns(self, prompt_tokens: int) -> int:
        # Every prompt is padded to HART_MAX_TOKENS behind the system prompt, which is cut at the same limit
        # (docs/hart.md §3.2). Without a tokenizer the system prompt's length is estimated at 4 characters a token
        # (byte-level BPE on English text).
        if self.tokenizer is not None:
            system = len(self.tokenizer([HART_SYSTEM_PROMPT]).input_ids[0])
        else:
            system = len(HART_SYSTEM_PROMPT) // 4
        return min(system, HART_MAX_TOKENS) + HART_MAX_TOKENS

    def extra_repr(self) -> str:
        return f"source={self.source!r}, width={self.width}"


def load_qwen_encoder(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> QwenTextEncoder:
    """Load HART's text model (a Hugging Face Qwen2 folder) as a bare ``Qwen2Model`` + tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    _check_qwen_folder(folder)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"could not build the Qwen2 tokenizer from '{folder}' ({type(exc).__name__}: {str(exc).splitlines()[0]})."
        ) from None
    if tokenizer.pad_token_id is None:
        raise CheckpointError(
            f"the tokenizer in '{folder}' defines no pad token: expected '<|endoftext|>' in tokenizer_config.json."
        )
    # HART's mask and cumsum(mask) - 1 positions assume right padding (docs/hart.md §1.5, §3.2).
    tokenizer.padding_side = "right"
    try:
        with quiet_transformers():
            model, info = AutoModel.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, **dtype_kwargs(dtype)
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CheckpointError(
            f"could not load the Qwen2 weights from '{folder}' ({type(exc).__name__}: {first}); "
            f"a shard may be truncated or belong to another model."
        ) from None
    # Extra tensors (lm_head, a vision tower) are ignored as upstream does; missing ones are not.
    missing = sorted(info["missing_keys"])
    if missing:
        raise CheckpointError(
            f"'{folder}' lacks {len(missing)} Qwen2 tensors (e.g. {', '.join(repr(k) for k in missing[:3])}): "
            f"the download is incomplete."
        )
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer in '{folder}' has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size} embeddings: they do not belong together."
        )
    return QwenTextEncoder(model.to(device), tokenizer, source=str(folder))


def random_qwen_encoder(depth: int | None = None) -> QwenTextEncoder:
    """HART's bare Qwen2 decoder with default initialisation and no tokenizer (build under a meta device for shapes);
    ``depth`` layers (None: the release's 28)."""
    from transformers import Qwen2Config, Qwen2Model

    config = QWEN2_1_5B if depth is None else {**QWEN2_1_5B, "num_hidden_layers": depth}
    with quiet_transformers():
        return QwenTextEncoder(Qwen2Model(Qwen2Config(**config)), None, "random Qwen2-1.5B")
