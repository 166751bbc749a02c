"""Analytic cost model: tokens, FLOPs and KV-cache bytes of one generation, with and without pruning.

Counts multiply-adds as 2 FLOPs and covers the matrix products that dominate (projections, attention
scores and mixing, FFN, output head, HART's residual diffusion head); norms, RoPE and sampling are
ignored. Used by the web UI's schedule chart, the "speed target" preset and the benchmark; :func:`sampling_memory` and
:func:`decode_memory` give the working memory a host (ComfyUI) reserves beside the weights.

Costs are per image and CFG row by default; ``guided=True`` counts both classifier-free-guidance rows
of an image, so that a config's ``cfg_cutoff`` (one row at the late scales) shows in the totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pruning.config import PruningConfig


@dataclass(frozen=True)
class ArchSpec:
    """The shape of a next-scale transformer, as the cost model sees it."""

    depth: int
    width: int
    ffn_hidden: int
    ffn_matrices: int = 2  # 2: fc1/fc2 (GELU); 3: gate/up/down (SwiGLU)
    text_tokens: int = 0  # cross-attention keys per row (0: no cross-attention)
    prefix_tokens: int = 0  # tokens processed before/at scale 0 (HART: the text context)
    head_outputs: int = 64  # logits per token
    token_channels: int = 32  # input width of the word embedding
    last_scale_flops_per_token: float = 0.0  # extra per-token work at the last scale (HART diffusion head)
    dtype_bytes: int = 4
    heads: int = 1  # attention heads (the math kernel holds one score matrix per head)
    last_scale_values_per_token: int = 0  # float32 activations per token of the last scale's extra work
    last_scale_chunk: int = 0  # tokens of the last scale's extra work at once (0: all of them)
    head_chunk: int = 0  # logits the head holds at once where it runs in chunks (HART on the CPU); 0: whole scales
    # Hidden-state-sized tensors per forwarded token alive in a self-attention sub-layer beside the residual stream,
    # in the compute dtype and in float32. HART's Attention.forward: the normalised input, the fused q/k/v output
    # (3), the normalised and rotated q and k (2) and one rotation temporary, all in the compute dtype.
    attention_hidden: int = 7
    attention_float32: int = 0


@dataclass
class ScaleCost:
    """Cost of one scale step (summed over layers; per row of the batch)."""

    scale: int
    hw: tuple[int, int]
    tokens: int
    skipped: bool
    forwarded: list[int]  # tokens through each layer's sub-layers
    flops: dict[str, float] = field(default_factory=dict)  # summed over ``rows``
    rows: int = 1  # CFG rows that ran this scale (2 when guided, 1 after a cfg_cutoff)

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


@dataclass
class CostReport:
    scales: list[ScaleCost]
    kv_cache_bytes: int  # peak self-attention KV cache, per batch row, all layers

    @property
    def total_flops(self) -> float:
        return sum(s.total_flops for s in self.scales)

    def to_dict(self) -> dict:
        return {
            "total_flops": self.total_flops,
            "kv_cache_bytes": self.kv_cache_bytes,
            "scales": [
                {
                    "scale": s.scale,
                    "hw": list(s.hw),
                    "tokens": s.tokens,
                    "skipped": s.skipped,
                    "forwarded_mean": sum(s.forwarded) / len(s.forwarded) if s.forwarded else 0,
                    "flops": s.total_flops,
                    "rows": s.rows,
                }
                for s in self.scales
            ],
        }


def estimate(arch: ArchSpec, scales: list[tuple[int, int]], config: PruningConfig | None = None, *,
             guided: bool = False) -> CostReport:
    """Cost of generating one image row over ``scales`` with ``config`` (None = no pruning).

    ``guided``: count both CFG rows (the unconditional one only before ``config.cfg_cutoff``).
    Keys a scale leaves out of the KV cache (``config.kv_drop_ratios``) are not attended to by later scales.
    """
    config = config or PruningConfig(name="off")
    c, f, d = arch.width, arch.ffn_hidden, arch.depth
    kv_len = [arch.prefix_tokens] * d  # self-attention keys each layer holds so far
    report: list[ScaleCost] = []
    last = len(scales) - 1
    for si, (h, w) in enumerate(scales):
        n = h * w
        if si == 0 and arch.prefix_tokens:
            n = arch.prefix_tokens  # HART: scale 0 runs the text context, its 1x1 token is predicted from it
            kv_len = [0] * d
        if config.skips(si):
            report.append(ScaleCost(si, (h, w), h * w, True, [0] * d))
            continue
        pruned_keep = config.kept_tokens(si, n) if config.drop_ratio(si) > 0 else n
        flops = {"attention": 0.0, "cross_attention": 0.0, "ffn": 0.0, "head": 0.0}
        forwarded = []
        for layer in range(d):
            k = pruned_keep if config.prunes_layer(layer) else n
            forwarded.append(k)
            flops["attention"] += 8 * k * c * c + 4 * k * (kv_len[layer] + k) * c
            kv_len[layer] += config.kv_kept(si, k)
            if arch.text_tokens:
                flops["cross_attention"] += 4 * k * c * c + 4 * k * arch.text_tokens * c
                if si == 0:
                    flops["cross_attention"] += 4 * arch.text_tokens * c * c  # text K/V, once per run
            flops["ffn"] += 2 * arch.ffn_matrices * k * c * f
        flops["head"] = 2.0 * h * w * c * arch.head_outputs + 2.0 * h * w * arch.token_channels * c
        if si == last:
            flops["head"] += arch.last_scale_flops_per_token * h * w
        rows = 2 if guided and config.guides(si) else 1
        report.append(ScaleCost(si, (h, w), h * w, False, forwarded, {k: v * rows for k, v in flops.items()}, rows))
    kv_bytes = 2 * sum(kv_len) * c * arch.dtype_bytes
    return CostReport(report, kv_bytes)


def predicted_speedup(arch: ArchSpec, scales: list[tuple[int, int]], config: PruningConfig, *,
                      guided: bool = False) -> float:
    """FLOP ratio baseline / pruned: the ideal speedup of the transformer and heads.

    ``guided``: both CFG rows counted (needed for configs with a ``cfg_cutoff``; same ratio otherwise).
    """
    base = estimate(arch, scales, guided=guided).total_flops
    return base / estimate(arch, scales, config, guided=guided).total_flops


# Hidden-state copies alive at once inside a block: input, residual branch, normalised input, attention output
# (the text encoders' working memory, hf_utils).
LIVE_HIDDEN = 4
# Logit-sized float32 tensors of the head: every row's logits (guided and smoothed in place), then the draw's
# probabilities and cumulative sums for the conditional rows. Measured, HART at 1024 drawing a scale in one piece:
# 2.08x its logits with the head's normalised input; 2.6x before the guidance and the smoothing worked in place.
HEAD_COPIES = 2
# Transient buffers of the decoders' row bands (vae_layout.BAND_BYTES): a normalised input band, its conv output
# and one more band-sized temporary (measured: 0.19 GiB over the blocks' maps at HART's 1024 px level 0).
DECODE_BANDS_BYTES = 3 * 64 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Working memory of a sampling run beside the weights, in bytes."""

    kv_cache_bytes: int  # the self-attention KV cache of every row at its peak
    activation_bytes: int  # the largest scale's transient tensors

    @property
    def total(self) -> int:
        return self.kv_cache_bytes + self.activation_bytes


