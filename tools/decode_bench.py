"""Our VAE decoders against the official ones, side by side: same weights, same latent, one process.

    python -m tools.decode_bench --official-infinity ~/src/Infinity --official-hart ~/src/hart [--size 1024]

The official code is read from checkouts of FoundationVision/Infinity and mit-han-lab/hart given on the
command line (never shipped, never imported by the pack). Only their decoder modules are built, with
the same random weights as ours at the released widths (tools/randomized.py); their optional imports
that the decoders do not use (torchvision, imageio, einops, the quantiser) are stubbed. Each round
times the official decoder, then ours, on the same latent; the report gives the best of the rounds,
the ratio and how far the two images differ.

    python -m tools.decode_bench --tiled [--size 2048] [--vae-base 64] [--tile 64] [--plot out/bench/tiled.png]

times our tiled decode against our untiled decode of the same latent (the cost of tiling, goal <= 1.15x)
and reports how far the tiled image is from the untiled one (max and mean |diff| on the [0, 1] scale);
the plot shows both timings, and per decoder a crop around the first seam crossing: untiled, tiled and
the |diff| magnified.

    python -m tools.decode_bench --peak [--size 1024] [--shapes ...]

measures the untiled decode's peak memory: each layout in a fresh process (Linux), its peak resident size
in total and above the process with the VAE loaded, beside the estimate of ``families.decode_memory``.

    python -m tools.decode_bench --profile [--size 1024]

profiles one decode of each of our decoders (torch.profiler): time per op, the convolutions' share
and their GFLOP/s, to see where the time goes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

from fastvar_core import families
from fastvar_core.errors import ConfigError
from fastvar_core.vae_layout import tile_sides

from .randomized import SHAPES, build_vae

SEAM_CROP = 96  # pixels each side of the first seam crossing in the plot


def stub_module(name: str, **attrs) -> None:
    """Register an empty module (with ``attrs``) for an official import the benchmarked code never uses."""
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _unused(*args, **kwargs):
    raise RuntimeError("stubbed: the official decoders do not call this on 4-D inputs")


def _import_file(name: str, path: Path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():
        raise ConfigError(f"'{path}' is missing: pass the root of an official checkout")
    module = importlib.util.module_from_spec(spec)
    if package is not None:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_infinity_decoder(root: Path, ours):
    """The official BSQ-VAE ``Decoder`` (flux_vqgan.py) with our decoder's weights."""
    folder = root / "infinity" / "models" / "bsq_vae"
    for name in ("imageio", "torchvision", "torchvision.transforms"):
        stub_module(name, transforms=types.SimpleNamespace())
    stub_module("einops", rearrange=_unused, reduce=_unused, pack=_unused, unpack=_unused)
    package = types.ModuleType("official_bsq")
    package.__path__ = [str(folder)]
    sys.modules["official_bsq"] = package
    stub_module("official_bsq.multiscale_bsq", MultiScaleBSQ=None)
    _import_file("official_bsq.conv", folder / "conv.py", "official_bsq")
    flux = _import_file("official_bsq.flux_vqgan", folder / "flux_vqgan.py", "official_bsq")
    c = ours.config
    cnn = dict(cnn_type="2d", conv_in_out_2d="no", res_conv_2d="no", cnn_attention="no", cnn_norm_axis="spatial",
               conv_inner_2d="no")
    decoder = flux.Decoder(ch=c.base_ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks - 1,
                           z_channels=c.codebook_dim, patch_size=c.patch_size, cnn_param=cnn)
    decoder.load_state_dict(ours.decoder.state_dict(), strict=True)
    return decoder.eval().requires_grad_(False)


def official_hart_decoder(root: Path, ours):
    """The official HART VAE ``Decoder`` (basic_vae.py) with our decoder's weights."""
    basic = _import_file("official_hart_basic_vae", root / "hart" / "modules" / "networks" / "basic_vae.py")
    c = ours.config
    decoder = basic.Decoder(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
                            using_sa=c.using_sa, using_mid_sa=c.using_mid_sa)
    state = {k: v for k, v in ours.decoder.state_dict().items()}
    decoder.load_state_dict(state, strict=True)
    return decoder.eval().requires_grad_(False)


