"""HART text-to-image sampling (the official ``autoregressive_infer_cfg``), optionally with FastVAR.

Per scale (docs/hart.md §3.4-3.5): run the blocks on the new tokens (the 300 text tokens at scale 0), guide
the logits with a linearly growing CFG strength, sample with top-k/top-p (optionally Gumbel-smoothed
embeddings), accumulate the codes into the 64x64 latent f_hat (bicubic up-sampling + Phi) and feed the
area-resized f_hat back as the next scale's input. The last scale adds a residual from the diffusion head.

Differences from the official code, by design: the residual-diffusion noise comes from the run's own
seeded generator (the official code uses the unseeded global RNG; ``SamplingHooks.diffusion_generator``
reproduces a particular global state), pruning caches live only for one call, every cache is released
on error or interrupt.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
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
    pruning_run_for,
)
from ..schedules import ScaleSchedule
from .loader import check_text_width, check_vae_matches
from .model import Block, HARTTransformer, KVCache, image_positions, rope_context, rope_image

EARLY_SCALES = 7  # official rule: top-k 600 for scales 0..6, 300 after
TOP_K_EARLY, TOP_K_LATE = 600, 300


def official_top_k(si: int) -> int:
    return TOP_K_EARLY if si < EARLY_SCALES else TOP_K_LATE


def gumbel_tau(ratio: float) -> float:
    """Temperature of the more_smooth Gumbel softmax at progress ``ratio`` (official formula)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def filter_logits_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, l, V) logits in place to -inf outside the top-k (ties kept) and the top-p nucleus."""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # the most likely token always stays
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def smooth_embedding(logits: torch.Tensor, ratio: float, codebook: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """more_smooth: Gumbel-softmax mixture of codebook vectors, (B, l, V) masked logits -> (B, l, Cvae).

    Overwrites ``logits`` (the head's last use of them): the official products and sums, in place.
    """
    gumbels = torch.empty_like(logits).exponential_(generator=generator).log_().neg_()
    weights = logits.mul_(1 + ratio).add_(gumbels).div_(gumbel_tau(ratio))
    del gumbels
    weights = weights.softmax(dim=-1)
    return weights @ codebook.to(weights.dtype).unsqueeze(0)


HEAD_CHUNK_VALUES = 1 << 24  # float32 logits per chunk of the head (64 MiB): bounds the head's peak at 2K


def head_tokens(model: HARTTransformer, x: torch.Tensor, head_scale: torch.Tensor, head_shift: torch.Tensor, *,
                B: int, guided: bool, t: float, si: int, top_k: int, top_p: float, smooth_ratio: float | None,
                codebook: torch.Tensor, vae, generator: torch.Generator,
                hooks: SamplingHooks | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale's head: hidden states x (rows, l, C) -> tokens (B, l) and their embeddings (B, l, Cvae) float32.

    Guided logits, top-k/top-p, the draw and the Gumbel smoothing (``smooth_ratio`` None: plain codebook
    embedding) run in chunks of tokens, so the (B, l, V) logits never exist at once. The random numbers
    stay those of one pass: the draw (``torch.multinomial`` takes one exponential per logit on a CPU
    generator) and the smoothing each continue their own sequence, the smoothing's started where the whole
    draw would end. Runs in one piece when hooks observe or force logits, draws or tokens (they see whole
    scales), at scale 0 and on a non-CPU generator (whose sequence depends on how it is split).
    """
    device = x.device
    length = 1 if si == 0 else x.shape[1]  # scale 0: the 1x1 token is predicted from the last text position
    V = model.config.vocab_size
    observed = hooks is not None and (hooks.on_logits is not None or hooks.on_draw is not None
                                      or hooks.teacher is not None)
    whole = observed or si == 0 or generator.device.type != "cpu"
    step = length if whole else max(1, HEAD_CHUNK_VALUES // (V * (2 if guided else 1)))
    parts = [(None, slice(None))] if whole else [(b, slice(a, a + step)) for b in range(B) for a in range(0, length, step)]

    forced = forced_tokens(hooks, si, (B, length))
    smooth_gen = generator
    if smooth_ratio is not None and forced is None and len(parts) > 1:
        smooth_gen = torch.Generator(device=generator.device)
        smooth_gen.set_state(generator.get_state())
        for b, span in parts:  # skip the draw's exponentials
            torch.empty(x[b, span].shape[0], V, device=generator.device).exponential_(generator=smooth_gen)

    idx = torch.empty(B, length, dtype=torch.long, device=device)
    h = torch.empty(B, length, codebook.shape[-1], dtype=torch.float32, device=device)
    for b, span in parts:
        if b is None:
            rows, scale, shift = x, head_scale, head_shift
        else:
            pick = [b, B + b] if guided else [b]
            rows, scale, shift = x[pick, span], head_scale[pick], head_shift[pick]
        logits = model.logits(rows, scale, shift)  # (rows, n, V) float32
        if guided:  # (1 + t) * conditional - t * unconditional, the same three products, in place
            n = logits.shape[0] // 2
            logits = logits[:n].mul_(1 + t).sub_(logits[n:].mul_(t))
        if si == 0:
            logits = logits[:, -1:]
        out = slice(None) if b is None else slice(b, b + 1)
        if hooks is not None and hooks.on_logits is not None:
            hooks.on_logits(si, logits)
        if forced is not None:
            idx[:] = forced.to(device)  # no draw: the teacher's codes, embedded without smoothing
            h[:] = vae.embed(idx.to(codebook.device)).to(device, torch.float32)
            break
        check_logits(logits, si, model.dtype)
        filter_logits_(logits, top_k, top_p)
        drawn = draw_tokens(logits, generator, si, hooks)
        idx[out, span] = drawn
        if smooth_ratio is not None:
            part_h = smooth_embedding(logits, smooth_ratio, codebook, smooth_gen)
        else:
            part_h = vae.embed(drawn.to(codebook.device))
        h[out, span] = part_h.to(device, torch.float32)
        del logits
    if smooth_gen is not generator:
        generator.set_state(smooth_gen.get_state())
    return idx, h


def latent_preview(f_hat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cheap RGB view of a latent (B, Cvae, h, w) -> (B, h, w, 3) in [0, 1], no VAE decode.

    Projects onto the codebook's three main principal directions and normalises each image.
    """
    cb = codebook.float()
    _, _, vt = torch.linalg.svd(cb - cb.mean(0), full_matrices=False)
    rgb = torch.einsum("bchw,kc->bhwk", f_hat.float(), vt[:3].to(f_hat.device))
    lo = rgb.amin(dim=(1, 2), keepdim=True)
    hi = rgb.amax(dim=(1, 2), keepdim=True)
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).cpu()


def sample_hart(
    model: HARTTransformer,
    cond,
    schedule: ScaleSchedule,
    *,
    vae=None,
    negative=None,
    cfg: float = 4.5,
    top_k: int | None = None,
    top_p: float = 0.0,
    seed: int = 1,
    pruning: PruningConfig | None = None,
    callback: ProgressCallback | None = None,
    hooks: SamplingHooks | None = None,
    more_smooth: bool = True,
) -> SampleResult:
    """Generate HART latents for a batch of prompts; ``result.latent`` is f_hat (B, Cvae, H, W) for the VAE.

    cond: text conditioning with ``context`` (B, T, D_ctx), ``mask`` (B, T) and ``position_ids`` (B, T)
    (e.g. HARTTextConditioning). ``vae`` is required (its codebook embeds the tokens); ``negative`` must
    be None (HART has no negative prompt). top_k None = the official 600 (scales 0-6) / 300 rule, 0 = off.
    ``seed`` seeds the token sampler's generator (the official ``g_seed``); the diffusion noise continues
    from it. A ``pruning`` config with a ``cfg_cutoff`` runs only the conditional rows from that scale on
    (logits and the diffusion residual unguided). ``hooks``: observers and teacher forcing for tests and
    tools (SamplingHooks).
    """
    if vae is None:
        raise ConfigError("HART samples with its VAE's codebook: pass the HART VAE (vae=...)")
    if negative is not None:
        raise ConfigError("HART has no negative prompt (its unconditional branch is an empty context): "
                          "leave the negative conditioning empty")
    cfg_model = model.config
    check_vae_matches(model, vae)
    check_text_width(model, cond)
    if schedule.family != "hart" or schedule.scales[0] != (1, 1):
        raise ConfigError(f"schedule {schedule.describe()!r} is not a HART schedule starting at 1x1")
    if not math.isfinite(cfg):
        raise ConfigError(f"cfg = {cfg} is not a finite number")
    B = cond.context.shape[0]
    check_sampling_args(B, top_k or 0, top_p, [])
    S = schedule.num_scales
    scales = schedule.scales
    pruning = pruning or PruningConfig(name="off")

    device, dtype = model.device, model.dtype
    codebook = vae.codebook()
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    diff_gen = hooks.diffusion_generator if hooks is not None and hooks.diffusion_generator is not None else generator
    on_trace = hooks.on_trace if hooks is not None else None

    run = pruning_run_for(pruning, schedule.scales, cfg_model.depth, Block.SUBLAYERS, hooks)
    tokens_run = [cond.context.shape[1], *schedule.tokens_per_scale[1:]]  # scale 0 runs the text tokens
    cache = KVCache(cfg_model.depth, run.kv_capacities(tokens_run, range(S)))
    timer = ScaleTimer(device)
    tokens: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            # CFG batch: [conditional; unconditional] with zero context, position ids 0 (docs/hart.md §3.3)
            ctx = cond.context.to(device, torch.float32)
            cond_bd = model.embed_context(torch.cat([ctx, torch.zeros_like(ctx)]))  # (2B, T, C)
            pos_ids = cond.position_ids.to(device)
            pos_ids = torch.cat([pos_ids, torch.zeros_like(pos_ids)])  # (2B, T)
            offset = pos_ids[:, -1]  # 2D RoPE shift: last text position per row (0 for unconditional rows)
            head_scale, head_shift = model.head_nm.modulation(cond_bd)
            levels = model.level_embedding(S)  # (S, C)
            grid = schedule.rope_grid
            f_hat = torch.zeros(B, cfg_model.vae_channels, *schedule.final_size, device=device, dtype=torch.float32)
            x = cond_bd + levels[0]  # scale 0 input: the text tokens
            ratio = 0.0
            for si, (ph, pw) in enumerate(scales):
                timer.start()
                last = si == S - 1
                if not last:
                    ratio = si / (S - 1)  # the last scale reuses the previous ratio (official behaviour)
                run.begin_scale(si)
                cache.store = not last
                guided = pruning.guides(si)  # past a CFG cut-off only the conditional rows run
                rows = 2 * B if guided else B
                if si == 0:
                    cos, sin = rope_context(pos_ids, cfg_model.head_dim)
                else:
                    cos, sin = rope_image(image_positions((ph, pw), grid, offset[:rows]), cfg_model.head_dim)
                x = model.forward_blocks(x, cos, sin, cache, run)  # (rows, l, C)
                t = cfg * ratio
                if last:  # nothing restores any more: free the restore cache before the head's peak (the KV
                    run.close()  # buffers were released layer by layer, KVBuffer.extend)
                idx, h = head_tokens(model, x, head_scale[:rows], head_shift[:rows], B=B, guided=guided, t=t, si=si,
                                     top_k=official_top_k(si) if top_k is None else top_k, top_p=top_p,
                                     smooth_ratio=ratio if more_smooth else None, codebook=codebook, vae=vae,
                                     generator=generator, hooks=hooks)
                tokens[si] = idx.cpu()

                if not last:
                    h_map = h.transpose(1, 2).reshape(B, -1, ph, pw)
                    f_hat = vae.accumulate(f_hat, h_map, si, S, schedule.final_size).float()
                    nxt = vae.next_input(f_hat, scales[si + 1]).flatten(2).transpose(1, 2)  # (B, h'w', Cvae)
                    if on_trace is not None:
                        on_trace("next_input", nxt)
                    x = model.word_embed(nxt.to(dtype)) + levels[si + 1]
                    if pruning.guides(si + 1):
                        x = torch.cat([x, x])  # (2B, h'w', C)
                else:
                    # residual diffusion conditioned on hidden + embedding of the hard codes (docs/hart.md §3.5 step 5)
                    discrete = model.word_embed(vae.embed(idx.to(codebook.device)).to(device, dtype))  # (B, l, C)
                    z = x  # (rows, l, C): x + discrete, normed, in place and in chunks of tokens
                    step = max(1, HEAD_CHUNK_VALUES // (rows * z.shape[-1]))
                    for a in range(0, z.shape[1], step):
                        part = z[:, a:a + step]
                        part.unflatten(0, (rows // B, B)).add_(discrete[:, a:a + step])
                        part.copy_(model.decoder_norm(part))
                    del discrete
                    if guided:
                        resid = model.diffloss.sample(z.flatten(0, 1), t, diff_gen)
                    else:
                        resid = model.diffloss.sample(z.flatten(0, 1), None, diff_gen)  # conditional rows only
                    resid = resid.view(B, -1, h.shape[-1])
                    if on_trace is not None:
                        on_trace("latent_before_last", f_hat)
                        on_trace("diffusion_cond", z)
                        on_trace("diffusion_out", resid)
                    final = (h + resid.float()).transpose(1, 2).reshape(B, -1, ph, pw)
                    f_hat = vae.accumulate(f_hat, final, si, S, schedule.final_size).float()
                if on_trace is not None:
                    on_trace("latent", f_hat)
                timer.stop(si)
                if callback is not None:
                    callback(si + 1, S, lambda f=f_hat: latent_preview(f, codebook))
    finally:
        close_pruning_run(run, hooks)
        cache.clear()

    return SampleResult(
        family="hart",
        latent=f_hat,
        schedule=schedule,
        pruning=pruning,
        executed_scales=list(range(S)),
        scale_seconds=timer.seconds,
        kept=dict(run.kept),
        tokens=tokens,
    )

