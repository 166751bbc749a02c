"""`make demo` (`python -m tools.demo`): generate with real weights when they are present, else run
the whole pipeline on random-weight models of the real architecture shapes and print FastVAR vs baseline.

With weights: looks for the official files in a ComfyUI-style models folder (``--models-dir``,
``$FASTVAR_MODELS_DIR``, or ComfyUI's ``models/`` when the pack sits in ``custom_nodes/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fastvar_core import families
from fastvar_core.cli import save_images
from fastvar_core.cost import estimate
from fastvar_core.errors import ConfigError
from fastvar_core.families import get_family, resolve_pruning
from fastvar_core.pipeline import Pipeline
from fastvar_core.pruning_request import PruningRequest
from fastvar_core.sampling import SamplingHooks

from . import command
from .bench import machine_info
from .measure import PeakMemory
from .randomized import PROMPT_TOKENS, SHAPES, build_text_encoder, build_transformer, build_vae, random_conditioning

PACK_ROOT = Path(__file__).resolve().parents[1]


def find_models_dir(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("FASTVAR_MODELS_DIR"), PACK_ROOT.parents[1] / "models"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def real_weights(models: Path | None) -> dict | None:
    """Paths of the Infinity-2B release files under a ComfyUI models folder, if all are there."""
    if models is None:
        return None
    paths = {"model": models / "infinity" / "infinity_2b_reg.pth", "vae": models / "vae" / "infinity_vae_d32reg.pth",
             "text_encoder": models / "text_encoders" / "flan-t5-xl"}
    return paths if all(p.exists() for p in paths.values()) else None


def save_png(image: torch.Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def run_random(args: argparse.Namespace) -> int:
    shape = SHAPES[args.model].with_overrides(depth=args.depth)
    print(f"no weights found: random-weight {shape.name} shapes (width {shape.width}, {shape.heads} heads, "
          f"depth {shape.depth} of {SHAPES[args.model].depth}), seed {args.seed}", file=sys.stderr)
    model, vae = build_transformer(shape), build_vae(shape)
    cond = random_conditioning(shape)
    family = get_family(shape.family)
    try:
        schedule = family.schedule_for_size(model, args.size, args.size, None)
    except ConfigError:  # no size class near --size: the family's default square one
        schedule = family.schedule_for_size(model, None, None, None)
    if args.text_depth < 1:
        raise ConfigError(f"--text-depth must be >= 1, found {args.text_depth}")
    encoder = build_text_encoder(shape, args.text_depth)
    with torch.inference_mode(), PeakMemory() as text_mem:
        encoder.encode_random(1, PROMPT_TOKENS, torch.Generator().manual_seed(args.seed))  # warm-up
        t0 = time.perf_counter()
        encoder.encode_random(1, PROMPT_TOKENS, torch.Generator().manual_seed(args.seed))
        text_s = time.perf_counter() - t0
    del encoder
    arch = family.arch_spec(model.config, cond)
    base_flops = estimate(arch, list(schedule.scales)).total_flops
    out = Path(args.out)
    with torch.inference_mode():  # warm-up: first calls pay for allocator and kernel set-up
        _sample(shape.family, model, vae, cond, schedule.__class__(schedule.family, schedule.scales[:4],
                schedule.rope_grid, schedule.template, schedule.budget), None, args.seed)
    rows = []
    for name in ("off", "paper"):
        config = resolve_pruning(shape.family, PruningRequest(mode=name), schedule, model.config, cond)
        with torch.inference_mode(), PeakMemory() as mem:
            t0 = time.perf_counter()
            result = _sample(shape.family, model, vae, cond, schedule, config, args.seed)
            t1 = time.perf_counter()
            image = vae.to_image(result.latent)
            t2 = time.perf_counter()
        save_png(image[0], out / f"{shape.family}_{name}.png")
        for scale in sorted({s for s, _, _ in result.kept}):
            save_png(result.kept_mask(scale)[0, ..., None], out / f"{shape.family}_{name}_kept_scale{scale}.png")
        report = estimate(arch, list(schedule.scales), config)
        forwarded = sum(sum(s.forwarded) / shape.depth for s in report.scales)
        rows.append((name, len(result.executed_scales), forwarded, base_flops / report.total_flops, t1 - t0, t2 - t1,
                     mem.peak_bytes))
    print(f"\n{shape.name} shapes, {schedule.image_size[1]}x{schedule.image_size[0]}, machine: "
          f"{machine_info(torch.device('cpu'), True)['cpu']}, CPU threads {torch.get_num_threads()}, float32:")
    print(f"{'pruning':8} {'scales':>6} {'tokens/layer':>12} {'FLOP ratio':>10} {'text s':>7} {'sampling s':>10} "
          f"{'speedup':>8} {'decode s':>8} {'total s':>8} {'e2e':>7} {'peak RSS':>9}")
    base_time, base_total = rows[0][4], text_s + rows[0][4] + rows[0][5]
    for name, scales, tokens, ideal, ts, td, peak in rows:
        total = text_s + ts + td
        print(f"{name:8} {scales:>6} {tokens:>12.0f} {ideal:>9.2f}x {text_s:>7.2f} {ts:>10.2f} {base_time / ts:>7.2f}x "
              f"{td:>8.2f} {total:>8.2f} {base_total / total:>6.2f}x {max(peak, text_mem.peak_bytes) / 2**30:>7.2f}Gi")
    print(f"text s: the release's text encoder at {args.text_depth} layers, random weights, one prompt of "
          f"{PROMPT_TOKENS} tokens (total = text + sampling + decode, e2e: its speedup; peak RSS: text, sampling or "
          "decode)")
    print(f"\nimages and kept-token maps written to {out}/")
    return 0


def _sample(family, model, vae, cond, schedule, config, seed):
    """The family's scale loop with its official guidance, through the shared front door."""
    return families.sample(family, model, cond, schedule, vae=vae, seed=seed, pruning=config,
                           hooks=SamplingHooks(record_kept=True))


def run_real(paths: dict, args: argparse.Namespace) -> int:
    print(f"found Infinity-2B weights: {paths['model']}", file=sys.stderr)
    pipe = Pipeline.load("infinity", paths["model"], paths["vae"], paths["text_encoder"])
    images, result = pipe.generate(args.prompt, width=1024, height=1024, pruning="paper", seed=args.seed)
    written = save_images(images, Path(args.out) / "infinity_2b_paper.png")
    print(f"sampling {result.seconds:.2f}s with FastVAR paper -> {written[0]}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", help="ComfyUI-style models folder with the official files")
    parser.add_argument("--prompt", default="a red fox sitting in fresh snow at sunrise, highly detailed")
    parser.add_argument("--model", choices=sorted(SHAPES), default="infinity-2b", help="random-weight shape")
    parser.add_argument("--depth", type=int, default=4, help="layers of the random-weight model (presets prune 3..)")
    parser.add_argument("--text-depth", type=int, default=4, help="layers of the random-weight text encoder")
    parser.add_argument("--size", type=int, choices=[256, 512, 768, 1024], default=512,
                        help="image size (a family without a size class near it makes its default: HART 1024 px)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="out/demo")


def run(args: argparse.Namespace) -> int:
    paths = real_weights(find_models_dir(args.models_dir))
    return run_real(paths, args) if paths else run_random(args)


def main(argv: list[str] | None = None) -> int:
    return command.main("python -m tools.demo", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
