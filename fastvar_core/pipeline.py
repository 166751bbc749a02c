"""End-to-end generation in a few lines, for both families.

    from fastvar_core.pipeline import Pipeline
    pipe = Pipeline.load("infinity", model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth",
                         text_encoder="flan-t5-xl")
    images, result = pipe.generate("a red fox in the snow", width=1024, height=1024, pruning="paper", seed=1)
    # images: (B, H, W, 3) float in [0, 1], RGB; result.seconds, result.kept_mask(scale) ...
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, IncompatibleModelsError
from .pruning import PruningConfig, make_preset
from .sampling import ProgressCallback, SampleResult, check_finite, check_seed
from .schedules import (
    ScaleSchedule,
    hart_schedule,
    hart_schedule_for_size,
    infinity_schedule,
    infinity_schedule_for_size,
    snap_template,
)

FAMILIES = ("infinity", "hart")
# A requested size snaps to the nearest aspect template; one further than this factor away (beyond the
# table's 1:3 .. 3:1) is refused rather than silently generated in another shape.
NUMERIC_HINT = "the weights may be corrupt (download them again) or overflow in float16 (use bfloat16 or float32)"


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


def _features(cond) -> torch.Tensor:
    """The feature tensor of either family's text conditioning."""
    return cond.kv_compact if hasattr(cond, "kv_compact") else cond.context


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_pruning(spec: str | os.PathLike | PruningConfig | None, family: str, schedule: ScaleSchedule,
                    depth: int) -> PruningConfig:
    """A PruningConfig from a preset name (off, paper, 2k, fast), a JSON file path, or a config; validated."""
    if spec is None:
        spec = "off"
    if isinstance(spec, PruningConfig):
        config = spec
    elif str(spec) in ("off", "paper", "2k", "fast"):
        config = make_preset(family, str(spec), schedule.num_scales, depth)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"pruning must be off, paper, 2k, fast or a JSON file; '{spec}' is none of these")
        try:
            return PruningConfig.from_json(path.read_text()).validate(
                schedule.num_scales, depth, can_skip_last=family != "hart")
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"pruning file '{path}': {exc}") from None
    return config.validate(schedule.num_scales, depth, can_skip_last=family != "hart")


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
        device = check_device(device) if device is not None else default_device()
        if family == "infinity":
            from .infinity import check_vae_matches, load_infinity_model
            from .infinity.text import load_t5_encoder
            from .infinity.vae import load_infinity_vae

            if vae is None:
                raise ConfigError("--vae is required for Infinity (e.g. infinity_vae_d32reg.pth)")
            net = load_infinity_model(model, device=device, dtype=dtype)
            ae = load_infinity_vae(vae, device=device)
            _check_pair(check_vae_matches, net, ae, f"model '{model}' and VAE '{vae}'")
            enc = load_t5_encoder(text_encoder, tokenizer, device=device) if text_encoder else None
            text_width = net.config.text_channels
        elif family == "hart":
            from .hart import check_vae_matches, load_hart_model
            from .hart.text import load_qwen_encoder
            from .hart.vae import load_hart_vae

            net = load_hart_model(model, device=device, dtype=dtype)
            vae = vae if vae is not None else hart_tokenizer_folder(model)
            ae = load_hart_vae(vae, device=device)
            _check_pair(check_vae_matches, net, ae, f"model '{model}' and VAE '{vae}'")
            enc = load_qwen_encoder(text_encoder, device=device) if text_encoder else None
            text_width = net.config.context_dim
        else:
            raise ConfigError(f"model family {family!r} is unknown; allowed: {list(FAMILIES)}")
        if enc is not None and enc.width != text_width:
            raise IncompatibleModelsError(
                f"text encoder '{text_encoder}' makes {enc.width}-wide features, but the model '{model}' expects "
                f"{text_width} ({'flan-t5-xl' if family == 'infinity' else 'Qwen2-VL-1.5B-Instruct'}): use the "
                f"text encoder of this model's release"
            )
        return cls(family, net, ae, enc)

    @property
    def depth(self) -> int:
        return self.model.config.depth

    def schedule(self, width: int | None = None, height: int | None = None, budget: str | None = None) -> ScaleSchedule:
        """The schedule for a requested size, snapped to the nearest aspect template and size class.

        Infinity: the official templates and budgets (0.06M .. 1M) or zero-shot 2K. HART: its trained
        square 1M schedule, or zero-shot other aspect ratios and 2K (see ``hart_schedule``).
        """
        if width is None and height is None:
            if self.family == "hart":
                return hart_schedule(tuple(self.model.config.patch_nums), 1.0, budget or "1M")
            return infinity_schedule(1.0, budget or "1M")
        if width is None or height is None:
            raise ConfigError(f"give both width and height, or neither; got width={width}, height={height}")
        check_image_size(width, height)
        if self.family == "hart":
            return hart_schedule_for_size(width, height, budget, tuple(self.model.config.patch_nums))
        return infinity_schedule_for_size(width, height, budget)

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
               record_kept: bool = False) -> SampleResult:
        """Run the scale loop; None for a knob means the family's official default."""
        seed = check_seed(seed)
        for name, c in (("text conditioning", cond), ("negative text conditioning", negative)):
            if c is not None:
                check_finite(_features(c), name)
        config = resolve_pruning(pruning, self.family, schedule, self.depth)
        knobs = {k: v for k, v in dict(cfg=cfg, top_k=top_k, top_p=top_p).items() if v is not None}
        if self.family == "infinity":
            from .infinity import sample_infinity

            if tau is not None:
                knobs["tau"] = tau
            result = sample_infinity(self.model, cond, schedule, negative=negative, seed=seed, pruning=config,
                                     callback=callback, record_kept=record_kept, **knobs)
        else:
            from .hart import sample_hart

            if negative is not None:
                raise ConfigError("HART has no negative prompt (its unconditional branch is an empty context)")
            result = sample_hart(self.model, self.vae, cond, schedule, seed=seed, pruning=config, callback=callback,
                                 record_kept=record_kept, **knobs)
        check_finite(result.latent, "the sampled latent", NUMERIC_HINT)
        return result

    def decode(self, result: SampleResult, tile: int | None = None) -> torch.Tensor:
        """(B, H, W, 3) float RGB in [0, 1] on the CPU."""
        with torch.inference_mode():
            images = self.vae.to_image(result.latent, tile=tile).float().cpu()
        check_finite(images, "the decoded image", NUMERIC_HINT)
        return images

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
        tile = 64 if max(schedule.final_size) > 64 else None  # 2K: decode in latent tiles
        return self.decode(result, tile=tile), result


def _check_pair(check, model, vae, names: str) -> None:
    """Run a family's model/VAE check; its error then names the two files."""
    try:
        check(model, vae)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"{names}: {exc}") from None


def hart_tokenizer_folder(model: str | os.PathLike) -> Path:
    """HART's VAE is the sibling tokenizer/ folder of llm/ (or tokenizer/ inside the release folder)."""
    path = Path(model)
    for candidate in (path / "tokenizer", path.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no tokenizer/ folder next to '{path}': pass the HART VAE folder explicitly")
