"""`python -m tools.bench`: where a generation's time goes, and how close FastVAR gets to its FLOP limit.

Random-weight models of the released architectures (randomized.py; widths, heads and text widths of
Infinity-2B, Infinity-8B and HART-0.7B, any of them overridable, depth reducible) run the real samplers
and VAE decoders in one process, the baseline against each pruning config. Every config gets a warm-up
run (stopped before its last scale), then the configs take turns for N rounds, so slow load drifts of a
shared machine hit all of them alike; medians are reported. Per scale and in total: tokens forwarded and
FLOPs (cost model), wall time; per run: peak memory (CUDA max-allocated; on the CPU the peak resident
set size, heap trimmed before each run), the measured speedup next to the cost model's FLOP-ratio
ideal, and the share of the pruned sub-layers' time spent selecting and restoring tokens. The decoder
runs once per model and resolution (its work does not depend on pruning). The release's text encoder
(random weights; ``--text-depth`` reduces its layers) encodes one prompt of the typical length once per
model (median of the rounds); the sampler itself runs on random conditioning of that length. End to end per
config: text encoding, sampling and decode seconds, their total and its speedup next to the sampler's, and
the run's peak (text encoding, sampling or decode).

Runs on the CPU (default) or ``--device cuda`` (bfloat16 by default there; CUDA wall time with the device
synchronised around every timed region, peak = max-allocated memory, reset per run). The JSON and the table
name the machine, device and dtype. Writes JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fastvar_core.cost import estimate
from fastvar_core.errors import ConfigError
from fastvar_core.families import decode_tile, free_memory, get_family, resolve_pruning, sampled_decode_budget
from fastvar_core.linear import onednn_available, use_onednn
from fastvar_core.pruning import ACCELERATED_PRESETS, PRESET_NAMES, PruningConfig
from fastvar_core.pruning_request import PruningRequest
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import ScaleSchedule

from . import command
from .measure import PeakMemory, current_rss
from .randomized import (PROMPT_TOKENS, SHAPES, ModelShape, build_text_encoder, build_transformer, build_vae,
                         random_conditioning)

# Resolution names and the pixel budget of each. A family without that size class runs none there, except
# at 256 px: the head of its 1024 px schedule up to 16x16 tokens (HART; the cost curve's small end).
BUDGETS = {"256": "0.06M", "512": "0.25M", "768": "0.60M", "1024": "1M", "2K": "2K"}
HEAD_SIDES = {"256": 16}
RESOLUTIONS = tuple(BUDGETS)
QUICK = {"models": "infinity-2b,hart-0.7b", "resolutions": "256", "width": 256, "heads": 2, "depth": 4,
         "text_channels": 256, "text_depth": 1, "repeats": 3, "warmup": 1}


def bench_schedule(family: str, model, resolution: str) -> ScaleSchedule | None:
    """The 1:1 schedule ``model`` runs at ``resolution`` (None: the family has no such schedule)."""
    fam = get_family(family)
    try:
        return fam.schedule_for_template(model, 1.0, BUDGETS[resolution])
    except ConfigError:
        if resolution not in HEAD_SIDES:
            return None
    full = fam.schedule_for_template(model, 1.0, "1M")
    head = tuple(hw for hw in full.scales if max(hw) <= HEAD_SIDES[resolution])
    return replace(full, scales=head, rope_grid=head[-1])  # positions normalised to its own last map


def default_presets(resolution: str) -> list[str]:
    """off, the paper's setting for the size (``2k`` at 2K) and ``fast``."""
    return ["off", "2k" if resolution == "2K" else "paper", "fast"]


# ------------------------------------------------------------------------------------------------ running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Free what earlier runs left behind, so that each run's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages mapped; give them back so the resident size shows live memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class _WarmedUp(Exception):
    pass