def sampling_memory(arch: ArchSpec, scales: list[tuple[int, int]], config: PruningConfig | None = None, *,
                    batch: int = 1, guided: bool = True, score_matrices: bool = True,
                    chunked_head: bool = False) -> MemoryEstimate:
    """KV cache plus peak activations of sampling ``batch`` images over ``scales`` with ``config``.

    Rows are ``batch`` (x2 with ``guided``: the unconditional CFG rows, also after a ``cfg_cutoff``, so the
    bound holds for every scale). A scale's activations are those of its largest step, one at a time: the
    residual stream of all its tokens beside either a self-attention sub-layer (``attention_hidden`` and
    ``attention_float32`` copies of the forwarded tokens, and one score matrix per head over the keys held so
    far, as the math kernel materialises), an FFN (normalised input, hidden layer(s), output) or the head (:data:`HEAD_COPIES` float32
    logits over ``head_outputs`` a token, for the whole scale or, with ``chunked_head``, ``head_chunk`` logits at
    once) and the last scale's extra work (HART's diffusion head, ``last_scale_chunk`` tokens at a time). From
    the cache scale on, FastVAR's restore cache is held too: every pruned layer's sub-layer outputs
    (self-attention, cross-attention when there is text, FFN) at that scale (docs/fastvar.md §3.6). The KV
    term is :func:`estimate`'s ``kv_cache_bytes`` for every row without the last executed scale's keys, which
    are never stored: the first layer has room for them, and every layer releases its buffer after that
    scale's attention, so a later layer's copy of its keys next to the new ones fits in what the layers before
    it released (kvcache.KVBuffer.extend); the room is counted with the activations.
    ``score_matrices=False``: a fused kernel (flash, memory-efficient SDPA) that never holds the scores.
    """
    config = config or PruningConfig(name="off")
    report = estimate(arch, scales, config)
    rows = batch * (2 if guided else 1)
    c, b = arch.width, arch.dtype_bytes
    sublayers = 3 if arch.text_tokens else 2
    pruned_layers = sum(config.prunes_layer(layer) for layer in range(arch.depth)) if config.pruned_scales else 0
    held = 0  # keys a layer holds before a scale runs (upper bound: of an unpruned layer)
    restore = 0  # the restore cache per row, once the cache scale has run
    peak = 0
    final = max(s.scale for s in report.scales if not s.skipped)
    final_keys = sum(config.kv_kept(final, k) for k in report.scales[final].forwarded)  # over all layers
    for cost in report.scales:
        n = arch.prefix_tokens if cost.scale == 0 and arch.prefix_tokens else cost.tokens
        if cost.skipped:
            continue
        if cost.scale == config.cache_scale:
            restore = b * pruned_layers * sublayers * n * c
        k = max(cost.forwarded)
        scores = arch.heads * k * (held + k) if score_matrices else 0
        attention = (b * arch.attention_hidden + 4 * arch.attention_float32) * k * c + b * scores
        ffn = b * k * (2 * c + (arch.ffn_matrices - 1) * arch.ffn_hidden)
        logits = rows * cost.tokens * arch.head_outputs  # of all rows, held at once unless chunked
        if chunked_head and arch.head_chunk:
            logits = min(logits, arch.head_chunk)
        head = HEAD_COPIES * 4 * logits
        if cost.scale == len(scales) - 1:
            at_once = min(arch.last_scale_chunk or cost.tokens, cost.tokens)
            head = max(head, rows * 4 * at_once * arch.last_scale_values_per_token)
        per_row = b * n * c + restore
        if cost.scale == final:
            per_row += 2 * b * k * c  # the first layer's room for this scale's keys and values (PruningRun.kv_capacities)
        peak = max(peak, rows * (per_row + max(attention, ffn)), rows * per_row + head)
        held += config.kv_kept(cost.scale, k)
    return MemoryEstimate((report.kv_cache_bytes - 2 * final_keys * c * b) * rows, peak)


