"""Command line: generate images and convert checkpoints.

Errors caused by inputs print one line and exit with status 2 (a traceback only with --debug); any
other failure prints one line too and exits with status 1; warnings (e.g. a prompt truncated to the
encoder's limit) print one line each. Ctrl-C stops sampling within one scale, frees every cache and
exits with status 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from .errors import ConfigError, FastVARError


def _progress_bar(label: str):
    """A per-scale progress callback that redraws one stderr line."""
    start = time.perf_counter()

    def callback(step: int, total: int, preview=None) -> None:
        width = 26
        filled = round(width * step / total)
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] scale {step}/{total} {elapsed:6.1f}s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return callback


def check_output(out: Path) -> None:
    """Refuse an output path that cannot be written, before any model is loaded."""
    from PIL import Image

    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; expected an image file name such as '{out / 'fastvar.png'}'")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"--out '{out}' has no image suffix PIL can write (found {out.suffix or 'none'!r}); use .png")


def save_images(images, out: Path) -> list[Path]:
    """Write (B, H, W, 3) floats in [0, 1] as PNG; several images get _0, _1, ... suffixes."""
    import numpy as np
    from PIL import Image

    paths = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
            array = (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(path)
            paths.append(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the image to '{out}' ({type(exc).__name__}: {exc})") from None
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import Pipeline, check_batch, check_image_size, load_pruning
    from .sampling import check_seed

    # Cheap checks first: a typo should not cost a multi-GB model load.
    check_batch(args.batch)
    check_seed(args.seed)
    if args.width is not None and args.height is not None:
        check_image_size(args.width, args.height)
    check_output(Path(args.out))
    pruning = load_pruning(args.pruning)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = Pipeline.load(args.family, args.model, args.vae, args.text_encoder, tokenizer=args.tokenizer,
                         device=args.device, dtype=dtype)
    if args.preset == "2k":
        schedule = pipe.schedule(budget="2K") if args.width is None else pipe.schedule(args.width, args.height, "2K")
    else:
        schedule = pipe.schedule(args.width, args.height, args.budget)
    print(f"schedule: {schedule.describe()}", file=sys.stderr)
    prompts = [args.prompt] * args.batch
    cond, neg = pipe.encode(prompts, [args.negative] * args.batch if args.negative else None)
    t0 = time.perf_counter()
    result = pipe.sample(cond, schedule, negative=neg, pruning=pruning, seed=args.seed, cfg=args.cfg,
                         tau=args.tau, top_k=args.top_k, top_p=args.top_p, callback=_progress_bar("sampling"))
    t1 = time.perf_counter()
    images = pipe.decode(result)  # whole, or in tiles where memory or the unpruned sampler bounds it
    t2 = time.perf_counter()
    paths = save_images(images, Path(args.out))
    print(f"pruning {result.pruning.name}: sampling {t1 - t0:.2f}s, decode {t2 - t1:.2f}s -> "
          f"{', '.join(map(str, paths))}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_to_safetensors

    count = convert_to_safetensors(args.src, args.dst, allow_globals=args.allow_global or ())
    print(f"wrote {args.dst}: {count} tensors, verified identical to {args.src}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .memory import fits_table, format_report, build_report

    options = dict(batch=args.batch, pruning=args.pruning, dtype=args.dtype, attention=args.attention)
    if args.fits:
        print(fits_table(args.fits, **options, **({"weight_dtypes": [args.weight_dtype]} if args.weight_dtype else {})))
    else:
        print(format_report(build_report(args.model, args.size, **options), args.weight_dtype or "default"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .families import family_names
    from .memory import released_names
    from .ops import WEIGHT_DTYPES
    from .pipeline import PRESETS

    parser = argparse.ArgumentParser(prog="python -m fastvar_core", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text to image with an official checkpoint")
    gen.add_argument("--family", choices=family_names(), required=True)
    gen.add_argument("--model", required=True, help="Infinity .pth/.safetensors/8B folder, or HART llm/ or release folder")
    gen.add_argument("--vae", help="Infinity VAE file; HART tokenizer/ folder (default: beside llm/)")
    gen.add_argument("--text-encoder", required=True, help="flan-t5-xl folder or encoder file; Qwen2-VL folder")
    gen.add_argument("--tokenizer", help="tokenizer folder for a single-file T5 encoder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", help="negative prompt (Infinity)")
    gen.add_argument("--width", type=int, help="requested width in pixels; snapped to the nearest aspect template")
    gen.add_argument("--height", type=int, help="requested height in pixels")
    gen.add_argument("--budget", choices=["0.06M", "0.25M", "0.60M", "1M", "2K"],
                     help="pixel budget (default: the closest to width x height); HART: 1M or 2K only")
    gen.add_argument("--preset", choices=["2k"], help="2k: zero-shot 2K schedule")
    gen.add_argument("--pruning", default="paper", help=f"{', '.join(PRESETS)} or a JSON file (default: paper)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg", type=float)
    gen.add_argument("--tau", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--device")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--out", default="fastvar.png")
    gen.set_defaults(func=cmd_generate)

    mem = sub.add_parser("memory", help="weight bytes and predicted peak memory of a released model (no weights needed)")
    mem.add_argument("--model", default="infinity-2b",
                     help=f"released model: {', '.join(n.lower() for n in released_names())} (default: infinity-2b)")
    mem.add_argument("--size", default="1024", help="1024 (a square side), 2K, or WIDTHxHEIGHT (default: 1024)")
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--pruning", default="off", help=f"{', '.join(PRESETS)} or a JSON file (default: off)")
    mem.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                     help="compute dtype of the transformer and text encoder (default: bfloat16, as on a GPU)")
    mem.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES),
                     help="storage of the transformer's weights for the summary line (default: default) or the only "
                          "one in the --fits table (default: default and fp8_e4m3fn)")
    mem.add_argument("--attention", choices=["flash", "math"], default="flash",
                     help="flash: fused kernels hold no attention scores (GPU default); math: one score matrix per "
                          "head (upper bound)")
    mem.add_argument("--fits", type=float, nargs="+", metavar="GB",
                     help="print a 'what fits' table for these GPU sizes (e.g. 8 12 16 24) instead")
    mem.set_defaults(func=cmd_memory)

    conv = sub.add_parser("convert", help="convert an official pickle checkpoint to safetensors (verified)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--allow-global", action="append", metavar="MODULE.NAME",
                      help="let the pickle build this object (only for a file you trust; named in the loaders' "
                           "refusal message, e.g. argparse.Namespace); repeatable")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``args.func(args)`` with the conventions of the module docstring (tracebacks with ``args.debug``)."""
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    formatwarning = warnings.formatwarning
    if not args.debug:  # one line per warning (e.g. a truncated prompt), no source excerpt
        warnings.formatwarning = lambda message, category, *rest, **kw: f"\nwarning: {message}\n"
    try:
        return args.func(args)
    except FastVARError as exc:
        if args.debug:
            raise
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: sampling stopped and its caches were freed", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, the traceback with --debug
        if args.debug:
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        print(f"\nerror: unexpected {type(exc).__name__}: {detail} (rerun with --debug for the traceback and "
              f"report it)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning
