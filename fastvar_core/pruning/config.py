"""The FastVAR pruning configuration: plain data with a JSON round-trip and explicit validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class PruningConfig:
    """Which scale steps prune how many tokens, where the restore cache comes from, which layers prune.

    Every ratio here is a drop ratio (docs/fastvar.md §2). ``drop_ratios`` maps a scale index to the fraction
    of tokens dropped in every pruned sub-layer: ``floor(L * drop)`` tokens are dropped,
    ``L - floor(L * drop)`` go through. ``1.0`` skips the scale
    step entirely (no forward pass, no sampling; the final latent is then the accumulated codes
    interpolated to the final size, as the official Infinity code does).
    ``cache_scale`` is the scale whose sub-layer outputs refill the pruned slots (FastVAR's cached
    step). ``layers`` is the half-open range ``[start, stop)`` of transformer layers that prune.

    Two optional accelerations beyond the paper (off unless set; see ``presets.accelerate``):
    ``cfg_cutoff`` is the first scale from which the unconditional classifier-free-guidance branch is
    no longer run (that scale and every later one use the conditional logits only, as with cfg = 1).
    ``kv_drop_ratios`` maps a scale index to the fraction of its keys/values that later scales do not
    attend to (a drop ratio as well): ``floor(L * drop)`` of the scale's L self-attention tokens are left out of the KV cache
    (those farthest from the scale's mean key stay); the scale itself still attends to all of them.
    """

    drop_ratios: dict[int, float] = field(default_factory=dict)
    cache_scale: int | None = None
    layers: tuple[int, int] = (0, 0)
    name: str = "custom"
    cfg_cutoff: int | None = None
    kv_drop_ratios: dict[int, float] = field(default_factory=dict)
    note: str = ""  # for the user: how the plan falls short of what was asked (a speed target out of reach)

    def __post_init__(self) -> None:
        self.drop_ratios = {int(k): float(v) for k, v in self.drop_ratios.items()}
        self.kv_drop_ratios = {int(k): float(v) for k, v in self.kv_drop_ratios.items()}
        self.layers = (int(self.layers[0]), int(self.layers[1]))
        if self.cache_scale is not None:
            self.cache_scale = int(self.cache_scale)
        if self.cfg_cutoff is not None:
            self.cfg_cutoff = int(self.cfg_cutoff)

    # ----- queries used by samplers and the engine -----
    @property
    def is_off(self) -> bool:
        return not any(r > 0 for r in self.drop_ratios.values())

    def drop_ratio(self, scale: int) -> float:
        """The share of ``scale``'s tokens that pruned sub-layers drop (0: none, 1: the scale is skipped)."""
        return self.drop_ratios.get(scale, 0.0)

    def skips(self, scale: int) -> bool:
        return self.drop_ratio(scale) >= 1.0

    def kept_tokens(self, scale: int, num_tokens: int) -> int:
        """Tokens that go through a pruned sub-layer: L - floor(L * drop) (official rounding)."""
        drop = self.drop_ratio(scale)
        if drop >= 1.0:
            return 0
        return num_tokens - int(num_tokens * drop)

    def prunes_layer(self, layer: int) -> bool:
        return self.layers[0] <= layer < self.layers[1]

    def guides(self, scale: int) -> bool:
        """Whether ``scale`` runs the unconditional CFG branch (when the sampler guides at all)."""
        return self.cfg_cutoff is None or scale < self.cfg_cutoff

    def kv_kept(self, scale: int, num_tokens: int) -> int:
        """Of ``num_tokens`` self-attention tokens of ``scale``, how many stay in the KV cache."""
        return num_tokens - int(num_tokens * self.kv_drop_ratios.get(scale, 0.0))

    @property
    def pruned_scales(self) -> list[int]:
        return sorted(s for s, r in self.drop_ratios.items() if 0 < r < 1)

    @property
    def skipped_scales(self) -> list[int]:
        return sorted(s for s, r in self.drop_ratios.items() if r >= 1)

    # ----- validation -----
    def validate(self, num_scales: int, depth: int, *, can_skip: bool = True, min_cache_scale: int = 0) -> PruningConfig:
        """Check the config against a schedule length, a model depth and its family's rules; return self.

        ``can_skip``: the family may skip whole scales (HART may not: every scale feeds the next and the
        last runs its diffusion head). ``min_cache_scale``: the earliest scale that holds a token map (HART: 1,
        its scale 0 runs the text tokens). Raises ConfigError.
        """
        for scale, ratio in sorted(self.drop_ratios.items()):
            if not 0 <= scale < num_scales:
                raise ConfigError(
                    f"pruning.drop_ratios: scale index {scale} does not exist; this schedule has scales 0..{num_scales - 1}"
                )
            if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
                raise ConfigError(
                    f"pruning.drop_ratios[{scale}] = {ratio!r} is outside [0, 1] (0 keeps every token, 1 skips the scale)"
                )
        if self.drop_ratio(0) >= 1.0:
            raise ConfigError("pruning.drop_ratios[0] = 1.0 would skip the first scale, which every image needs")
        if not can_skip and self.skipped_scales:
            raise ConfigError(
                f"pruning.drop_ratios: this model family cannot skip scales {self.skipped_scales} (drop ratio 1.0): "
                f"every scale feeds the next one; use drop ratios < 1"
            )
        start, stop = self.layers
        if start > stop:
            raise ConfigError(f"pruning.layers: the first pruned layer ({start}) comes after the last ({stop - 1}); "
                              f"choose a first layer at most the last one (layers = [first, last + 1])")
        if not 0 <= start <= stop <= depth:
            raise ConfigError(
                f"pruning.layers: pruned layers {start} to {stop - 1} do not fit this model's layers 0 to {depth - 1}; "
                f"choose a first and a last layer inside them (layers = [first, last + 1])"
            )
        if self.cfg_cutoff is not None and not 1 <= self.cfg_cutoff < num_scales:
            raise ConfigError(
                f"pruning.cfg_cutoff = {self.cfg_cutoff} is not a scale index that can stop guidance; "
                f"allowed: 1..{num_scales - 1} (scale 0 always runs both branches), or null for guidance throughout"
            )
        for scale, ratio in sorted(self.kv_drop_ratios.items()):
            if not 0 <= scale < num_scales:
                raise ConfigError(
                    f"pruning.kv_drop_ratios: scale index {scale} does not exist; this schedule has scales 0..{num_scales - 1}"
                )
            if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
                raise ConfigError(
                    f"pruning.kv_drop_ratios[{scale}] = {ratio!r} is outside [0, 1) (the share of the scale's keys/values "
                    f"left out of the KV cache)"
                )
        if self.pruned_scales:
            first = min(self.pruned_scales + self.skipped_scales)
            if self.cache_scale is None:
                raise ConfigError(
                    f"pruning.cache_scale is missing: scales {self.pruned_scales} prune tokens and need an earlier "
                    f"scale to restore them from (allowed: {min_cache_scale}..{first - 1})"
                )
            if not min_cache_scale <= self.cache_scale < first:
                raise ConfigError(
                    f"pruning.cache_scale = {self.cache_scale} must come strictly before the first pruned or skipped "
                    f"scale ({first}); allowed: {min_cache_scale}..{first - 1}"
                    + (f" (scales before {min_cache_scale} hold no token map)" if self.cache_scale < min_cache_scale
                       else "")
                )
        elif self.cache_scale is not None and not 0 <= self.cache_scale < num_scales:
            raise ConfigError(
                f"pruning.cache_scale = {self.cache_scale} does not exist; this schedule has scales 0..{num_scales - 1}"
            )
        return self

    # ----- serialisation -----
    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "drop_ratios": {str(k): v for k, v in sorted(self.drop_ratios.items())},
            "cache_scale": self.cache_scale,
            "layers": list(self.layers),
        }
        if self.cfg_cutoff is not None:  # optional fields only when set: paper configs keep their JSON
            data["cfg_cutoff"] = self.cfg_cutoff
        if self.kv_drop_ratios:
            data["kv_drop_ratios"] = {str(k): v for k, v in sorted(self.kv_drop_ratios.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a pruning config must be a JSON object, got {type(data).__name__}")
        renamed = sorted(k for k in _RENAMED if k in data)
        if renamed:
            raise ConfigError(
                "pruning config uses the old field name(s) " + ", ".join(f"'{k}' (now '{_RENAMED[k]}')" for k in renamed)
                + ": every ratio is a drop ratio, named so"
            )
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ConfigError(
                f"pruning config has unknown field(s) {sorted(unknown)}; allowed: {', '.join(_FIELDS)}"
            )
        drop_ratios = _scale_map(data, "drop_ratios")
        kv_drop_ratios = _scale_map(data, "kv_drop_ratios")
        layers = data.get("layers", [0, 0])
        if not (isinstance(layers, (list, tuple)) and len(layers) == 2):
            raise ConfigError(f"pruning.layers must be [start, stop], got {layers!r}")
        cache = data.get("cache_scale")
        cutoff = data.get("cfg_cutoff")
        if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, int)):
            raise ConfigError(f"pruning.cfg_cutoff must be a scale index or null, got {cutoff!r}")
        return cls(drop_ratios=drop_ratios, cache_scale=cache, layers=tuple(layers), name=str(data.get("name", "custom")),
                   cfg_cutoff=cutoff, kv_drop_ratios=kv_drop_ratios)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"pruning config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


_FIELDS = ("name", "drop_ratios", "cache_scale", "layers", "cfg_cutoff", "kv_drop_ratios")
_RENAMED = {"ratios": "drop_ratios", "kv_ratios": "kv_drop_ratios"}


def _scale_map(data: dict, key: str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in dict(data.get(key) or {}).items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pruning.{key} must map scale indices to numbers ({exc})") from None


OFF = PruningConfig(name="off")