def _timed(decoder, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = decoder(z)
    return time.perf_counter() - start, out


def compare(name: str, official, ours, z: torch.Tensor, rounds: int, log) -> dict:
    """Best-of-``rounds`` seconds of each decoder on ``z``, alternating official then ours."""
    with torch.inference_mode():
        _timed(official, z[..., :8, :8])  # warm-up: allocator and kernel set-up
        _timed(ours, z[..., :8, :8])
        theirs_s, mine_s = [], []
        for r in range(rounds):
            t, ref = _timed(official, z)
            theirs_s.append(t)
            t, out = _timed(ours, z)
            mine_s.append(t)
            log(f"{name} round {r + 1}: official {theirs_s[-1]:.2f} s, ours {mine_s[-1]:.2f} s")
    diff = (out.float() - ref.float()).abs()
    row = {"decoder": name, "latent": list(z.shape), "image": list(out.shape), "official_s": min(theirs_s),
           "ours_s": min(mine_s), "speedup": min(theirs_s) / min(mine_s), "max_abs_diff": diff.max().item(),
           "mean_abs_diff": diff.mean().item()}
    log(f"{name}: official {row['official_s']:.2f} s, ours {row['ours_s']:.2f} s -> {row['speedup']:.2f}x; "
        f"|diff| max {row['max_abs_diff']:.2e}, mean {row['mean_abs_diff']:.2e} (images in [-1, 1] before clamping)")
    return row


def profile_decoder(name: str, decoder, z: torch.Tensor, log, rows: int = 12) -> dict:
    """One profiled decode of ``z``: seconds per op (self time), the convolutions' share and GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        decoder(z[..., :8, :8])  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            decoder(z)
        wall = time.perf_counter() - start
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    conv_s, conv_flop = 0.0, 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::mkldnn_convolution":
            (b, cin, h, w), (cout, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
            conv_s += e.self_cpu_time_total / 1e6
            pad_h, pad_w = (kh - 1) // 2, (kw - 1) // 2  # ours: "same" for odd kernels, none for the 2x2 phases
            out_pixels = (h + 2 * pad_h - kh + 1) * (w + 2 * pad_w - kw + 1)
            conv_flop += e.count * 2 * b * cout * cin * kh * kw * out_pixels
    log(f"{name}: profiled decode {wall:.2f} s; convolutions {conv_s:.2f} s ({100 * conv_s / total:.0f} % of op time, "
        f"{conv_flop / conv_s / 1e9:.0f} GFLOP/s)")
    for e in ops[:rows]:
        log(f"  {e.key:28s} {e.self_cpu_time_total / 1e6:7.2f} s {100 * e.self_cpu_time_total / 1e6 / total:5.1f} % "
            f"{e.count:5d} calls")
    return {"decoder": name, "profiled_s": wall, "conv_s": conv_s, "conv_share": conv_s / total,
            "conv_gflops": conv_flop / conv_s / 1e9,
            "ops": {e.key: e.self_cpu_time_total / 1e6 for e in ops[:rows]}}


def _latent(shape_name: str, vae, side: int) -> torch.Tensor:
    if shape_name.startswith("infinity"):
        return (torch.randint(0, 2, (1, vae.config.codebook_dim, side, side)) * 2 - 1).float()  # summed +-1 bits
    return torch.randn(1, vae.config.z_channels, side, side)


def tiled_vs_untiled(shape_name: str, vae, z: torch.Tensor, tile: int, rounds: int, log) -> tuple[dict, dict]:
    """Best-of-``rounds`` seconds of the untiled and the tiled decode of ``z`` (alternating), and the images."""
    family = SHAPES[shape_name].family
    families.decode(family, vae, z[..., :8, :8], "off")  # warm-up
    whole_s, tiled_s = [], []
    for r in range(rounds):
        start = time.perf_counter()
        whole = families.decode(family, vae, z, "off")
        whole_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        tiled = families.decode(family, vae, z, tile)
        tiled_s.append(time.perf_counter() - start)
        log(f"{shape_name} round {r + 1}: untiled {whole_s[-1]:.2f} s, tiled {tiled_s[-1]:.2f} s")
    diff = (tiled - whole).abs()
    row = {"decoder": f"{shape_name} VAE", "latent": list(z.shape), "image": list(whole.shape), "tile": tile,
           "untiled_s": min(whole_s), "tiled_s": min(tiled_s), "time_ratio": min(tiled_s) / min(whole_s),
           "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
           "untiled_peak_bytes": families.decode_memory(family, vae, z, "off"),
           "tiled_peak_bytes": families.decode_memory(family, vae, z, tile)}
    log(f"{shape_name}: untiled {row['untiled_s']:.2f} s, tiled ({tile}-cell tiles) {row['tiled_s']:.2f} s -> "
        f"{row['time_ratio']:.2f}x; |tiled - untiled| max {row['max_abs_diff']:.2e}, mean {row['mean_abs_diff']:.2e} "
        f"(images in [0, 1]); predicted activations {row['untiled_peak_bytes'] / 2**30:.2f} -> "
        f"{row['tiled_peak_bytes'] / 2**30:.2f} GiB")
    return row, {"untiled": whole[0], "tiled": tiled[0]}


def write_plot(rows: list[dict], panels: list[tuple[str, dict, tuple[int, int]]], path: Path) -> None:
    """One figure: untiled and tiled seconds per decoder (ratio, 1.15x goal), then per decoder the untiled
    image, the tiled one and their |diff| (x10) cropped around where the first seams cross."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.6 + 3 * len(panels)))
    grid = fig.add_gridspec(1 + len(panels), 3, height_ratios=[0.8] + [1] * len(panels))
    bars = fig.add_subplot(grid[0, :])
    names = [row["decoder"] for row in rows]
    y = range(len(rows))
    bars.barh([i + 0.2 for i in y], [row["untiled_s"] for row in rows], height=0.4, label="untiled")
    bars.barh([i - 0.2 for i in y], [row["tiled_s"] for row in rows], height=0.4, label="tiled")
    for i, row in zip(y, rows):
        bars.text(row["tiled_s"], i - 0.2, f" {row['time_ratio']:.2f}x (goal <= 1.15x), tile {row['tile']}",
                  va="center", fontsize=8)
    bars.set_yticks(list(y), names, fontsize=8)
    bars.set_xlabel("decode seconds (best of the rounds)", fontsize=8)
    bars.set_xlim(0, 1.7 * max(max(row["untiled_s"], row["tiled_s"]) for row in rows))
    bars.legend(fontsize=8, loc="upper right")
    for r, (name, images, (sy, sx)) in enumerate(panels, start=1):
        rows_crop = slice(max(sy - SEAM_CROP, 0), sy + SEAM_CROP)
        cols_crop = slice(max(sx - SEAM_CROP, 0), sx + SEAM_CROP)
        untiled, tiled = images["untiled"][rows_crop, cols_crop], images["tiled"][rows_crop, cols_crop]
        for c, (title, image) in enumerate(zip(("untiled", "tiled", "|diff| x10"),
                                               (untiled, tiled, ((tiled - untiled).abs() * 10).clamp(0, 1)))):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(image.numpy())
            ax.set_title(f"{name}: {title}, seam at ({sy}, {sx}) px", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _first_seam(size: int, tile: int, upscale: int) -> int:
    """Pixel where the first two tiles' shares cross (the middle of their overlap); the middle for one tile."""
    if tile >= size:
        return upscale * size // 2
    count = -(-(size - families.TILE_OVERLAP) // (tile - families.TILE_OVERLAP))
    second = round((size - tile) / (count - 1))
    return upscale * (second + tile) // 2


def _rss(field: str) -> int:
    """A ``/proc/self/status`` size in bytes (VmRSS now, VmHWM peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def decode_peak(name: str, side: int, log) -> dict:
    """One untiled decode of a random latent in this process: peak resident size, total and above the start."""
    vae = build_vae(SHAPES[name]).eval()
    z = _latent(name, vae, side)
    predicted = families.decode_memory(SHAPES[name].family, vae, z, "off")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current size
    start = _rss("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        vae.decode(z)
    seconds, peak = time.perf_counter() - t0, _rss("VmHWM")
    row = {"name": name, "size": 16 * side, "peak_bytes": peak, "peak_above_start_bytes": peak - start,
           "predicted_bytes": predicted, "decode_s": seconds}
    log(f"{name} {16 * side} px untiled decode: peak RSS {peak / 2**30:.2f} GiB, {(peak - start) / 2**30:.2f} GiB "
        f"above the loaded VAE (estimate {predicted / 2**30:.2f} GiB), {seconds:.1f} s")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.decode_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-infinity", type=Path, help="checkout of FoundationVision/Infinity")
    parser.add_argument("--official-hart", type=Path, help="checkout of mit-han-lab/hart")
    parser.add_argument("--tiled", action="store_true", help="our tiled decode against our untiled one")
    parser.add_argument("--profile", action="store_true", help="profile our decoders per op")
    parser.add_argument("--peak", action="store_true", help="peak memory of one untiled decode per layout, each "
                        "in a fresh process")
    parser.add_argument("--shapes", nargs="+", default=["infinity-2b", "hart-0.7b"], choices=sorted(SHAPES),
                        help="--tiled, --profile: the VAE layouts")
    parser.add_argument("--vae-base", type=int, help="--tiled: VAE decoder base width (default: the released one)")
    parser.add_argument("--tile", type=int, help="--tiled: tile size in latent cells (default: the tile the Decode "
                        "node picks when the untiled decode just does not fit)")
    parser.add_argument("--plot", type=Path, default=Path("out/bench/tiled-decode.png"),
                        help="--tiled: timings and seam crops")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (the latent is size/16; "
                        "default 1024, 2048 with --tiled)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.official_infinity is None and args.official_hart is None and not (args.tiled or args.profile or args.peak):
        parser.error("give --official-infinity and/or --official-hart, --tiled, --profile or --peak")
    if args.vae_base is not None and args.vae_base % 32:
        parser.error(f"--vae-base {args.vae_base} must be a multiple of 32 (the VAE's GroupNorm groups)")
    torch.manual_seed(0)
    size = args.size or (2048 if args.tiled else 1024)
    side = size // 16
    rows = []
    if args.official_infinity is not None:
        ours = build_vae(SHAPES["infinity-2b"])
        z = _latent("infinity-2b", ours, side)
        rows.append(compare("infinity-2b BSQ VAE", official_infinity_decoder(args.official_infinity, ours),
                            ours.decoder, z, args.rounds, print))
    if args.official_hart is not None:
        ours = build_vae(SHAPES["hart-0.7b"])
        z = _latent("hart-0.7b", ours, side)
        rows.append(compare("hart-0.7b VAE", official_hart_decoder(args.official_hart, ours), ours.decoder, z,
                            args.rounds, print))
    if args.peak and len(args.shapes) == 1:
        rows.append(decode_peak(args.shapes[0], side, print))
    elif args.peak:  # a fresh process per layout, so that each peak is its own
        for name in args.shapes:
            out = subprocess.run([sys.executable, "-m", "tools.decode_bench", "--peak", "--shapes", name,
                                  "--size", str(size)], check=True, capture_output=True, text=True).stdout
            print(out.strip().splitlines()[-1])
    if args.profile:
        for name in args.shapes:
            vae = build_vae(SHAPES[name])
            rows.append(profile_decoder(f"{name} VAE", vae.decoder, _latent(name, vae, side), print))
    if args.tiled:
        panels = []
        for name in args.shapes:
            shape = SHAPES[name] if args.vae_base is None else replace(SHAPES[name], vae_base=args.vae_base)
            vae = build_vae(shape)
            z = _latent(name, vae, side)
            tile = args.tile or families.fit_tile(shape.family, vae, tuple(z.shape),
                                                  families.decode_memory(shape.family, vae, z, "off") - 1,
                                                  families.decodes_in_bands(vae, z.device))
            row, images = tiled_vs_untiled(name, vae, z, tile, args.rounds, print)
            row["vae_base"] = args.vae_base or "released"
            rows.append(row)
            upscale = images["untiled"].shape[0] // side
            th, tw = tile_sides(tile)
            panels.append((name, images, (_first_seam(side, th, upscale), _first_seam(side, tw, upscale))))
        write_plot([r for r in rows if "tiled_s" in r], panels, args.plot)
        print(f"wrote {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
