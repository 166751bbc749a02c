"""A schedule-independent pruning request, resolved to a PruningConfig once model and schedule are known.

ComfyUI's FastVAR Pruning node (and the CLI) describe what they want before the sampler knows the
image size: a preset name, a target speedup, or per-scale ratios counted from the last scale. It sits
above the pruning engine and the cost model (a speed target is solved with it); neither imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .cost import ArchSpec, predicted_speedup
from .errors import ConfigError
from .pruning import PruningConfig, accelerate, make_preset, preset_layers

MODES = ("off", "paper", "2k", "speed target", "custom", "fast")
# How strongly each late scale is pruned relative to the last one when aiming at a speed target: the
# paper's sensitivity study finds the latest scales the most tolerant.
_TARGET_WEIGHTS = (1.0, 0.85, 0.7, 0.55)
_TARGET_CAP = 0.9


@dataclass(frozen=True)
class PruningSpec:
    """What the user asked for. ``tail_ratios[k]`` is the drop ratio of the scale k+1 from the end."""

    mode: str = "paper"
    tail_ratios: tuple[float, ...] = ()
    cache_from_end: int = 5
    layer_start: int | None = None  # None: the family's preset range
    layer_stop: int | None = None
    speed_target: float = 2.0
    accelerate: bool = False  # add the accelerations beyond the paper (CFG cut-off, KV budget) to the mode

    def check(self) -> None:
        """Validation that needs no schedule (the node's VALIDATE_INPUTS)."""
        if self.mode not in MODES:
            raise ConfigError(f"pruning mode {self.mode!r} is unknown; allowed: {list(MODES)}")
        for k, r in enumerate(self.tail_ratios):
            if not 0.0 <= r <= 1.0:
                raise ConfigError(f"pruning ratio of scale {k + 1} from the end = {r} is outside [0, 1]")
        if self.mode == "custom":
            pruned = [k + 1 for k, r in enumerate(self.tail_ratios) if r > 0]
            if pruned and self.cache_from_end <= max(pruned):
                raise ConfigError(
                    f"cache scale {self.cache_from_end} from the end must come before the earliest pruned scale "
                    f"({max(pruned)} from the end); allowed: cache_from_end > {max(pruned)}"
                )
        if self.layer_start is not None and self.layer_stop is not None and self.layer_start > self.layer_stop:
            raise ConfigError(f"pruned layers start {self.layer_start} is after stop {self.layer_stop}")
        if self.mode == "speed target" and not 1.0 <= self.speed_target <= 20.0:
            raise ConfigError(f"speed target {self.speed_target} is outside [1, 20]")

    def resolve(self, family: str, scales: list[tuple[int, int]], depth: int, arch: ArchSpec | None = None,
                *, can_skip_last: bool = True) -> PruningConfig:
        """The concrete, validated config for a schedule and model."""
        self.check()
        n = len(scales)
        if self.mode in ("off", "paper", "2k", "fast"):
            config = make_preset(family, self.mode, n, depth)
        elif self.mode == "custom":
            if self.cache_from_end > n:
                raise ConfigError(f"cache_from_end = {self.cache_from_end}, but this schedule has only {n} scales; "
                                  f"allowed: 2..{n}")
            ratios = {n - 1 - k: r for k, r in enumerate(self.tail_ratios) if r > 0 and n - 1 - k > 0}
            cache = n - self.cache_from_end if ratios else None
            config = PruningConfig(ratios, cache, self._layers(family, depth), name="custom")
        else:
            if arch is None:
                raise ConfigError("a speed target needs the model's architecture to be resolved")
            config = self._solve_target(family, scales, depth, arch)
        if config.layers != (0, 0) and (self.layer_start is not None or self.layer_stop is not None):
            config = replace(config, layers=self._layers(family, depth))
        if self.accelerate:
            config = accelerate(config, n)
        return config.validate(n, depth, can_skip_last=can_skip_last)

    def _layers(self, family: str, depth: int) -> tuple[int, int]:
        start, stop = preset_layers(family, depth)
        start = start if self.layer_start is None else self.layer_start
        stop = stop if self.layer_stop is None else min(self.layer_stop, depth)
        return (start, stop)

    def _solve_target(self, family, scales, depth, arch) -> PruningConfig:
        n = len(scales)
        tail = [k for k in range(len(_TARGET_WEIGHTS)) if n - 1 - k > 1]
        cache = n - 1 - len(tail)
        best = PruningConfig(name="speed target")
        for step in range(1, 21):  # aggressiveness 5 % .. 100 %
            level = step / 20
            ratios = {n - 1 - k: round(min(_TARGET_CAP, level * _TARGET_WEIGHTS[k]) * 20) / 20 for k in tail}
            ratios = {s: r for s, r in ratios.items() if r > 0}
            best = PruningConfig(ratios, cache, self._layers(family, depth), name="speed target")
            if predicted_speedup(arch, scales, best) >= self.speed_target:
                break
        return best
