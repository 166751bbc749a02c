"""What a user asks of FastVAR before the image size is known, and its resolution to a PruningConfig.

A :class:`PruningRequest` (from the FastVAR Pruning node, the CLI or a library user) names a mode and its
knobs. It is checked completely when it is built; :meth:`PruningRequest.resolve` turns it into the plan
for one schedule and model (a validated PruningConfig). It sits above the pruning engine and the cost
model (a speed target is solved with it); neither imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .cost import ArchSpec, predicted_speedup
from .errors import ConfigError
from .pruning import ACCELERATED_PRESETS, PRESET_NAMES, PruningConfig, accelerate, make_preset

MODES = (*PRESET_NAMES, "speed target", "custom", *ACCELERATED_PRESETS)
SPEED_TARGET_RANGE = (1.0, 20.0)
# How strongly each late scale is pruned relative to the last one when aiming at a speed target (the
# paper's sensitivity study finds the latest scales the most tolerant), and the cap below skipping.
_TARGET_WEIGHTS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)
_TARGET_CAP = 0.9


@dataclass(frozen=True)
class PruningRequest:
    """A pruning request, checked when built (ConfigError). ``tail_drop_ratios[k]``: scale k+1 from the end.

    ``layer_start``/``layer_stop`` (half-open, None: the family's preset range) override the pruned layers;
    ``accelerate`` adds the accelerations beyond the paper (CFG cut-off, KV budget) to the mode.
    """

    mode: str = "paper"
    tail_drop_ratios: tuple[float, ...] = ()
    cache_from_end: int = 5
    layer_start: int | None = None
    layer_stop: int | None = None
    speed_target: float = 2.0
    accelerate: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"pruning mode {self.mode!r} is unknown; allowed: {list(MODES)}")
        for k, r in enumerate(self.tail_drop_ratios):
            if not 0.0 <= r <= 1.0:
                raise ConfigError(f"drop ratio of scale {k + 1} from the end = {r} is outside [0, 1]")
        if self.mode == "custom":
            pruned = [k + 1 for k, r in enumerate(self.tail_drop_ratios) if r > 0]
            if pruned and self.cache_from_end <= max(pruned):
                raise ConfigError(
                    f"cache scale {self.cache_from_end} from the end must come before the earliest pruned scale "
                    f"({max(pruned)} from the end); allowed: cache_from_end > {max(pruned)}"
                )
        if self.layer_start is not None and self.layer_start < 0:
            raise ConfigError(f"the first pruned layer ({self.layer_start}) is negative; layers count from 0")
        if self.layer_stop is not None and self.layer_stop < 1:
            raise ConfigError(f"the last pruned layer ({self.layer_stop - 1}) is negative; layers count from 0")
        if self.layer_start is not None and self.layer_stop is not None and self.layer_start >= self.layer_stop:
            raise ConfigError(f"the first pruned layer ({self.layer_start}) comes after the last pruned layer "
                              f"({self.layer_stop - 1}): choose a first layer at most the last one")
        low, high = SPEED_TARGET_RANGE
        if self.mode == "speed target" and not low <= self.speed_target <= high:
            raise ConfigError(f"speed target {self.speed_target} is outside [{low:g}, {high:g}]")

    def resolve(self, family, scales: list[tuple[int, int]], arch: ArchSpec) -> PruningConfig:
        """The validated plan for a schedule's ``scales`` and a model of shape ``arch`` of ``family``.

        ``family`` supplies the preset table (``presets``) and the rules ``can_skip`` and ``min_cache_scale``.
        Only the checks that need the schedule and model run here.
        """
        n, depth = len(scales), arch.depth
        if self.mode in PRESET_NAMES + ACCELERATED_PRESETS:
            config = make_preset(family.presets, self.mode, n, depth)
        elif self.mode == "custom":
            if self.cache_from_end > n:
                raise ConfigError(f"cache_from_end = {self.cache_from_end}, but this schedule has only {n} scales; "
                                  f"allowed: 2..{n}")
            drop = {n - 1 - k: r for k, r in enumerate(self.tail_drop_ratios) if r > 0 and n - 1 - k > 0}
            cache = n - self.cache_from_end if drop else None
            config = PruningConfig(drop, cache, self._layers(family, depth), name="custom")
        else:
            config = self._solve_target(family, scales, arch)
        if config.layers != (0, 0) and (self.layer_start is not None or self.layer_stop is not None):
            config = replace(config, layers=self._layers(family, depth))
        if self.accelerate:
            config = accelerate(config, n)
        return config.validate(n, depth, can_skip=family.can_skip, min_cache_scale=family.min_cache_scale)

    def _layers(self, family, depth: int) -> tuple[int, int]:
        for which, layer in (("first", self.layer_start), ("last", None if self.layer_stop is None else self.layer_stop - 1)):
            if layer is not None and layer >= depth:
                raise ConfigError(f"the {which} pruned layer ({layer}) does not exist: this model has layers 0 to "
                                  f"{depth - 1}; lower it, or use -1 for the model's default")
        start, stop = family.presets.layers(depth)
        start = start if self.layer_start is None else self.layer_start
        stop = stop if self.layer_stop is None else self.layer_stop
        if start >= stop:
            raise ConfigError(f"the first pruned layer ({start}) comes after the last pruned layer ({stop - 1}) "
                              f"of this model's default range: choose a first layer at most {stop - 1}, or set "
                              f"the last layer too")
        return (start, stop)

    def _solve_target(self, family, scales, arch) -> PruningConfig:
        """The lightest plan the cost model predicts to reach the target, searched over the space of the
        family's presets: the presets themselves and, as in them, up to as many late scales pruned (5 %
        steps, the latest strongest) and skipped as the longest preset. Out of reach: the fastest of
        them, with a ``note`` saying what it reaches and why no more."""
        n, layers = len(scales), self._layers(family, arch.depth)
        tails = [tail for tail, _ in family.presets.tails.values()]
        longest = max((len(t) for t in tails), default=0)
        skips = max((sum(r >= 1 for r in t.values()) for t in tails), default=0) if family.can_skip else 0
        longest = min(longest, len(_TARGET_WEIGHTS), n - 1 - max(1, family.min_cache_scale))
        found: dict[tuple, PruningConfig] = {}
        for name in family.presets.tails:
            preset = make_preset(family.presets, name, n, arch.depth)
            if not preset.is_off:
                found[(tuple(sorted(preset.drop_ratios.items())), preset.cache_scale)] = replace(preset, layers=layers)
        for length in range(1, longest + 1):
            for step in range(1, 81):  # strength 5 % .. 400 %: every ratio up to its cap
                drop = {}
                for k in range(length):
                    r = min(1.0, round(step / 20 * _TARGET_WEIGHTS[k] * 20) / 20)
                    drop[n - 1 - k] = r if r >= 1.0 and k < skips else min(r, _TARGET_CAP)
                drop = {s: r for s, r in drop.items() if r > 0}
                if drop:
                    cache = n - 1 - length
                    found[(tuple(sorted(drop.items())), cache)] = PruningConfig(drop, cache, layers)
        plans = sorted(((predicted_speedup(arch, scales, c), c) for c in found.values()), key=lambda p: p[0])
        if not plans:
            return PruningConfig(name="speed target", note=f"this schedule has too few scales ({n}) to prune")
        for speedup, plan in plans:
            if speedup >= self.speed_target:
                return replace(plan, name="speed target")
        speedup, plan = plans[-1]
        limits = f"at most {_TARGET_CAP:.0%} of their tokens" + (
            f", up to {skips} of them skipped" if skips else "; this model cannot skip scales")
        return replace(plan, name="speed target", note=(
            f"speed target {self.speed_target:g}x is out of reach: reached {speedup:.2f}x (predicted from the "
            f"model's operations), the most within the presets' limits: only the last {longest} scales pruned "
            f"({limits}), in layers {layers[0]} to {layers[1] - 1}; "
            f"the earlier scales and other layers always run in full"))