@dataclass
class Case:
    """One model at one resolution, with everything its runs share."""

    key: str
    shape: ModelShape
    resolution: str
    schedule: ScaleSchedule
    schedules: dict[str, ScaleSchedule]  # the model's schedule at every resolution it has one (cost curves)
    model: torch.nn.Module
    vae: torch.nn.Module
    cond: object
    device: torch.device
    batch: int
    text_s: float  # encoding one prompt with the family's text encoder (median)
    text_peak_bytes: int  # peak memory while encoding
    text_layers: int  # the text encoder's depth (the release's unless --text-depth)

    @property
    def family(self) -> str:
        return self.shape.family

    def arch(self):
        return get_family(self.family).arch_spec(self.model.config, self.cond)

    def sample(self, config: PruningConfig, seed: int, pruning_seconds: dict | None = None, callback=None):
        """The family's scale loop itself; ``pruning_seconds`` collects the pruned sub-layers' time."""
        hooks = SamplingHooks(pruning_seconds=pruning_seconds) if pruning_seconds is not None else None
        return get_family(self.family).run_sampler(self.model, self.vae, self.cond, self.schedule, negative=None,
                                                   knobs={}, seed=seed, pruning=config, callback=callback, hooks=hooks)

    def warm_up(self, config: PruningConfig, seed: int) -> None:
        """A run stopped before its last (most expensive) scale: first calls pay for allocator growth and
        kernel set-up, which the measured runs should not."""

        def stop(step: int, total: int, preview) -> None:
            if step >= total - 1:
                raise _WarmedUp

        try:
            self.sample(config, seed, callback=stop)
        except _WarmedUp:
            pass

    def decode_tile(self, latent: torch.Tensor) -> tuple[int, int] | None:
        """The tile the Decode node picks (None: whole): the fewest decoded cells that fit the memory free now
        and the working memory of sampling this image unpruned."""
        budget = sampled_decode_budget(self.family, self.model, self.cond, self.schedule, latent)
        return decode_tile(self.family, self.vae, latent, "auto", budget)

    def decode(self, latent: torch.Tensor, tile) -> torch.Tensor:
        with torch.inference_mode():
            return self.vae.to_image(latent, tile=tile)


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far; None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (steal counts: a vCPU taken away)
    usage = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), usage.user + usage.system


