"""The FastVAR pruning configuration: plain data with a JSON round-trip and explicit validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class PruningConfig:
    """Which scale steps prune how many tokens, where the restore cache comes from, which layers prune.

    ``ratios`` maps a scale index to the fraction of tokens dropped in every pruned sub-layer:
    ``floor(L * ratio)`` tokens are dropped, ``L - floor(L * ratio)`` go through. ``1.0`` skips the scale
    step entirely (no forward pass, no sampling; the final latent is then the accumulated codes
    interpolated to the final size, as the official Infinity code does).
    ``cache_scale`` is the scale whose sub-layer outputs refill the pruned slots (FastVAR's cached
    step). ``layers`` is the half-open range ``[start, stop)`` of transformer layers that prune.
    """

    ratios: dict[int, float] = field(default_factory=dict)
    cache_scale: int | None = None
    layers: tuple[int, int] = (0, 0)
    name: str = "custom"

    def __post_init__(self) -> None:
        self.ratios = {int(k): float(v) for k, v in self.ratios.items()}
        self.layers = (int(self.layers[0]), int(self.layers[1]))
        if self.cache_scale is not None:
            self.cache_scale = int(self.cache_scale)

    # ----- queries used by samplers and the engine -----
    @property
    def is_off(self) -> bool:
        return not any(r > 0 for r in self.ratios.values())

    def ratio(self, scale: int) -> float:
        return self.ratios.get(scale, 0.0)

    def skips(self, scale: int) -> bool:
        return self.ratio(scale) >= 1.0

    def kept_tokens(self, scale: int, num_tokens: int) -> int:
        """Tokens that go through a pruned sub-layer: L - floor(L * ratio) (official rounding)."""
        ratio = self.ratio(scale)
        if ratio >= 1.0:
            return 0
        return num_tokens - int(num_tokens * ratio)

    def prunes_layer(self, layer: int) -> bool:
        return self.layers[0] <= layer < self.layers[1]

    @property
    def pruned_scales(self) -> list[int]:
        return sorted(s for s, r in self.ratios.items() if 0 < r < 1)

    @property
    def skipped_scales(self) -> list[int]:
        return sorted(s for s, r in self.ratios.items() if r >= 1)

    # ----- validation -----
    def validate(self, num_scales: int, depth: int, *, can_skip_last: bool = True) -> PruningConfig:
        """Check the config against a schedule length and model depth; return self or raise ConfigError."""
        for scale, ratio in sorted(self.ratios.items()):
            if not 0 <= scale < num_scales:
                raise ConfigError(
                    f"pruning.ratios: scale index {scale} does not exist; this schedule has scales 0..{num_scales - 1}"
                )
            if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
                raise ConfigError(
                    f"pruning.ratios[{scale}] = {ratio!r} is outside [0, 1] (0 keeps every token, 1 skips the scale)"
                )
        if self.ratio(0) >= 1.0:
            raise ConfigError("pruning.ratios[0] = 1.0 would skip the first scale, which every image needs")
        if not can_skip_last and self.skips(num_scales - 1):
            raise ConfigError(
                f"pruning.ratios[{num_scales - 1}] = 1.0 would skip the last scale, which this model family must run"
            )
        start, stop = self.layers
        if not 0 <= start <= stop <= depth:
            raise ConfigError(
                f"pruning.layers = [{start}, {stop}) is outside the model's layers; allowed: 0 <= start <= stop <= {depth}"
            )
        if self.pruned_scales:
            first = min(self.pruned_scales + self.skipped_scales)
            if self.cache_scale is None:
                raise ConfigError(
                    f"pruning.cache_scale is missing: scales {self.pruned_scales} prune tokens and need an earlier "
                    f"scale to restore them from (allowed: 0..{first - 1})"
                )
            if not 0 <= self.cache_scale < first:
                raise ConfigError(
                    f"pruning.cache_scale = {self.cache_scale} must come strictly before the first pruned or skipped "
                    f"scale ({first}); allowed: 0..{first - 1}"
                )
        elif self.cache_scale is not None and not 0 <= self.cache_scale < num_scales:
            raise ConfigError(
                f"pruning.cache_scale = {self.cache_scale} does not exist; this schedule has scales 0..{num_scales - 1}"
            )
        return self

    # ----- serialisation -----
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "ratios": {str(k): v for k, v in sorted(self.ratios.items())},
            "cache_scale": self.cache_scale,
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a pruning config must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"name", "ratios", "cache_scale", "layers"}
        if unknown:
            raise ConfigError(
                f"pruning config has unknown field(s) {sorted(unknown)}; allowed: name, ratios, cache_scale, layers"
            )
        try:
            ratios = {int(k): float(v) for k, v in dict(data.get("ratios", {})).items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pruning.ratios must map scale indices to numbers ({exc})") from None
        layers = data.get("layers", [0, 0])
        if not (isinstance(layers, (list, tuple)) and len(layers) == 2):
            raise ConfigError(f"pruning.layers must be [start, stop], got {layers!r}")
        cache = data.get("cache_scale")
        return cls(ratios=ratios, cache_scale=cache, layers=tuple(layers), name=str(data.get("name", "custom")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"pruning config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


OFF = PruningConfig(name="off")
