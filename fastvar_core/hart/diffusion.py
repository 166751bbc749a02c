"""HART's residual diffusion head: a small AdaLN MLP denoiser and its respaced iDDPM sampler.

At the last scale HART predicts, for every token, the continuous residual between the VAE latent and
its discrete code with an 8-step diffusion conditioned on the transformer's hidden state
(docs/hart.md §2.7, §3.5). Module names follow the checkpoint keys (``diffloss.net.*``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops as nnops
from ..errors import ConfigError
from .config import TIMESTEP_FEATURES

VAE_SCALE = 0.6  # the head models latent residuals divided by this (docs/hart.md §2.7)
TRAIN_STEPS = 1000
DIFFUSION_CHUNK_ROWS = 4096  # tokens denoised at once (bounds the head's activations at 2K)


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N,) -> (N, dim) float32, cosines first (docs/hart.md §2.2 item 4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear; HART's level embedding and the diffusion time embedding."""

    def __init__(self, width: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.mlp = nn.Sequential(ops.Linear(TIMESTEP_FEATURES, width), nn.SiLU(), ops.Linear(width, width))

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """t (N,) -> (N, width) computed in ``dtype`` (None: the first layer's stored dtype, torch.nn layers only)."""
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype if dtype is None else dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.in_ln = ops.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(ops.Linear(width, width), nn.SiLU(), ops.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.norm_final = ops.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Denoiser: (x (N, Cvae), t, condition) -> (N, 2 Cvae) = [epsilon, variance interpolation v]."""

    def __init__(self, channels: int, width: int, cond_width: int, depth: int, operations=None):
        super().__init__()
        ops = nnops.resolve(operations)
        self.channels = channels
        self.time_embed = TimestepEmbedder(width, ops)
        self.cond_embed = ops.Linear(cond_width, width)
        self.input_proj = ops.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width, ops) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels, ops)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """x (N, Cvae); t_emb (1, W) and c_emb (N, W) already embedded (constant parts are computed once)."""
        h = self.input_proj(x)
        y = t_emb + c_emb
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


@dataclass(frozen=True)
class RespacedSchedule:
    """A 1000-step cosine schedule respaced to a few steps, float64 constants (docs/hart.md §3.5).

    Index n = 0..N-1 runs from the least to the most noisy kept step; ``timesteps[n]`` is the original
    timestep the network sees.
    """

    timesteps: tuple[int, ...]
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor

    @classmethod
    def cosine(cls, respacing: str, train_steps: int = TRAIN_STEPS) -> RespacedSchedule:
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        base = [min(1 - alpha_bar((i + 1) / train_steps) / alpha_bar(i / train_steps), 0.999) for i in range(train_steps)]
        base_ac = torch.cumprod(1 - torch.tensor(base, dtype=torch.float64, device="cpu"), 0)
        kept = space_timesteps(train_steps, respacing)
        betas, last = [], 1.0
        for i in kept:
            betas.append(1 - base_ac[i].item() / last)
            last = base_ac[i].item()
        betas_t = torch.tensor(betas, dtype=torch.float64, device="cpu")  # CPU even when built on 'meta'
        ac = torch.cumprod(1 - betas_t, 0)
        return cls(tuple(kept), betas_t, ac, torch.cat([ac.new_ones(1), ac[:-1]]))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step_constants(self, n: int) -> dict[str, float]:
        """Per-step float64 constants of the posterior and of x0 prediction (iDDPM, learned-range variance)."""
        beta, ac, ac_prev = self.betas[n].item(), self.alphas_cumprod[n].item(), self.alphas_cumprod_prev[n].item()
        post_var = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # log of the posterior variance, clipped: step 0 (variance 0) borrows step 1's value
        post_log_clipped = math.log(post_var[1].item() if n == 0 and self.num_steps > 1 else post_var[n].item())
        return {
            "sqrt_recip_ac": math.sqrt(1 / ac),
            "sqrt_recipm1_ac": math.sqrt(1 / ac - 1),
            "coef_x0": beta * math.sqrt(ac_prev) / (1 - ac),
            "coef_xt": (1 - ac_prev) * math.sqrt(1 - beta) / (1 - ac),
            "min_log": post_log_clipped,
            "max_log": math.log(beta),
        }


def space_timesteps(train_steps: int, respacing: str) -> list[int]:
    """Original timesteps kept by an iDDPM respacing string like "8" or "10,5" (sorted ascending)."""
    try:
        counts = [int(s) for s in str(respacing).split(",")]
    except ValueError:
        raise ConfigError(f"num_sampling_steps {respacing!r} must be a step count like \"8\"") from None
    size_per, extra = divmod(train_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ConfigError(f"num_sampling_steps {respacing!r}: cannot take {count} steps out of a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class ResidualDiffusion(nn.Module):
    """The ``diffloss`` module: denoiser ``net`` plus sampling."""

    def __init__(self, channels: int, width: int, cond_width: int, depth: int, num_sampling_steps: str,
                 operations=None):
        super().__init__()
        self.channels = channels
        self.net = SimpleMLPAdaLN(channels, width, cond_width, depth, operations)
        self.schedule = RespacedSchedule.cosine(num_sampling_steps)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        guidance: float,
        generator: torch.Generator | None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Residuals for the conditional rows: cond (2N, C) = [conditional; unconditional] -> (N, Cvae),
        computed in cond's dtype (the transformer's compute dtype).

        Reproduces the official draws exactly (docs/hart.md §3.5): one (N, Cvae) initial noise shared by both
        halves, then one (2N, Cvae) draw per step (also at the last step, where it is multiplied by 0),
        of which only the first half is used. Guidance acts on epsilon only, the variance comes from the
        conditional half; ``guidance == 1.0`` exactly takes the official unguided path (independent
        noise for all rows).

        ``guidance=None``: every row of cond (N, C) is conditional (past a CFG cut-off, no official
        counterpart): one (N, Cvae) draw to start and one per step but the last.
        """
        n2, dev = cond.shape[0], cond.device
        conditional_only = guidance is None
        n = n2 if conditional_only else n2 // 2
        dtype = cond.dtype
        guided = not conditional_only and guidance != 1.0

        def randn(rows: int) -> torch.Tensor:
            gdev = generator.device if generator is not None else torch.device("cpu")
            return torch.randn(rows, self.channels, generator=generator, device=gdev).to(dev, torch.float32)

        # Every draw first, in the official order; only the first n rows of each are used (the unguided
        # official path also denoises the unconditional rows, then drops them: they are skipped here).
        sch = self.schedule
        steps = list(reversed(range(sch.num_steps)))
        x_init = randn(n) if guided else randn(n2)[:n]
        noises = [randn(n) if step > 0 else None for step in steps] if conditional_only else [randn(n2)[:n] for _ in steps]
        t_embs = [self.net.time_embed(torch.full((1,), sch.timesteps[step], device=dev, dtype=torch.long), dtype)
                  for step in steps]  # (1, W) each
        consts = [sch.step_constants(step) for step in steps]

        result = torch.empty(n, self.channels, device=dev, dtype=torch.float32)
        for a in range(0, n, DIFFUSION_CHUNK_ROWS):  # rows are independent: denoise in chunks
            e = min(a + DIFFUSION_CHUNK_ROWS, n)
            c = torch.cat([cond[a:e], cond[n + a:n + e]]) if guided else cond[a:e]
            c_emb = self.net.cond_embed(c.to(dtype))  # constant over the steps
            x = x_init[a:e]
            for step, t_emb, k, noise in zip(steps, t_embs, consts, noises):
                x_in = torch.cat([x, x]) if guided else x
                out = self.net(x_in.to(dtype), t_emb, c_emb).float()
                eps, var_v = out[:, : self.channels], out[:, self.channels:]
                if guided:
                    eps_c, eps_u = eps[: e - a], eps[e - a:]
                    eps = eps_c * (1 + guidance) - guidance * eps_u
                    var_v = var_v[: e - a]
                frac = (var_v + 1) / 2
                log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
                x0 = (k["sqrt_recip_ac"] * x - k["sqrt_recipm1_ac"] * eps).clamp(-1, 1)
                mean = k["coef_x0"] * x0 + k["coef_xt"] * x
                x = mean + torch.exp(0.5 * log_var) * noise[a:e] * temperature if step > 0 else mean
            result[a:e] = x * VAE_SCALE
        return result


def diffusion_values_per_token(config) -> int:
    """Float32 activations alive per token and CFG row in the diffusion head: the noisy sample, the condition
    and a res-block's input, normalised input, hidden layer and the AdaLN's 3W modulation."""
    return 2 * config.vae_channels + 7 * config.diff_width


def diffusion_flops_per_token(config) -> float:
    """FLOPs of one token's residual diffusion over all sampling steps, per CFG row, for a HARTConfig.

    Per step: input projection, ``diff_depth`` res-blocks (two W x W linears and a 3W x W AdaLN), the final
    AdaLN (2W x W) and output (2Cvae x W) linears; once per token: the condition projection (W x C).
    The time embedding is per step, not per token, and is left out.
    """
    w, c = config.diff_width, config.vae_channels
    per_step = 2 * c * w + config.diff_depth * (4 * w * w + 6 * w * w) + 4 * w * w + 4 * w * c
    steps = len(space_timesteps(TRAIN_STEPS, config.num_sampling_steps))
    return steps * per_step + 2 * config.embed_dim * w