def wait_for_quiet(share: float, window: float = 10.0, timeout: float = 1800.0) -> None:
    """Return once other processes used less than ``share`` of the CPU over ``window`` seconds (or after
    ``timeout``): the retry of a disturbed run should not be disturbed in the same way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_seconds()
        time.sleep(window)
        after = _cpu_seconds()
        if before is None or after is None:
            return
        if (after[0] - before[0]) - (after[1] - before[1]) < share * window * (os.cpu_count() or 1):
            return


def run_once(case: Case, config: PruningConfig, seed: int, timing: bool) -> dict:
    """One timed generation (text projection, transformer, logits, sampling; no decode).

    ``foreign_cpu`` is the share of the machine's CPU time that other processes took during the run: on
    a shared machine, threads that wait for a descheduled sibling make wall times meaningless.
    """
    release_memory(case.device)
    parts = {} if timing else None
    rss_before = current_rss() if case.device.type == "cpu" else 0
    cpu0 = _cpu_seconds()
    peaks: list[int] = []  # peak memory of each executed scale, read after it (the sampler's callback)
    with PeakMemory(case.device) as mem:
        _sync(case.device)
        t0 = time.perf_counter()
        result = case.sample(config, seed, parts, callback=lambda step, total, preview: peaks.append(_take_peak(mem)))
        _sync(case.device)
        seconds = time.perf_counter() - t0
    cpu1 = _cpu_seconds()
    foreign = None
    if cpu0 and cpu1:
        foreign = max((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), 0.0) / (seconds * (os.cpu_count() or 1))
    peak = max([mem.peak_bytes, *peaks])
    return {"seconds": seconds, "scale_seconds": dict(result.scale_seconds), "peak_bytes": peak,
            "scale_peak_bytes": dict(zip(sorted(result.scale_seconds), peaks)),
            "peak_above_start_bytes": max(peak - rss_before, 0) if rss_before else None,
            "foreign_cpu": foreign, "pruning_seconds": parts, "latent": result.latent}


def _take_peak(mem: PeakMemory) -> int:
    """The peak since the last call (CUDA max-allocated, or the polled resident size), then reset it."""
    if mem.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(mem.device)
        torch.cuda.reset_peak_memory_stats(mem.device)
        return peak
    now = current_rss()
    peak, mem.peak_bytes = max(mem.peak_bytes, now), now
    return peak


def measure_case(case: Case, presets: list[str], repeats: int, warmup: int, seed: int, log,
                 quiet_retries: int = 0, quiet_share: float = 0.05) -> list[dict]:
    """Warm-up runs, then ``repeats`` rounds over all presets; one result dict per preset.

    With ``quiet_retries`` a run during which other processes took more than ``quiet_share`` of the
    machine's CPU is run again (at most that many times; the quietest attempt is kept).
    """
    configs = {name: resolve_pruning(case.family, PruningRequest(mode=name), case.schedule, case.model.config, case.cond)
               for name in presets}
    for config in configs.values():
        for _ in range(warmup):
            case.warm_up(config, seed)
    timing_inline = case.device.type != "cuda"  # CPU timing costs nothing; on CUDA it synchronises
    runs: dict[str, list[dict]] = {name: [] for name in presets}
    load = [os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
    for round_ in range(repeats):
        for name, config in configs.items():
            run = run_once(case, config, seed, timing=timing_inline)
            for _ in range(quiet_retries):
                if run["foreign_cpu"] is None or run["foreign_cpu"] <= quiet_share:
                    break
                log(f"  round {round_ + 1}/{repeats} {name:6} {run['seconds']:8.2f} s: other processes took "
                    f"{run['foreign_cpu']:.0%} of the CPU; waiting for a quiet machine to run it again")
                wait_for_quiet(quiet_share)
                again = run_once(case, config, seed, timing=timing_inline)
                run = again if again["foreign_cpu"] < run["foreign_cpu"] else run
            foreign = "" if run["foreign_cpu"] is None else f"  others {run['foreign_cpu']:.0%} of the CPU"
            log(f"  round {round_ + 1}/{repeats} {name:6} {run['seconds']:8.2f} s  peak "
                f"{run['peak_bytes'] / 2**30:6.2f} GiB{foreign}")
            if round_ < repeats - 1:
                run.pop("latent")
            runs[name].append(run)
    load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    if not timing_inline:  # one extra, synchronised run per pruned config for the overhead share
        for name, config in configs.items():
            if config.pruned_scales:
                runs[name][-1]["pruning_seconds"] = run_once(case, config, seed, timing=True)["pruning_seconds"]

    # The decoder's work depends on the latent's size only, not on pruning: decode once per case.
    latent = runs[presets[0]][-1].pop("latent")
    for name in presets[1:]:
        runs[name][-1].pop("latent")
    release_memory(case.device)
    tile = case.decode_tile(latent)
    log(f"  decode: {'whole latent' if tile is None else f'tiles of {tile[0]} x {tile[1]} latent cells'} "
        f"({tuple(latent.shape[-2:])} latent), as the Decode node picks")
    with PeakMemory(case.device) as mem:
        _sync(case.device)
        t0 = time.perf_counter()
        case.decode(latent, tile)
        _sync(case.device)
        decode_s = time.perf_counter() - t0
    del latent
    arch = case.arch()
    scales = list(case.schedule.scales)
    guided = True  # both families guide by default (cfg != 1)
    base_cost = estimate(arch, scales, guided=guided)
    results = []
    for name, config in configs.items():
        cost = estimate(arch, scales, config, guided=guided)
        results.append(_summarise(case, name, config, runs[name], cost, base_cost, decode_s, mem.peak_bytes, load))
        results[-1]["decode_tile"] = None if tile is None else list(tile)
    base = next((r for r in results if r["pruning"] == "off"), None)
    for r in results:
        r["speedup"] = base["median_s"] / r["median_s"] if base else None
        r["efficiency"] = r["speedup"] / r["ideal_speedup"] if base else None
        r["baseline_peak_bytes"] = base["peak_bytes"] if base else None
        r["peak_reduction"] = 1 - r["peak_bytes"] / base["peak_bytes"] if base else None
        r["e2e_speedup"] = base["total_s"] / r["total_s"] if base else None
    return results


def _summarise(case, name, config, runs, cost, base_cost, decode_s, decode_peak, load) -> dict:
    times = [r["seconds"] for r in runs]
    parts: dict[str, float] = {}
    for r in runs:
        for k, v in (r["pruning_seconds"] or {}).items():
            parts[k] = parts.get(k, 0.0) + v
    total = sum(parts.values())
    per_scale = []
    for sc in cost.scales:
        secs = [r["scale_seconds"][sc.scale] for r in runs if sc.scale in r["scale_seconds"]]
        forwarded = sum(sc.forwarded) / len(sc.forwarded) if sc.forwarded else 0.0
        peaks = [r["scale_peak_bytes"][sc.scale] for r in runs if sc.scale in r["scale_peak_bytes"]]
        per_scale.append({
            "scale": sc.scale, "hw": list(sc.hw), "tokens": sc.tokens, "skipped": sc.skipped, "rows": sc.rows,
            "tokens_forwarded": forwarded * sc.rows * case.batch, "flops": sc.total_flops * case.batch,
            "seconds": statistics.median(secs) if secs else 0.0,
            "peak_bytes": int(statistics.median(peaks)) if peaks else None,
        })
    peaks = [r["peak_bytes"] for r in runs]
    above = [r["peak_above_start_bytes"] for r in runs if r["peak_above_start_bytes"] is not None]
    shape = case.shape
    return {
        "model": case.key, "model_name": shape.name, "family": case.family, "resolution": case.resolution,
        "image_size": list(case.schedule.image_size), "pruning": name, "config": config.to_dict(),
        "shape": {"depth": shape.depth, "width": shape.width, "heads": shape.heads,
                  "text_channels": shape.text_width, "ffn_hidden": case.model.config.ffn_hidden},
        "batch": case.batch, "repeats": len(runs), "times_s": times, "median_s": statistics.median(times),
        "foreign_cpu": [r["foreign_cpu"] for r in runs],
        "decode_s": decode_s, "decode_peak_bytes": decode_peak, "text_s": case.text_s,
        "text_peak_bytes": case.text_peak_bytes, "text_layers": case.text_layers,
        # end to end: text encoding + sampling (median) + decode, and the peak of all of it
        "total_s": case.text_s + statistics.median(times) + decode_s,
        "run_peak_bytes": max(case.text_peak_bytes, int(statistics.median(peaks)), decode_peak),
        "ideal_speedup": base_cost.total_flops / cost.total_flops,
        "flops": cost.total_flops * case.batch, "baseline_flops": base_cost.total_flops * case.batch,
        "tokens_forwarded": sum(s["tokens_forwarded"] for s in per_scale),
        "overhead_share": (parts["select"] + parts["restore"]) / total if total else None,
        "pruning_seconds": parts or None,
        "peak_bytes": int(statistics.median(peaks)),
        "peak_above_start_bytes": int(statistics.median(above)) if above else None,
        "load_average": load, "scales": per_scale,
    }


# ------------------------------------------------------------------------------------------------ set-up


def pick_device(name: str) -> torch.device:
    """``--device``: cpu, cuda (an error without a CUDA device) or auto (cuda when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, {build}); "
                          "install a CUDA build of PyTorch on a machine with an NVIDIA GPU, or pass --device cpu "
                          "(--device auto picks cuda when there is one)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, found {name!r}")
    return torch.device(name)


