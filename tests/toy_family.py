"""A third model family that exists only in the tests: a tiny next-scale model behind the Family interface.

It proves the interface is the whole front door (docs/architecture.md §4): registered through
``families.register``, it runs through ``Pipeline`` and the ComfyUI sampler, decode and token-map nodes
without any change to them. The model predicts one of ``vocab`` colour codes per token at every scale;
the latent is the sum of the upsampled code maps, and the "VAE" upsamples it to pixels.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 16  # pixels per latent cell, as the real families


@dataclass
class ToyConditioning:
    context: torch.Tensor  # (B, T, text_width)

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def repeat(self, n: int) -> ToyConditioning:
        return ToyConditioning(self.context.repeat(n, 1, 1))

    def to(self, device) -> ToyConditioning:
        return ToyConditioning(self.context.to(device))


class ToyTextEncoder(nn.Module):
    width = 4

    def working_memory(self, prompts: int) -> int:
        return prompts * 2 * self.width * 4  # its (B, 2, 4) float32 features

    def encode(self, prompts: list[str]) -> ToyConditioning:
        rows = [[[(ord(c) % 13) / 13 for c in (p + " " * 8)[i:i + 4]] for i in (0, 4)] for p in prompts]
        return ToyConditioning(torch.tensor(rows, dtype=torch.float32))  # (B, 2, 4)


class ToyModel(nn.Module):
    def __init__(self, depth: int = 2, width: int = 8, vocab: int = 4, text_width: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(depth=depth, width=width, vocab=vocab, text_width=text_width, channels=3)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.text_proj = nn.Linear(text_width, width)
            self.embed = nn.Linear(3, width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(depth))
            self.head = nn.Linear(width, vocab)
            self.codebook = nn.Parameter(torch.randn(vocab, 3))

    def logits(self, x: torch.Tensor, run) -> torch.Tensor:
        """(rows, L, width) -> (rows, L, vocab); every block's FFN goes through FastVAR's PruningRun."""
        for layer, block in enumerate(self.blocks):
            x = run.add_sublayer(layer, "ffn", x, lambda t, idx, b=block: b(t))
        return self.head(x)


class ToyVAE(nn.Module):
    channels = 3

    def to_image(self, latent: torch.Tensor, tile: int | None = None, callback=None) -> torch.Tensor:
        if callback is not None:
            callback(1, 1)
        return F.interpolate(latent, scale_factor=STRIDE, mode="nearest").sigmoid().permute(0, 2, 3, 1)


def register_toy(families):
    """Define the toy Family against one copy of ``fastvar_core`` (the library's or the pack's) and register it."""
    core = families.__package__
    sampling = importlib.import_module(core + ".sampling")
    schedules = importlib.import_module(core + ".schedules")
    cost = importlib.import_module(core + ".cost")
    errors = importlib.import_module(core + ".errors")
    PresetTable = importlib.import_module(core + ".pruning").PresetTable

    @torch.no_grad()
    def toy_sample(model, cond, schedule, *, vae=None, negative=None, cfg=2.0, top_k=None, top_p=None, seed=0,
                   pruning=None, callback=None, hooks=None):
        B, (H, W), S = cond.batch_size, schedule.final_size, schedule.num_scales
        run = sampling.pruning_run_for(pruning, schedule.scales, model.config.depth, ("ffn",), hooks)
        generator = torch.Generator().manual_seed(seed)
        text = model.text_proj(cond.context.mean(1))[:, None]  # (B, 1, width)
        uncond = model.text_proj(negative.context.mean(1))[:, None] if negative is not None else torch.zeros_like(text)
        latent = torch.zeros(B, 3, H, W)
        tokens, executed = {}, []
        try:
            for si, (h, w) in enumerate(schedule.scales):
                if not run.is_skipped(si):
                    run.begin_scale(si)
                    x = model.embed(F.interpolate(latent, size=(h, w), mode="area").flatten(2).transpose(1, 2))
                    logits = model.logits(torch.cat([x + text, x + uncond]), run)  # (2B, hw, vocab)
                    logits = (1 + cfg) * logits[:B] - cfg * logits[B:]
                    sampling.check_logits(logits, si, torch.float32)  # each scale loop checks its own logits
                    idx = sampling.draw_tokens(logits.float(), generator, si, hooks)  # (B, hw)
                    codes = model.codebook[idx].transpose(1, 2).reshape(B, 3, h, w)
                    latent = latent + F.interpolate(codes, size=(H, W), mode="nearest")
                    tokens[si] = idx
                    executed.append(si)
                if callback is not None:
                    callback(si + 1, S, lambda z=latent: z.permute(0, 2, 3, 1).sigmoid())
        finally:
            sampling.close_pruning_run(run, hooks)
        return sampling.SampleResult("toy", latent.detach(), schedule, run.config, executed, kept=dict(run.kept),
                                     tokens=tokens)

    def schedule(h: int, w: int) -> schedules.ScaleSchedule:
        scales = tuple((max(1, math.ceil(k * h / 4)), max(1, math.ceil(k * w / 4))) for k in range(1, 5))
        return schedules.ScaleSchedule("toy", scales, (h, w), vae_stride=STRIDE)

    class ToyFamily(families.Family):
        name = "toy"
        label = "Toy"
        text_encoder_name = "the toy text encoder"
        negative_prompt = True
        has_tau = False
        can_skip = True
        attention_sublayer = "ffn"  # no attention: the token map shows the FFN selection
        defaults = {"cfg": 2.0, "tau": None, "top_k": None, "top_p": None}
        presets = PresetTable(scales_1024=4, tails={"paper": ({1: 0.5}, 2), "2k": ({1: 0.75}, 2)},
                              layers=lambda depth: (0, depth))

        def load_model(self, path, *, device, dtype, operations=None, weight_dtype=None):
            return ToyModel().to(device)

        def compute_dtype(self, model):
            return model.head.weight.dtype

        def load_vae(self, path, *, device, dtype=torch.float32, operations=None):
            return ToyVAE()

        def load_text_encoder(self, path, tokenizer=None, *, device, dtype=None):
            return ToyTextEncoder()

        def check_pair(self, model, vae):
            if model.config.channels != vae.channels:
                raise errors.IncompatibleModelsError("the toy VAE has another number of channels")

        def text_width(self, model):
            return model.config.text_width

        def arch_spec(self, config, cond=None):
            c = config
            return cost.ArchSpec(depth=c.depth, width=c.width, ffn_hidden=2 * c.width, head_outputs=c.vocab,
                                 token_channels=c.channels)

        def schedule_for_size(self, model, width, height, budget):
            if width is None:
                return schedule(4, 4)
            return schedule(max(1, round(height / STRIDE)), max(1, round(width / STRIDE)))

        def schedule_for_template(self, model, aspect, budget):
            return schedule(max(1, round(4 * math.sqrt(aspect))), max(1, round(4 / math.sqrt(aspect))))

        def chart_models(self):
            return {}

        def released_configs(self):
            return {"Toy": ToyModel().config}

        def sizes(self, config):
            return {"depth": config.depth, "width": config.width, "heads": 1, "text_width": config.text_width}

        def with_sizes(self, config, *, depth=None, width=None, heads=None, text_width=None):
            if heads not in (None, 1):
                raise errors.ConfigError("the toy has no attention: one head only")
            return SimpleNamespace(**{**vars(config), "depth": depth or config.depth, "width": width or config.width,
                                      "text_width": text_width or config.text_width})

        def random_model(self, config):
            return ToyModel(config.depth, config.width, config.vocab, config.text_width)

        def random_vae(self, config, base_width=None):
            return ToyVAE()

        def random_conditioning(self, config, batch, tokens, generator):
            return ToyConditioning(torch.randn(batch, tokens, config.text_width, generator=generator))

        def run_sampler(self, model, vae, cond, schedule, *, negative, knobs, seed, pruning, callback, hooks):
            return toy_sample(model, cond, schedule, vae=vae, negative=negative, seed=seed, pruning=pruning,
                              callback=callback, hooks=hooks, **knobs)

    return families.register(ToyFamily())
