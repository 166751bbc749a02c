"""Per-sampling-run pruning state: the narrow interface between a model family and FastVAR.

A sampler creates one :class:`PruningRun` per generation, calls :meth:`PruningRun.begin_scale` at every
executed scale, and every transformer sub-layer (attention, cross-attention, FFN) routes its residual
branch through :meth:`PruningRun.add_sublayer`. The run owns the restore cache; it is dropped when the run
is closed (end of sampling, error or interrupt), unlike the official code, which keeps it across
generations and can silently reuse another image's features.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError, InternalError
from .config import PruningConfig
from .tokens import add_restored_, gather_tokens, pivotal_scores, top_tokens

# branch(x, idx) -> output: x is the branch input for the tokens that go through, idx their indices in
# the scale's row-major token map (None when every token goes through, in order). The output is a new
# tensor and x is left as it is: the residual stream is updated in place afterwards and the output may
# be kept as the restore cache.
Branch = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

# on_select(scale, layer, sublayer, scores, kept) -> kept or None: called at every pruned sub-layer with
# the pivotal scores (B, L) float32 and the kept indices (B, K); a returned (B, K) index tensor replaces
# the selection (teacher forcing on a reference run, see docs/parity.md).
SelectObserver = Callable[[int, int, str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class PruningRun:
    """FastVAR cached token pruning for one generation; ``config`` is a validated plan (families.resolve_pruning)."""

    def __init__(
        self,
        config: PruningConfig | None,
        scales: Sequence[tuple[int, int]],
        depth: int,
        *,
        sublayers: Sequence[str],
        record: bool = False,
        timing: bool = False,
        on_select: SelectObserver | None = None,
    ) -> None:
        self.config = config if config is not None else PruningConfig(name="off")
        self.scales = [tuple(s) for s in scales]
        self.depth = depth
        self.sublayers = tuple(sublayers)  # the names a layer routes through add_sublayer, in order
        self.record = record
        self.on_select = on_select
        self.kept: dict[tuple[int, int, str], torch.Tensor] = {}  # (scale, layer, sublayer) -> (B, K) int32
        # timing=True: wall seconds of pruned sub-layers, split into token selection, the branch on the
        # kept tokens and restoration (CUDA is synchronised around each part, so only for measurements)
        self.timing = timing
        self.seconds = {"select": 0.0, "branch": 0.0, "restore": 0.0}
        self._cache: dict[tuple[int, str], torch.Tensor] = {}  # (layer, sublayer) -> a slot of _cache_block
        self._cache_block: torch.Tensor | None = None
        self._slots = {key: i for i, key in enumerate((layer, name) for layer in range(depth)
                                                      if self.config.prunes_layer(layer) for name in self.sublayers)}
        self._scale = -1
        self._keep = 0

    # ----- scale bookkeeping -----
    def begin_scale(self, scale: int) -> None:
        """Announce the scale step that the next sub-layer calls belong to."""
        if self.config.skips(scale):
            raise InternalError(f"scale {scale} is configured to be skipped; the sampler must not run it")
        self._scale = scale
        h, w = self.scales[scale]
        self._keep = self.config.kept_tokens(scale, h * w) if self.config.drop_ratio(scale) > 0 else h * w

    def is_skipped(self, scale: int) -> bool:
        return self.config.skips(scale)

    @property
    def prunes_now(self) -> bool:
        """Whether the current scale drops any token."""
        h, w = self.scales[self._scale]
        return self._keep < h * w

    def prunes(self, layer: int) -> bool:
        return self.prunes_now and self.config.prunes_layer(layer)

    def forwarded(self, scale: int, layer: int, num_tokens: int) -> int:
        """Tokens of an executed ``scale`` (``num_tokens`` in all) that go through ``layer``'s sub-layers."""
        if 0 < self.config.drop_ratio(scale) < 1 and self.config.prunes_layer(layer):
            return self.config.kept_tokens(scale, num_tokens)
        return num_tokens

    def kv_keep(self, num_tokens: int) -> int:
        """Of the current scale's ``num_tokens`` self-attention tokens, how many stay in the KV cache."""
        return self.config.kv_kept(self._scale, num_tokens)

    def kv_capacity(self, layer: int, tokens: Sequence[int], stored: Sequence[int]) -> int:
        """KV-cache slots ``layer`` needs when the scales ``stored`` (with ``tokens[s]`` tokens) keep keys.

        Pruned layers keep only their kept tokens, a KV budget fewer still; while a budgeted scale runs,
        all its keys sit in the cache for a moment, so the capacity covers that too.
        """
        held, need = 0, 0
        for scale in stored:
            n = self.forwarded(scale, layer, tokens[scale])
            need = max(need, held + n)
            held += self.config.kv_kept(scale, n)
        return need

    def kv_capacities(self, tokens: Sequence[int], executed: Sequence[int]) -> list[int]:
        """KV-cache slots per layer for a run of the ``executed`` scales: every layer holds the keys of all
        but the last; the first layer also has room for the last scale's own keys, so it attends to them
        without a copy (the next layers' copies fit where the released buffers were, KVBuffer.extend)."""
        stored, final = list(executed[:-1]), list(executed)
        return [self.kv_capacity(layer, tokens, final if layer == 0 else stored) for layer in range(self.depth)]

    # ----- the hook every sub-layer goes through -----
    def add_sublayer(self, layer: int, name: str, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Add a residual branch's output to x (B, L, C) in place, with FastVAR, and return x.

        Unpruned, every token goes through ``branch``; at the cache scale its output is kept for later
        scales. Pruned, only the pivotal tokens go through and the others get the cached output resized
        to this scale, added straight into x (no full-size output tensor is made).
        """
        if not self.prunes(layer):
            out = branch(x, None)
            if self._scale == self.config.cache_scale and self.config.prunes_layer(layer):
                self._keep_output(layer, name, out)
            return x.add_(out)
        t0 = self._clock(x)
        cached = self._cache.get((layer, name))
        if cached is not None and cached.shape[0] > x.shape[0] and not self.config.guides(self._scale):
            cached = cached[: x.shape[0]]  # past the CFG cut-off only the leading, conditional rows run
        if cached is None or cached.shape[0] != x.shape[0]:
            found = "nothing" if cached is None else f"{cached.shape[0]} rows"
            raise InternalError(  # PruningConfig.validate puts the cache scale before every pruned scale
                f"FastVAR restore cache for layer {layer} {name} at scale {self.config.cache_scale} holds {found}, "
                f"but scale {self._scale} needs {x.shape[0]} rows: the cache scale must run before pruned scales "
                f"with the same batch"
            )
        scores = pivotal_scores(x)  # (B, L)
        idx = top_tokens(scores, self._keep)  # (B, K)
        if self.on_select is not None:
            forced = self.on_select(self._scale, layer, name, scores, idx)
            if forced is not None:
                idx = forced.to(device=idx.device, dtype=idx.dtype)
        if self.record:
            self.kept[(self._scale, layer, name)] = idx.to("cpu", torch.int32)
        kept = gather_tokens(x, idx)
        t1 = self._clock(x)
        out_kept = branch(kept, idx)  # (B, K, C)
        t2 = self._clock(x)
        add_restored_(x, kept, cached, self.scales[self.config.cache_scale], self.scales[self._scale], out_kept, idx)
        if self.timing:
            t3 = self._clock(x)
            self.seconds["select"] += t1 - t0
            self.seconds["branch"] += t2 - t1
            self.seconds["restore"] += t3 - t2
        return x

    def _keep_output(self, layer: int, name: str, out: torch.Tensor) -> None:
        """Copy a cache-scale output into its slot of the restore cache, one block for the whole run.

        One allocation instead of an output tensor per sub-layer kept alive among the step's temporaries:
        those pinned the allocator's freed memory around them (a CPU heap is not returned past a live block;
        measured in docs/fastvar.md §3.6).
        """
        slot = self._slots.get((layer, name))
        if slot is None:
            raise InternalError(f"sub-layer {name!r} of layer {layer} is not one of this run's pruned sub-layers "
                                f"{self.sublayers}: the sampler must name the sub-layers its blocks route")
        if self._cache_block is None:
            self._cache_block = out.new_empty((len(self._slots), *out.shape))
        block = self._cache_block[slot]
        if block.shape != out.shape or block.dtype != out.dtype:
            raise InternalError(f"restore cache slots hold {tuple(block.shape)} {block.dtype}, but layer {layer} "
                                f"{name} gave {tuple(out.shape)} {out.dtype}: every sub-layer output must match")
        self._cache[(layer, name)] = block.copy_(out)

    def _clock(self, x: torch.Tensor) -> float:
        if not self.timing:
            return 0.0
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    @property
    def overhead_share(self) -> float:
        """Selection + restoration as a share of the pruned sub-layers' time (needs ``timing=True``)."""
        total = sum(self.seconds.values())
        return (self.seconds["select"] + self.seconds["restore"]) / total if total else 0.0

    # ----- lifetime -----
    def close(self) -> None:
        """Release the restore cache (kept-index records stay for inspection)."""
        self._cache.clear()
        self._cache_block = None
        self._scale = -1

    def __enter__(self) -> PruningRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def kept_mask(self, scale: int, layer: int | None = None, name: str | None = None) -> torch.Tensor:
        """See :func:`kept_mask`."""
        return kept_mask(self.kept, self.scales, scale, layer, name)


def kept_mask(
    kept: dict[tuple[int, int, str], torch.Tensor],
    scales: Sequence[tuple[int, int]],
    scale: int,
    layer: int | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """(B, h, w) float in [0, 1]: the share of recorded sub-layers of ``scale`` that kept each token.

    With ``layer`` and ``name`` given, the exact kept/pruned mask of that sub-layer (1 = kept).
    """
    h, w = scales[scale]
    records = [
        v for (s, lyr, nm), v in kept.items()
        if s == scale and (layer is None or lyr == layer) and (name is None or nm == name)
    ]
    if not records:
        raise ConfigError(f"no kept-token record for scale {scale}: it did not prune, or recording was off")
    b = records[0].shape[0]
    mask = torch.zeros(b, h * w)
    for idx in records:
        mask.scatter_add_(1, idx.long(), torch.ones(idx.shape))
    return (mask / len(records)).view(b, h, w)