def machine_name(info: dict) -> str:
    """The machine the numbers come from: the GPU on CUDA, else the CPU model name."""
    return info.get("gpu") or info["cpu"]


def machine_info(device: torch.device, onednn: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "onednn_linear": onednn and onednn_available() and device.type == "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _check_text_fits(shape: ModelShape, depth: int | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a text encoder whose weights alone would not fit in the memory left beside the transformer."""
    with torch.device("meta"):  # counts the parameters without allocating them
        encoder = get_family(shape.family).random_text_encoder(depth)
    need = sum(p.numel() for p in encoder.parameters()) * torch.finfo(dtype).bits // 8
    free = free_memory(device)
    if free is not None and need > 0.8 * free:
        layers = encoder.model.config.num_hidden_layers
        raise ConfigError(
            f"the {encoder.source} text encoder at {layers} layers needs about {need / 2**30:.1f} GiB of weights, "
            f"but only {free / 2**30:.1f} GiB are free on {device}: pass --text-depth N "
            f"(e.g. --text-depth {max(1, int(layers * 0.6 * free / need))})"
        )


def _check_fits(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a model whose weights alone would not fit in the machine's free memory."""
    c, d = shape.width, shape.depth
    with torch.device("meta"):  # counts the parameters without allocating them
        params = sum(p.numel() for p in get_family(shape.family).random_model(shape.config).parameters())
    need = params * torch.finfo(dtype).bits // 8
    free = free_memory(device)
    if free is not None and need > 0.8 * free:
        raise ConfigError(
            f"{shape.name} at depth {d} (width {c}) needs about {need / 2**30:.1f} GiB of weights, but only "
            f"{free / 2**30:.1f} GiB are free on {device}: pass --depth N (e.g. --depth {max(1, int(d * 0.6 * free / need))})"
        )


def time_text_encoder(shape: ModelShape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                      log) -> tuple[float, int, int]:
    """(median seconds, peak bytes, layers) of encoding ``args.batch`` prompts of PROMPT_TOKENS tokens with a random-weight
    text encoder of the release (``args.text_depth`` layers), after ``args.warmup`` untimed runs."""
    encoder = build_text_encoder(shape, args.text_depth, device=device, dtype=dtype)
    layers = encoder.model.config.num_hidden_layers
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup):
        encoder.encode_random(args.batch, PROMPT_TOKENS, g)
    times, peaks = [], []
    for _ in range(args.repeats):
        release_memory(device)
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            encoder.encode_random(args.batch, PROMPT_TOKENS, g)
            _sync(device)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak_bytes)
    log(f"  text encoder {encoder.source}, {layers} layers, {encoder.token_columns(PROMPT_TOKENS)} token columns: "
        f"{statistics.median(times):.2f} s, peak {statistics.median(peaks) / 2**30:.2f} GiB")
    del encoder
    release_memory(device)
    return statistics.median(times), int(statistics.median(peaks)), layers


