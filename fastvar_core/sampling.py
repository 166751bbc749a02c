"""What every family's sampler shares: per-scale settings, progress/interrupt callback, the result."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .pruning.config import PruningConfig
from .pruning.run import PruningRun, SelectObserver, kept_mask
from .schedules import ScaleSchedule

# callback(step, total_steps, preview) is called after every scale step; ``preview()`` returns a cheap
# (B, h, w, 3) RGB rendering of the current latent in [0, 1]. Raising any exception from it
# stops sampling within one scale; every cache of the run is released on the way out.
ProgressCallback = Callable[[int, int, Callable[[], torch.Tensor]], None]


# on_draw(scale, logits, drawn, generator_state) -> tokens or None: called after every token draw with
# the filtered logits the draw used (B, N, V) float32, the drawn indices (B, N) and the sampler
# generator's state from just before the draw. A returned (B, N) tensor replaces the drawn tokens for
# the rest of the run (teacher forcing on a reference run, see docs/parity.md).
DrawObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


# on_logits(scale, logits): the guided logits of every executed scale, before the NaN check, top-k/top-p
# and the draw (Infinity: (B, L, 2d) bit-pair logits divided by tau; HART: (B, l, V)). Read-only: the
# sampler filters them in place afterwards, so copy what you keep.
LogitsObserver = Callable[[int, torch.Tensor], None]

# on_trace(name, tensor): intermediate tensors of the scale loop, in run order, for parity checks.
# Both families: "next_input" (the next scale's input before embedding, after every scale but the
# last) and "latent" (the accumulated latent after every scale). HART also: "latent_before_last",
# "diffusion_cond" (the residual diffusion's conditioning, (rows, l, C)) and "diffusion_out" (its
# residual, (B, l, Cvae)). Read-only, like on_logits.
TraceObserver = Callable[[str, torch.Tensor], None]


@dataclass
class SamplingHooks:
    """What a test or tool attaches to one sampling run to observe it or force its outcome.

    Generation never needs any of it; with ``hooks=None`` a sampler does no instrumentation work and
    no extra GPU->CPU copy. Every field is optional.
    """

    on_select: SelectObserver | None = None  # every pruned sub-layer (see PruningRun)
    on_draw: DrawObserver | None = None  # every token draw
    on_logits: LogitsObserver | None = None  # guided logits of every executed scale
    on_trace: TraceObserver | None = None  # intermediate tensors (see TraceObserver)
    # Teacher forcing: scale -> the tokens that scale must produce (Infinity: (B, h, w, d) bits, HART:
    # (B, h*w) code indices). Infinity still draws, so its generator advances as in the reference,
    # then takes these bits; HART skips the draw and embeds the codes without Gumbel smoothing.
    teacher: Mapping[int, torch.Tensor] | None = None
    # Fill SampleResult.kept with every pruned sub-layer's kept indices (one GPU->CPU copy each).
    record_kept: bool = False
    # A dict to which the wall seconds of pruned sub-layers are added under "select", "branch" and
    # "restore" (CUDA is synchronised around each part: for measurements only).
    pruning_seconds: dict[str, float] | None = None
    # HART: the generator of the residual-diffusion noise (default: the run's seeded generator), e.g.
    # to reproduce the official code, which draws it from the global RNG.
    diffusion_generator: torch.Generator | None = None


def forced_tokens(hooks: SamplingHooks | None, scale: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The teacher's tokens for ``scale`` reshaped to ``shape`` (int64), or None when it has none."""
    if hooks is None or hooks.teacher is None:
        return None
    forced = hooks.teacher.get(scale)
    if forced is None:
        return None
    if forced.numel() != math.prod(shape):
        raise ConfigError(f"hooks.teacher[{scale}] has shape {tuple(forced.shape)}, but scale {scale} produces "
                          f"{math.prod(shape)} tokens, shape {tuple(shape)}")
    return forced.reshape(shape).long()


def pruning_run_for(config: PruningConfig | None, scales: Sequence[tuple[int, int]], depth: int,
                    sublayers: Sequence[str], hooks: SamplingHooks | None) -> PruningRun:
    """A sampler's PruningRun for a model whose layers route ``sublayers``, observed, recording and timed as
    ``hooks`` asks (plain without hooks)."""
    if hooks is None:
        return PruningRun(config, scales, depth, sublayers=sublayers)
    return PruningRun(config, scales, depth, sublayers=sublayers, record=hooks.record_kept,
                      timing=hooks.pruning_seconds is not None, on_select=hooks.on_select)


