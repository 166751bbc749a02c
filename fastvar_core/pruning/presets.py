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
"""

from __future__ import annotations

from ..errors import ConfigError
from .config import PruningConfig

FAMILIES = ("infinity", "hart")
PRESET_NAMES = ("off", "paper", "2k")

# (offset from the end -> ratio), cache offset from the end
_TAILS: dict[tuple[str, str], tuple[dict[int, float], int]] = {
    ("infinity", "paper"): ({4: 0.4, 3: 0.5, 2: 1.0, 1: 1.0}, 5),
    ("infinity", "2k"): ({6: 0.4, 5: 0.5, 4: 0.5, 3: 0.75, 2: 0.75, 1: 1.0}, 7),
    ("hart", "paper"): ({2: 0.5, 1: 0.75}, 3),
    ("hart", "2k"): ({3: 0.5, 2: 0.5, 1: 0.75}, 4),
}


def preset_layers(family: str, depth: int) -> tuple[int, int]:
    """Layer range [start, stop) that a family's presets prune for a model of this depth."""
    if family == "hart":
        return (0, depth)
    if depth <= 32:
        return (min(3, depth), max(min(3, depth), min(depth, 28)))
    return (3, depth - 4)


def make_preset(family: str, name: str, num_scales: int, depth: int) -> PruningConfig:
    """Build a named preset for a schedule of ``num_scales`` scales and a model of ``depth`` layers."""
    if family not in FAMILIES:
        raise ConfigError(f"model family {family!r} is unknown; allowed: {list(FAMILIES)}")
    if name not in PRESET_NAMES:
        raise ConfigError(f"pruning preset {name!r} is unknown; allowed: {list(PRESET_NAMES)}")
    if name == "off":
        return PruningConfig(name="off")
    tail, cache_offset = _TAILS[(family, name)]
    cache = num_scales - cache_offset
    ratios = {num_scales - k: r for k, r in tail.items() if num_scales - k > max(cache, 0)}
    if cache < 1 or not ratios:
        return PruningConfig(name=name)  # too few scales: nothing worth pruning
    return PruningConfig(ratios=ratios, cache_scale=cache, layers=preset_layers(family, depth), name=name)