def build_cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, log):
    """Yield one Case per model x resolution (the model is built once per model)."""
    for key in args.models:
        if key not in SHAPES:
            raise ConfigError(f"--models: {key!r} is unknown; allowed: {sorted(SHAPES)}")
        shape = SHAPES[key].with_overrides(depth=args.depth, width=args.width, heads=args.heads,
                                           text_width=args.text_channels)
        if args.vae_base:
            if args.vae_base % 32:
                raise ConfigError(f"--vae-base {args.vae_base} must be a multiple of 32 (the VAE's GroupNorm groups)")
            shape = replace(shape, vae_base=args.vae_base)
        _check_fits(shape, device, dtype)
        model = build_transformer(shape, seed=args.seed, device=device)
        if dtype != torch.float32:
            model = get_family(shape.family).to_compute_dtype(model, dtype)
        vae = build_vae(shape, device=device)
        cond = random_conditioning(shape, batch=args.batch, device=device)
        log(f"{shape.name}: width {shape.width}, {shape.heads} heads, depth {shape.depth}, text width "
            f"{shape.text_width}, ffn {model.config.ffn_hidden}, {dtype}, {device}")
        _check_text_fits(shape, args.text_depth, device, dtype)
        with torch.inference_mode():
            text = time_text_encoder(shape, args, device, dtype, log)
        schedules = {res: s for res in RESOLUTIONS if (s := bench_schedule(shape.family, model, res)) is not None}
        for resolution in args.resolutions:
            if resolution not in schedules:
                log(f"  {resolution}: no {shape.family} schedule at this size, skipped")
                continue
            yield Case(key, shape, resolution, schedules[resolution], schedules, model, vae, cond, device, args.batch,
                       *text)
        del model, vae
        release_memory(device)