def close_pruning_run(run: PruningRun, hooks: SamplingHooks | None) -> None:
    """Release the run's caches and add its pruning seconds to ``hooks.pruning_seconds``."""
    run.close()
    if hooks is not None and hooks.pruning_seconds is not None:
        for part, seconds in run.seconds.items():
            hooks.pruning_seconds[part] = hooks.pruning_seconds.get(part, 0.0) + seconds


def draw_tokens(logits: torch.Tensor, generator: torch.Generator, scale: int,
                hooks: SamplingHooks | None) -> torch.Tensor:
    """One ``torch.multinomial`` over softmax(logits) (B, N, V) -> (B, N) int64, drawn on the generator's device.

    The single call per scale is the official RNG order. With ``hooks.on_draw`` the observer sees the
    draw and may replace its outcome.
    """
    state = generator.get_state() if hooks is not None and hooks.on_draw is not None else None
    probs = logits.softmax(dim=-1).flatten(0, 1)  # (B*N, V)
    if probs.device != generator.device:
        probs = probs.to(generator.device)  # reproducible draws from a CPU generator on any device
    drawn = torch.multinomial(probs, 1, replacement=True, generator=generator).view(logits.shape[:-1])
    drawn = drawn.to(logits.device)
    if state is not None:
        forced = hooks.on_draw(scale, logits, drawn, state)
        if forced is not None:
            drawn = forced.to(device=logits.device, dtype=torch.int64).view(drawn.shape)
    return drawn


def per_scale(value: float | Sequence[float], num_scales: int, name: str) -> list[float]:
    """Broadcast a scalar (or check a list) to one finite value per scale."""
    values = [float(value)] * num_scales if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != num_scales:
        raise ConfigError(f"{name} has {len(values)} values but the schedule has {num_scales} scales")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ConfigError(f"{name}[{i}] = {v} is not a finite number")
    return values


def check_sampling_args(batch_size: int, top_k: int, top_p: float, tau: Sequence[float]) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"top_p must be in [0, 1] (0 disables it), got {top_p}")
    for i, t in enumerate(tau):
        if t <= 0:
            raise ConfigError(f"tau[{i}] = {t} must be > 0 (it divides the logits)")


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds (ComfyUI's seed widget goes this far)


def check_seed(seed: int) -> int:
    """The seed as an int in 0..2**64-1, or ConfigError (torch would wrap negatives, fail beyond 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return int(seed)


FLOAT16_HINT = "a text encoder run in float16 can overflow: use bfloat16 or float32"


def check_finite(tensor: torch.Tensor, what: str, hint: str = FLOAT16_HINT) -> None:
    """ConfigError when ``tensor`` holds NaN or Inf, naming ``what`` and the first bad index."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ConfigError(f"{what} contains NaN or Inf (first at index {index}), expected finite values; {hint}")


def check_logits(logits: torch.Tensor, scale: int, dtype: torch.dtype) -> None:
    """ConfigError instead of torch.multinomial's bare error when a scale's logits are not finite."""
    if not bool(torch.isfinite(logits).all()):
        raise ConfigError(
            f"scale {scale}: the model produced NaN or Inf logits (weights in {dtype}); the weights may be corrupt, "
            f"or float16 overflowed: use bfloat16 or float32"
        )


@dataclass
class SampleResult:
    """The outcome of one generation: the latent for the VAE plus everything needed to inspect it."""

    family: str
    latent: torch.Tensor  # family-specific latent handed to the VAE decoder, (B, C, H, W)
    schedule: ScaleSchedule
    pruning: PruningConfig
    executed_scales: list[int]
    scale_seconds: dict[int, float] = field(default_factory=dict)
    kept: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)  # with hooks.record_kept
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # sampled bits / indices per scale

    @property
    def seconds(self) -> float:
        return sum(self.scale_seconds.values())

    def kept_mask(self, scale: int, layer: int | None = None, name: str | None = None) -> torch.Tensor:
        """(B, h, w) share of recorded sub-layers that kept each token at ``scale`` (see PruningRun.kept_mask)."""
        return kept_mask(self.kept, self.schedule.scales, scale, layer, name)


class ScaleTimer:
    """Wall time per scale (synchronising CUDA so the numbers mean something)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[int, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self, scale: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[scale] = time.perf_counter() - self._t0
