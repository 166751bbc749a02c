"""Named pruning presets for each model family, applied to any schedule by scale index from the end.

The official FastVAR code keys its rules on token-map widths (Infinity: 32/40 pruned, 48/64 skipped;
HART: sides 48/64), which only matches the square 1024 px schedules. Here the same choice is
expressed relative to the last scale, so every aspect ratio and pixel budget gets the same treatment:

Infinity ``paper``  (official 1:1 1M: 32->0.4, 40->0.5, skip 48 and 64, cache 24, layers 3..27)
    scale S-4: drop 40 %, S-3: drop 50 %, S-2 and S-1: skipped; cache at S-5;
    layers 3 .. min(D, 28)-1 for D <= 32 (the official fixed range, clipped) else 3 .. D-5.
Infinity ``2k``  (zero-shot 2K schedule, 15 scales; our own choice, measured by the bench)
    S-6: 40 %, S-5: 50 %, S-4: 50 %, S-3: 75 %, S-2: 75 %, S-1: skipped; cache at S-7; layers as ``paper``.
HART ``paper``  (official: 48->0.5, 64->0.75, cache 36, all layers)
    S-2: drop 50 %, S-1: drop 75 %; cache at S-3; every layer.
HART ``2k``  is ``paper`` for the extended schedule (the appended scale drops 75 %, S-2 and S-3 50 %).

Schedules too short for a preset's tail (e.g. Infinity 0.06M) get only the entries that fit after a
cache scale of at least index 1.

``fast`` (beyond the paper, both families) is ``paper`` -- or ``2k`` on a schedule longer than the
family's 1024 px one -- plus the two optional accelerations of :func:`accelerate`: the last two executed
scales run without the unconditional CFG branch (as SkipVAR and StageVAR do), and the two executed
scales before the last keep only half of their keys/values for later scales (a KV budget for late
scales, as ScaleKV and HACK do). Both trade some fidelity to the guided, full-cache output for speed
and memory; ``off``, ``paper`` and ``2k`` never use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import ConfigError
from .config import PruningConfig

PRESET_NAMES = ("off", "paper", "2k")  # FastVAR as published
ACCELERATED_PRESETS = ("fast",)  # FastVAR plus the optional accelerations beyond the paper
FAST_KV_DROP = 0.5  # share of a scale's keys/values left out of the KV cache


@dataclass(frozen=True)
class PresetTable:
    """One family's preset numbers, supplied by the family (``Family.presets``).

    ``tails[name]`` is ({scale offset from the end: drop ratio}, cache offset from the end); ``scales_1024``
    is the length of the family's 1024 px schedule (``fast`` switches to ``2k`` above it); ``layers(depth)``
    is the layer range [start, stop) the presets prune.
    """

    scales_1024: int
    tails: dict[str, tuple[dict[int, float], int]]
    layers: Callable[[int], tuple[int, int]]


def make_preset(table: PresetTable, name: str, num_scales: int, depth: int) -> PruningConfig:
    """The named preset of a family's ``table`` for a schedule of ``num_scales`` scales and ``depth`` layers."""
    if name not in PRESET_NAMES + ACCELERATED_PRESETS:
        raise ConfigError(
            f"pruning preset {name!r} is unknown; allowed: {list(PRESET_NAMES)} (FastVAR as published) "
            f"or {list(ACCELERATED_PRESETS)} (with the accelerations beyond the paper)"
        )
    if name == "fast":
        base = "2k" if num_scales > table.scales_1024 else "paper"
        fast = accelerate(make_preset(table, base, num_scales, depth), num_scales)
        fast.name = "fast"
        return fast
    if name == "off":
        return PruningConfig(name="off")
    tail, cache_offset = table.tails[name]
    cache = num_scales - cache_offset
    drop_ratios = {num_scales - k: r for k, r in tail.items() if num_scales - k > max(cache, 0)}
    if cache < 1 or not drop_ratios:
        return PruningConfig(name=name)  # too few scales: nothing worth pruning
    return PruningConfig(drop_ratios=drop_ratios, cache_scale=cache, layers=table.layers(depth), name=name)


def accelerate(config: PruningConfig, num_scales: int) -> PruningConfig:
    """``config`` plus the accelerations beyond the paper, placed relative to its last executed scale.

    The last two executed scales drop the unconditional CFG branch (``cfg_cutoff``); the two executed
    scales before the last one leave half of their keys/values out of the KV cache (``kv_drop_ratios``).
    Schedules with fewer than four executed scales are returned unchanged.
    """
    executed = [s for s in range(num_scales) if not config.skips(s)]
    if len(executed) < 4:
        return replace(config)
    return replace(config, name=f"{config.name}+fast", cfg_cutoff=executed[-2],
                   kv_drop_ratios={executed[-3]: FAST_KV_DROP, executed[-2]: FAST_KV_DROP})