# ------------------------------------------------------------------------------------------------ report


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(results: list[dict], out=sys.stdout, machine: dict | None = None) -> None:
    """The results per model and resolution; ``machine`` (the JSON's) heads it with machine, device and dtype."""
    if machine:
        print(f"machine: {machine_name(machine)}, device {machine['device']}, {machine['dtype']}", file=out)
    cases = {}
    for r in results:
        cases.setdefault((r["model_name"], r["resolution"]), []).append(r)
    for (name, res), rows in cases.items():
        r0 = rows[0]
        s = r0["shape"]
        print(f"\n{name} (width {s['width']}, {s['heads']} heads, depth {s['depth']}, text {s['text_channels']}) "
              f"at {res} ({r0['image_size'][1]}x{r0['image_size'][0]}), batch {r0['batch']}, median of "
              f"{r0['repeats']}:", file=out)
        print(f"{'pruning':8} {'tokens':>8} {'TFLOP':>8} {'ideal':>7} {'text s':>7} {'sample s':>9} {'speedup':>8} "
              f"{'of ideal':>8} {'overhead':>8} {'decode s':>8} {'total s':>8} {'e2e':>7} {'peak GiB':>8} {'vs off':>7} "
              f"{'run peak':>8}", file=out)
        for r in rows:
            sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            e2e = "-" if r["e2e_speedup"] is None else f"{r['e2e_speedup']:.2f}x"
            eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.0%}"
            ov = "-" if r["overhead_share"] is None else f"{r['overhead_share']:.1%}"
            red = "-" if r["peak_reduction"] is None else f"{-r['peak_reduction']:+.0%}"
            text = f"{r['text_s']:.2f}"
            print(f"{r['pruning']:8} {r['tokens_forwarded']:>8.0f} {r['flops'] / 1e12:>8.2f} {r['ideal_speedup']:>6.2f}x "
                  f"{text:>7} {r['median_s']:>9.2f} {sp:>8} {eff:>8} {ov:>8} {r['decode_s']:>8.2f} {r['total_s']:>8.2f} "
                  f"{e2e:>7} {_gib(r['peak_bytes']):>8} {red:>7} {_gib(r['run_peak_bytes']):>8}", file=out)
        print(f"text s: the release's text encoder at {r0['text_layers']} layers, random weights, one prompt of "
              f"{PROMPT_TOKENS} tokens; total = text + sampling + decode; peak GiB: sampling, run peak: text, "
              "sampling or decode", file=out)
        print("per scale: seconds, tokens forwarded per layer and CFG row, CFG rows, peak GiB", file=out)
        print("  " + f"{'scale':>5} {'size':>9} " + " ".join(f"{r['pruning']:>24}" for r in rows), file=out)
        for i, sc in enumerate(r0["scales"]):
            cells = []
            for r in rows:
                x = r["scales"][i]
                fwd = x["tokens_forwarded"] / max(x["rows"] * r["batch"], 1)
                cells.append(f"{'skipped':>24}" if x["skipped"] else
                             f"{x['seconds']:>7.2f} {fwd:>6.0f} {x['rows']:>2} {_gib(x['peak_bytes']):>6}")
            print("  " + f"{sc['scale']:>5} {sc['hw'][0]:>4}x{sc['hw'][1]:<4} " + " ".join(cells), file=out)


def cost_curves(results: list[dict], cases_arch: dict) -> dict:
    """Analytic cost (TFLOP per image, both CFG rows) vs resolution for each benchmarked model.

    ``cases_arch``: (model key, family) -> (its ArchSpec, its schedule at each resolution it has one).
    """
    curves = {}
    for (key, family), (arch, schedules) in cases_arch.items():
        xs = list(schedules)
        series = {"off": [], "FastVAR": [], "fast": []}
        for res in xs:
            sched = schedules[res]
            plans = {label: PruningRequest(mode=mode).resolve(get_family(family), list(sched.scales), arch)
                     for label, mode in (("FastVAR", "2k" if res == "2K" else "paper"), ("fast", "fast"))}
            for label, cfg in (("off", None), *plans.items()):
                series[label].append(estimate(arch, list(sched.scales), cfg, guided=True).total_flops / 1e12)
        curves[key] = {"resolutions": xs, "tflops": series}
    return curves


def chart(results: list[dict], curves: dict) -> Figure:
    """Per-scale sampling time of every config for each model x resolution (bars), then each model's
    analytic cost vs resolution (lines, log scale)."""
    cases = {}
    for r in results:
        cases.setdefault((r["model_name"], r["resolution"]), []).append(r)
    panels = len(cases) + len(curves)
    fig = Figure(figsize=(11, 3 * max(panels, 1)), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0] if panels else []
    for ax, ((name, res), rows) in zip(axes, cases.items()):
        sides = [str(sc["hw"][0]) for sc in rows[0]["scales"]]
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            offset = (j - (len(rows) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(sides))], [x["seconds"] for x in r["scales"]], width,
                   label=r["pruning"])
        ax.set_xticks(range(len(sides)), sides)
        ax.set(title=f"{name} at {res}: seconds per scale", xlabel="side of the token map", ylabel="seconds")
    for ax, (key, curve) in zip(axes[len(cases):], curves.items()):
        labels = [res if res == "2K" else f"{res}px" for res in curve["resolutions"]]
        for name, tflops in curve["tflops"].items():
            ax.plot(labels, tflops, marker="o", label=name)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter("{x:g}")
        ax.set(title=f"{key}: analytic TFLOP per image vs resolution (both CFG rows)", xlabel="resolution",
               ylabel="TFLOP")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    return fig


