"""Small helpers shared by the transformers-based text encoders of both families."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from .cost import LIVE_HIDDEN
from .errors import ConfigError


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The from_pretrained keyword for a dtype (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bar for one call; restore both afterwards.

    Real loading problems are turned into CheckpointError by the callers from the loading info.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A non-empty list of strings, or ConfigError naming the offending entry."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompt given: expected a list of at least one string.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"prompt {i} is a {type(p).__name__}, expected a string.")
    return prompts


class HFTextEncoder(nn.Module):
    """A frozen transformers text model plus its tokenizer; subclasses add the family's encoding."""

    def __init__(self, model: nn.Module, tokenizer, source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source

    @property
    def width(self) -> int:
        """Feature width (hidden size: 2048 for flan-t5-xl, 1536 for Qwen2-1.5B)."""
        return int(self.model.config.hidden_size)

    def working_memory(self, prompts: int, tokens: int = 512) -> int:
        """Activation bytes of encoding ``prompts`` prompts of up to ``tokens`` tokens: a few hidden states,
        one FFN hidden layer and one attention score matrix per head."""
        c = self.model.config
        ffn = getattr(c, "intermediate_size", None) or getattr(c, "d_ff", 4 * c.hidden_size)
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "num_heads", 1)
        return prompts * tokens * self.dtype.itemsize * (LIVE_HIDDEN * c.hidden_size + ffn + heads * tokens)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def token_columns(self, prompt_tokens: int) -> int:
        """Token columns per prompt the model runs in ``encode`` for prompts of ``prompt_tokens`` tokens."""
        return prompt_tokens

    @torch.no_grad()
    def encode_random(self, prompts: int, prompt_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """The model's forward of ``encode`` on random token ids (``prompts`` prompts of ``prompt_tokens`` tokens):
        its time and memory without a tokenizer. Returns the last hidden state."""
        shape = (prompts, self.token_columns(prompt_tokens))
        ids = torch.randint(0, self.model.config.vocab_size, shape, generator=generator).to(self.device)
        mask = torch.ones(shape, dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state
