"""FastVAR cached token pruning, model agnostic: config, presets, token selection/restoration, run state."""

from .config import PruningConfig
from .presets import PRESET_NAMES, make_preset, preset_layers
from .run import PruningRun
from .tokens import gather_tokens, pivotal_scores, resize_token_map, restore_tokens, select_pivotal

__all__ = [
    "PRESET_NAMES",
    "PruningConfig",
    "PruningRun",
    "gather_tokens",
    "make_preset",
    "pivotal_scores",
    "preset_layers",
    "resize_token_map",
    "restore_tokens",
    "select_pivotal",
]

from .spec import MODES, PruningSpec  # noqa: E402

__all__ += ["MODES", "PruningSpec"]
