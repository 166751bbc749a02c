"""FastVAR cached token pruning, model agnostic: config, presets, token selection/restoration, run state."""

from .config import PruningConfig
from .presets import ACCELERATED_PRESETS, PRESET_NAMES, PresetTable, accelerate, make_preset
from .run import PruningRun
from .tokens import add_restored_, gather_tokens, pivotal_scores, resize_token_map, select_pivotal

__all__ = [
    "ACCELERATED_PRESETS",
    "PRESET_NAMES",
    "PresetTable",
    "PruningConfig",
    "PruningRun",
    "accelerate",
    "add_restored_",
    "gather_tokens",
    "make_preset",
    "pivotal_scores",
    "resize_token_map",
    "select_pivotal",
]
