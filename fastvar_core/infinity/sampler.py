"""Infinity's scale-by-scale bitwise sampler with classifier-free guidance and FastVAR pruning.

Reproduces the official loop (docs/infinity.md §4.2-4.3): CFG on logits after dividing by tau,
top-k / top-p per bit, exactly one ``torch.multinomial`` per executed scale on the (B*L*d, 2)
probabilities from a generator seeded with ``seed``, codes +-1/sqrt(d_v) accumulated with trilinear
up-sampling, next input = trilinear resize of the accumulator. FastVAR-skipped scales run nothing
and draw nothing; the latent is then the accumulated codes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, IncompatibleModelsError
from ..kvcache import KVBuffer
from ..pruning.config import PruningConfig
from ..sampling import (
    ProgressCallback,
    SampleResult,
    SamplingHooks,
    ScaleTimer,
    check_logits,
    check_sampling_args,
    close_pruning_run,
    draw_tokens,
    forced_tokens,
    per_scale,
    pruning_run_for,
)
from ..schedules import ScaleSchedule
from .config import TEXT_MAXLEN
from .model import Block, InfinityTransformer
from .rope import ScaleRope


def filter_bit_logits(pairs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (in place) the logits (N, 2) that top-k / top-p remove, as the official sampler does (docs/infinity.md §4.3).

    top-k keeps values >= the k-th largest; top-p sorts ascending, removes entries whose cumulative
    softmax is <= 1 - top_p (float32 comparison), never the largest.
    """
    if top_k > 0:
        kth = pairs.topk(min(top_k, pairs.shape[-1]), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        pairs.masked_fill_(pairs < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = pairs.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        pairs.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return pairs


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator,
                scale: int = 0, hooks: SamplingHooks | None = None) -> torch.Tensor:
    """logits (B, L, 2d) -> bits (B, L, d) int64 with ONE multinomial draw over all B*L*d bits.

    ``hooks.on_draw`` sees the (B, L*d, 2) filtered bit logits of ``scale`` and the (B, L*d) draw.
    """
    B, L, _ = logits.shape
    pairs = filter_bit_logits(logits.float().reshape(B, -1, 2).clone(), top_k, top_p)  # (B, L*d, 2)
    return draw_tokens(pairs, generator, scale, hooks).view(B, L, -1)


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """bits (B, 1, h, w, d_v) in {0,1} -> codes (B, d_v, 1, h, w), +-1/sqrt(d_v) (docs/infinity.md §4.2 step 11).

    Same float32 steps as the official quantizer (bit * s * 2 - s with s = 1/sqrt(d_v), then L2
    normalisation, which moves the values by an ulp), kept as a permuted view like the official tensor.
    """
    s = 1 / math.sqrt(bits.shape[-1])
    codes = F.normalize(bits * s * 2 - s, dim=-1)
    return codes.permute(0, 4, 1, 2, 3)


def unpatchify_bits(bits: torch.Tensor) -> torch.Tensor:
    """8B: (B, h, w, 4*d_v) -> (B, 2h, 2w, d_v); bit 4c+2a+b -> channel c at sub-pixel (a, b)."""
    return F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def latent_preview(summed: torch.Tensor) -> torch.Tensor:
    """Cheap RGB view (B, H, W, 3) in [0, 1] of the summed codes (B, d_v, 1, H, W): mean of 3 bit groups."""
    z = summed[:, :, 0].float()
    d = z.shape[1]
    g = max(d // 3, 1)
    rgb = torch.stack([z[:, i * g:(i + 1) * g].mean(1) if i * g < d else z.mean(1) for i in range(3)], dim=-1)
    return (rgb * math.sqrt(d) * 0.5 + 0.5).clamp(0, 1)  # codes are +-1/sqrt(d) per bit


@torch.inference_mode()
def sample_infinity(
    model: InfinityTransformer,
    cond,
    schedule: ScaleSchedule,
    *,
    vae=None,
    negative=None,
    cfg: float | Sequence[float] = 3.0,
    top_k: int = 900,
    top_p: float = 0.97,
    seed: int = 0,
    pruning: PruningConfig | None = None,
    callback: ProgressCallback | None = None,
    hooks: SamplingHooks | None = None,
    tau: float | Sequence[float] = 0.5,
) -> SampleResult:
    """Generate the latent (summed codes, (B, d_v, H, W)) for the prompts in ``cond``.

    ``cond``/``negative``: text conditioning with ``kv_compact`` (N, Ct5), ``lens`` (one per image;
    a negative may hold one prompt for all). ``vae`` is not needed (accepted for the shared signature).
    ``cfg``/``tau``: scalar or one value per scale; the bit generator is a CPU one seeded with ``seed``.
    ``pruning``: FastVAR config (None = off). ``callback(step, total, preview)`` runs after every
    executed scale; raising from it stops sampling with every cache released. ``hooks``: observers and
    teacher forcing for tests and tools (SamplingHooks).
    """
    config = model.config
    lens = [int(n) for n in cond.lens]
    B, S = len(lens), schedule.num_scales
    cfgs, taus = per_scale(cfg, S, "cfg"), per_scale(tau, S, "tau")
    check_sampling_args(B, top_k, top_p, taus)
    if cond.kv_compact.shape[-1] != config.text_channels:
        raise IncompatibleModelsError(
            f"text features are {cond.kv_compact.shape[-1]} wide, but the transformer expects {config.text_channels}"
        )
    if S > config.lvl_embed_rows:
        raise ConfigError(f"the schedule has {S} scales but the model has level embeddings for {config.lvl_embed_rows}")
    guidance = any(c != 1 for c in cfgs)
    if guidance and negative is None and max(lens) > TEXT_MAXLEN:
        raise ConfigError(f"prompts are limited to {TEXT_MAXLEN} tokens, got {max(lens)}")
    if negative is not None and len(negative.lens) not in (1, B):
        raise ConfigError(f"negative prompt count {len(negative.lens)} must be 1 or the batch size {B}")

    device = model.pos_start.device
    pruning = pruning if pruning is not None else PruningConfig(name="off")
    run = pruning_run_for(pruning, schedule.scales, config.depth, Block.SUBLAYERS, hooks)
    executed = [si for si in range(S) if not run.is_skipped(si)]
    # one buffer per layer, sized for every stored scale; the final executed scale's keys are not kept
    caches = [KVBuffer(slots) for slots in run.kv_capacities(schedule.tokens_per_scale, executed)]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))  # same bits on every device
    timer = ScaleTimer(device)
    vae_scales = [(2 * h, 2 * w) if config.patchify else (h, w) for h, w in schedule.scales]
    final = (1, *vae_scales[-1])
    tokens: dict[int, torch.Tensor] = {}
    on_logits = hooks.on_logits if hooks is not None else None
    on_trace = hooks.on_trace if hooks is not None else None
    try:
        full_ctx = model.encode_text(cond.kv_compact, lens, negative=negative, guidance=guidance)
        summed = None  # (B, d_v, 1, H, W) accumulated codes
        for step, si in enumerate(executed, start=1):
            timer.start()
            h, w = schedule.scales[si]
            run.begin_scale(si)
            # past the config's CFG cut-off only the conditional rows run (their logits, unguided)
            guided = guidance and pruning.guides(si)
            ctx = full_ctx if guided else full_ctx.conditional()
            if si == 0:
                x = model.start_tokens(ctx)  # (bs, 1, C)
            else:
                nxt = F.interpolate(summed, size=(1, *vae_scales[si]), mode="trilinear").squeeze(-3)  # (B, d_v, h', w')
                if config.patchify:
                    nxt = F.pixel_unshuffle(nxt, 2)  # (B, 4 d_v, h, w)
                if on_trace is not None:
                    on_trace("next_input", nxt)
                x = model.embed_tokens(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1), ctx.rows)  # (bs, h*w, C)
            rope = ScaleRope.build((h, w), schedule.rope_grid, config.head_dim, device)
            hidden = model.forward_scale(x, si, ctx, rope, run, caches, store_kv=si != executed[-1])

            if guided and cfgs[si] != 1:
                logits = model.get_logits(hidden, ctx.cond).mul(1 / taus[si])
                logits = cfgs[si] * logits[:B] + (1 - cfgs[si]) * logits[B:]
            else:
                logits = model.get_logits(hidden[:B], ctx.cond[:B]).mul(1 / taus[si])  # (B, L, 2d)
            if on_logits is not None:
                on_logits(si, logits)
            check_logits(logits, si, model.block_dtype)
            bits = sample_bits(logits, top_k, top_p, generator, si, hooks).view(B, h, w, -1)  # (B, h, w, d)
            forced = forced_tokens(hooks, si, tuple(bits.shape))  # after the draw, as in the reference
            if forced is not None:
                bits = forced.to(device)
            tokens[si] = bits.to(torch.uint8)
            vae_bits = unpatchify_bits(bits) if config.patchify else bits  # (B, h_v, w_v, d_v)
            codes = bits_to_codes(vae_bits.unsqueeze(1))  # (B, d_v, 1, h_v, w_v)
            if si != S - 1:
                up = F.interpolate(codes, size=final, mode="trilinear")
                summed = up if summed is None else summed + up
            else:
                summed = codes if summed is None else summed + codes
            if on_trace is not None:
                on_trace("latent", summed)
            timer.stop(si)
            if callback is not None:
                callback(step, len(executed), functools.partial(latent_preview, summed))
        latent = summed.squeeze(2).contiguous()  # (B, d_v, H, W)
    finally:
        close_pruning_run(run, hooks)
        for cache in caches:
            cache.clear()
    return SampleResult(
        family="infinity", latent=latent, schedule=schedule, pruning=pruning, executed_scales=executed,
        scale_seconds=timer.seconds, kept=run.kept, tokens=tokens,
    )