def write_plot(results: list[dict], curves: dict, path: Path) -> None:
    """The chart as a PNG (1100 px wide, 300 px per panel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chart(results, curves).savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run (< 2 min on 2 CPU cores): " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--models", help=f"comma list of {sorted(SHAPES)} (default: all)")
    parser.add_argument("--resolutions", help=f"comma list of {list(RESOLUTIONS)} (default: 1024,2K)")
    parser.add_argument("--pruning", help="comma list of presets (default: off, paper -- 2k at 2K -- and fast); "
                        f"allowed: {list(PRESET_NAMES + ACCELERATED_PRESETS)}")
    parser.add_argument("--depth", type=int, help="layers (default: the released depth)")
    parser.add_argument("--width", type=int, help="transformer width (default: the released one)")
    parser.add_argument("--heads", type=int, help="attention heads (default: the released number)")
    parser.add_argument("--text-channels", type=int, help="text feature width (default: the released one)")
    parser.add_argument("--text-depth", type=int, help="text encoder layers (default: the released number; its time "
                        "grows about linearly with them)")
    parser.add_argument("--vae-base", type=int, help="VAE decoder base width (default: the released one)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="measured rounds; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per config, each stopped before its last scale "
                        "(default 1)")
    parser.add_argument("--quiet-retries", type=int, default=0,
                        help="run again (up to N times, each after waiting for a quiet machine) a run during which "
                        "other processes took over 5%% of the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available); default cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="compute dtype (default: bfloat16 on cuda, float32 on the cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-onednn", action="store_true",
                        help="CPU float32 dense layers on PyTorch's default kernel (MKL) instead of oneDNN")
    parser.add_argument("--json", default="out/bench/bench.json", help="where to write the results")
    parser.add_argument("--plot", default="out/bench/bench.png", help="where to write the chart")


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    quick = QUICK if args.quick else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    args.models = [m.strip() for m in str(pick("models", ",".join(SHAPES))).split(",") if m.strip()]
    args.resolutions = [r.strip() for r in str(pick("resolutions", "1024,2K")).split(",") if r.strip()]
    for res in args.resolutions:
        if res not in RESOLUTIONS:
            raise ConfigError(f"--resolutions: {res!r} is unknown; allowed: {list(RESOLUTIONS)}")
    args.presets = [p.strip() for p in args.pruning.split(",")] if args.pruning else None
    for p in args.presets or []:
        if p not in PRESET_NAMES + ACCELERATED_PRESETS:
            raise ConfigError(f"--pruning: {p!r} is unknown; allowed: {list(PRESET_NAMES + ACCELERATED_PRESETS)}")
    for name in ("depth", "width", "heads", "text_channels", "text_depth", "vae_base"):
        setattr(args, name, pick(name, None))
    args.repeats, args.warmup = pick("repeats", 3), pick("warmup", 1)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        raise ConfigError(f"--repeats ({args.repeats}) and --batch ({args.batch}) must be >= 1, --warmup >= 0")
    if args.text_depth is not None and args.text_depth < 1:
        raise ConfigError(f"--text-depth must be >= 1, found {args.text_depth}")
    args.device = str(pick_device(args.device))
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def run(args: argparse.Namespace) -> int:
    """The bench with its thread count and oneDNN setting, both restored afterwards (it may run in-process)."""
    args = _resolve_args(args)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with use_onednn(not args.no_onednn):
            return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results, arch_of = [], {}
    info = machine_info(device, not args.no_onednn)
    info.update(dtype=args.dtype, name=machine_name(info))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    log(f"bench on {machine_name(info)} ({info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch "
        f"threads), {device}, {args.dtype}, load average {load:.2f}")
    if device.type == "cpu" and load > 0.5:
        log("the CPU is busy with other work: wall times will be noisy (threads wait for each other), use medians")
    for case in build_cases(args, device, dtype, log):
        presets = args.presets or default_presets(case.resolution)
        log(f"{case.shape.name} at {case.resolution}: {case.schedule.describe()}; {', '.join(presets)}")
        with torch.inference_mode():
            results += measure_case(case, presets, args.repeats, args.warmup, args.seed, log, args.quiet_retries)
        arch_of[(case.key, case.family)] = (case.arch(), case.schedules)
    print_table(results, machine=info)
    curves = cost_curves(results, arch_of)
    report = {"machine": info, "elapsed_s": time.perf_counter() - started,
              "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "settings": {k: v for k, v in vars(args).items() if k != "func"},
              "results": results, "cost_curves": curves}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    write_plot(results, curves, Path(args.plot))
    log(f"\nwrote {json_path} and {args.plot} in {report['elapsed_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("python -m tools.bench", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
