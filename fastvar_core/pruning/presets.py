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

from dataclasses import replace

from ..errors import ConfigError
from .config import PruningConfig

PRESET_NAMES = ("off", "paper", "2k")  # FastVAR as published
ACCELERATED_PRESETS = ("fast",)  # FastVAR plus the optional accelerations beyond the paper
FAST_KV_DROP = 0.5  # share of a scale's keys/values left out of the KV cache


def _family(family):
    from ..families import get_family  # the family tables sit above the pruning engine

    return get_family(family)


def preset_layers(family, depth: int) -> tuple[int, int]:
    """Layer range [start, stop) that a family's presets prune for a model of this depth."""
    return _family(family).preset_layers(depth)


def make_preset(family, name: str, num_scales: int, depth: int) -> PruningConfig:
    """Build a named preset for a schedule of ``num_scales`` scales and a model of ``depth`` layers.

    ``family`` is a Family or its name; its ``preset_tails``, ``scales_1024`` and ``preset_layers`` hold
    the per-family numbers.
    """
    fam = _family(family)
    if name not in PRESET_NAMES + ACCELERATED_PRESETS:
        raise ConfigError(
            f"pruning preset {name!r} is unknown; allowed: {list(PRESET_NAMES)} (FastVAR as published) "
            f"or {list(ACCELERATED_PRESETS)} (with the accelerations beyond the paper)"
        )
    if name == "fast":
        base = "2k" if num_scales > fam.scales_1024 else "paper"
        fast = accelerate(make_preset(family, base, num_scales, depth), num_scales)
        fast.name = "fast"
        return fast
    if name == "off":
        return PruningConfig(name="off")
    tail, cache_offset = fam.preset_tails[name]
    cache = num_scales - cache_offset
    ratios = {num_scales - k: r for k, r in tail.items() if num_scales - k > max(cache, 0)}
    if cache < 1 or not ratios:
        return PruningConfig(name=name)  # too few scales: nothing worth pruning
    return PruningConfig(ratios=ratios, cache_scale=cache, layers=fam.preset_layers(depth), name=name)


def accelerate(config: PruningConfig, num_scales: int) -> PruningConfig:
    """``config`` plus the accelerations beyond the paper, placed relative to its last executed scale.

    The last two executed scales drop the unconditional CFG branch (``cfg_cutoff``); the two executed
    scales before the last one leave half of their keys/values out of the KV cache (``kv_ratios``).
    Schedules with fewer than four executed scales are returned unchanged.
    """
    executed = [s for s in range(num_scales) if not config.skips(s)]
    if len(executed) < 4:
        return replace(config)
    return replace(config, name=f"{config.name}+fast", cfg_cutoff=executed[-2],
                   kv_ratios={executed[-3]: FAST_KV_DROP, executed[-2]: FAST_KV_DROP})
