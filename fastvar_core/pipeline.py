"""End-to-end generation in a few lines, for both families.

    from fastvar_core.pipeline import Pipeline
    pipe = Pipeline.load("infinity", model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth",
                         text_encoder="flan-t5-xl")
    images, result = pipe.generate("a red fox in the snow", width=1024, height=1024, pruning="paper", seed=1)
    # images: (B, H, W, 3) float in [0, 1], RGB; result.seconds ...; hooks=SamplingHooks(record_kept=True)
    # makes result.kept_mask(scale) available
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families
from .errors import ConfigError
from .families import NUMERIC_HINT, Family, get_family  # noqa: F401  (NUMERIC_HINT: re-exported)
from .pruning import ACCELERATED_PRESETS, PRESET_NAMES, PruningConfig
from .pruning_request import PruningRequest
from .sampling import ProgressCallback, SampleResult, SamplingHooks, check_seed
from .schedules import ScaleSchedule, snap_template

PRESETS = PRESET_NAMES + ACCELERATED_PRESETS  # the names ``pruning=`` and the CLI's --pruning take


def check_batch(batch: int) -> int:
    """Images per prompt: an int >= 1, or ConfigError."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ConfigError(f"batch size must be an integer >= 1 (images per prompt), got {batch!r}")
    return int(batch)


def check_image_size(width: int, height: int) -> None:
    """Positive pixel counts whose aspect ratio the aspect templates can represent, or ConfigError."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of pixels, got {value!r}")
    snap_template(width, height)


def check_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine, or ConfigError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was requested, but this PyTorch has no usable CUDA GPU; use 'cpu'")
    return device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pruning(pruning: str | os.PathLike | PruningRequest | PruningConfig | None) -> PruningRequest | PruningConfig:
    """A request from a preset name (off, paper, 2k, fast), a config from a JSON file; requests and configs pass.

    Nothing here depends on the schedule: ``families.sample`` resolves or validates the result once.
    """
    if pruning is None:
        return PruningRequest(mode="off")
    if isinstance(pruning, (PruningRequest, PruningConfig)):
        return pruning
    if str(pruning) in PRESETS:
        return PruningRequest(mode=str(pruning))
    path = Path(pruning)
    if not path.is_file():
        raise ConfigError(f"pruning must be {', '.join(PRESETS)} or a JSON file; '{pruning}' is none of these")
    try:
        return PruningConfig.from_json(path.read_text())
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"pruning file '{path}': {exc}") from None


@dataclass
class Pipeline:
    """A loaded model family: transformer, VAE and (optionally) text encoder on one device."""

    family: str
    model: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object | None = None

    @classmethod
    def load(
        cls,
        family: str,
        model: str | os.PathLike,
        vae: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        *,
        tokenizer: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Pipeline:
        """Load the official files of a family. HART's VAE defaults to the release's tokenizer/ folder."""
        fam = get_family(family)
        device = check_device(device) if device is not None else default_device()
        net, ae, enc = families.load_parts(fam, model, vae, text_encoder, tokenizer=tokenizer, device=device,
                                           dtype=dtype)
        return cls(fam.name, net, ae, enc)

    @property
    def spec(self) -> Family:
        """This pipeline's Family (defaults, capabilities, tables)."""
        return get_family(self.family)

    @property
    def depth(self) -> int:
        return self.spec.depth(self.model)

    def schedule(self, width: int | None = None, height: int | None = None, budget: str | None = None) -> ScaleSchedule:
        """The schedule for a requested size, snapped to the nearest aspect template and size class.

        Infinity: the official templates and budgets (0.06M .. 1M) or zero-shot 2K. HART: its trained
        square 1M schedule, or zero-shot other aspect ratios and 2K (see ``hart_schedule``).
        """
        if (width is None) != (height is None):
            raise ConfigError(f"give both width and height, or neither; got width={width}, height={height}")
        if width is not None:
            check_image_size(width, height)
        return self.spec.schedule_for_size(self.model, width, height, budget)

    def encode(self, prompts: list[str], negative: list[str] | None = None):
        """Text conditioning (and negative conditioning, or None) for a list of prompts."""
        if self.text_encoder is None:
            raise ConfigError("no text encoder is loaded: pass text_encoder= to Pipeline.load")
        cond = self.text_encoder.encode(prompts)
        neg = self.text_encoder.encode(negative) if negative else None
        return cond, neg

    def sample(self, cond, schedule: ScaleSchedule, *, negative=None, pruning=None, seed: int = 0,
               cfg: float | None = None, tau: float | None = None, top_k: int | None = None,
               top_p: float | None = None, callback: ProgressCallback | None = None,
               hooks: SamplingHooks | None = None) -> SampleResult:
        """Run the scale loop (fastvar_core.families.sample); None for a knob means the family's official default.

        ``pruning``: a preset name, a JSON file, a PruningRequest or a PruningConfig (None: off).
        """
        check_seed(seed)  # before the pruning file is read: the cheaper error first
        return families.sample(self.family, self.model, cond, schedule, vae=self.vae, negative=negative, cfg=cfg,
                               tau=tau, top_k=top_k, top_p=top_p, seed=seed, pruning=load_pruning(pruning),
                               callback=callback, hooks=hooks)

    def decode(self, result: SampleResult, tile: str | int | None = "auto") -> torch.Tensor:
        """(B, H, W, 3) float RGB in [0, 1] on the CPU; ``tile``: "on", "off"/None, a size, or "auto": as the
        Decode node, whole when it fits the memory free and what sampling this image unpruned needs (so the
        decode does not set the run's peak), else in the fewest-cells tiles that fit (families.decode_budget)."""
        budget = None
        if tile == "auto":
            budget = families.sampled_decode_budget(self.family, self.model, None, result.schedule, result.latent)
        return families.decode(self.family, self.vae, result.latent, tile, budget=budget).cpu()

    def generate(self, prompt: str | list[str], negative: str | list[str] | None = None, *, width: int | None = None,
                 height: int | None = None, budget: str | None = None, batch: int = 1, **sample_kwargs):
        """Encode, sample and decode; returns (images (B, H, W, 3), SampleResult)."""
        prompts = [prompt] * check_batch(batch) if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative:
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        cond, neg = self.encode(prompts, negatives)
        schedule = self.schedule(width, height, budget)
        result = self.sample(cond, schedule, negative=neg, **sample_kwargs)
        return self.decode(result), result