def decode_steps(widths: list[int], upscale: int) -> list[tuple[str, int]]:
    """A VAE decoder's steps in order: ("blocks", level) and ("upsample", level) from the top level down, then
    ("out", 0) (norm_out, SiLU, conv_out). Level i runs at ``upscale / 2**i`` of the latent (at least 1)."""
    steps = []
    for i in reversed(range(len(widths))):
        steps.append(("blocks", i))
        if i and max(upscale // 2 ** (i - 1), 1) > max(upscale // 2**i, 1):
            steps.append(("upsample", i))
    return [*steps, ("out", 0)]


def decode_memory(widths: list[int], upscale: int, latent_hw: tuple[int, int], *, batch: int = 1,
                  dtype_bytes: int = 4, steps: slice = slice(None), banded: bool = False) -> int:
    """Peak activation bytes of a VAE decoder's ``steps`` (a slice of :func:`decode_steps`; default all) on a
    ``latent_hw`` latent, or one tile of it.

    ``widths``: channel width of each decoder level, full resolution first; level i receives the width of
    level i + 1 (the top level its own). Alive at once, per step of the ResnetBlocks both decoders share:
    ``banded`` (vae_layout.takes_bands: float32 on the CPU), a block's input and its conv output (conv1 reads
    its input normalised in row bands, conv2 and the shortcut write in place); else the plain ops, the input
    beside its normalised copy and conv1's output, or beside conv1's output and conv2's. An up-sampling holds
    its input and its 4x output; the head the last map and, unbanded, its normalised copy. The row bands'
    buffers (:data:`DECODE_BANDS_BYTES`) come on top.
    """
    h, w = latent_hw

    def size(i: int) -> int:  # positions of a level-i map
        f = max(upscale // 2**i, 1)
        return h * f * w * f

    peak = 0
    for kind, i in decode_steps(widths, upscale)[steps]:
        if kind == "blocks":
            cin = widths[min(i + 1, len(widths) - 1)] * size(i)
            out = widths[i] * size(i)
            values = max(cin, out) + out if banded else cin + max(cin + out, 2 * out)
        elif kind == "upsample":
            values = widths[i] * (size(i) + size(i - 1))
        else:
            values = (widths[0] + (3 if banded else widths[0])) * size(0)
        peak = max(peak, values)
    return batch * peak * dtype_bytes + DECODE_BANDS_BYTES
