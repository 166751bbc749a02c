"""Our Infinity sampler against the official code, side by side: same weights, same text features, one process.

    python -m tools.sampler_bench --official-fastvar ~/src/FastVAR --official-infinity ~/src/Infinity [--rounds 2]

The official code is read from checkouts given on the command line (never shipped, never imported by the
pack): csguoh/FastVAR (its ``Infinity/`` folder, the pruned copy of Infinity: the FastVAR side) and
FoundationVision/Infinity (the unpruned side; the FastVAR copy has its pruning hard-wired). Both official
transformers get the weights of our random-weight model of the official benchmark shape (width 1024, 8 heads,
depth 8, text width 2048; tools/randomized.py) in the official key layout; all three runs see the same text
features, seed, cfg 3, tau 0.5, top-k 900, top-p 0.97 at 1M 1:1 (1024 px), batch 1, float32. Their optional
imports that sampling does not use (timm, cv2, torchvision, pytz) are stubbed; flash-attn, which has no CPU
build, is replaced by PyTorch's SDPA in the flash layout (upstream Infinity's own CPU path for self-attention),
in float32 (the official cross-attention's cast to bf16 is for the GPU kernel; the parity cases drop it too).
The official bit-to-code step gets a stand-in VAE quantiser with the official float32 steps.

Each round runs official then ours, unpruned and then with FastVAR (our ``paper`` preset), in one process; the
report gives the best and the median of the rounds, the ratios, and whether the sampled bits and the latent
agree (the same computation). ``--quick`` runs a small shape (width 256, 4 heads, depth 4, still 1M) as a smoke
test; without the checkouts (``--ours-only``) only our side runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvar_core.errors import ConfigError
from fastvar_core.families import get_family, resolve_pruning
from fastvar_core.infinity.loader import official_key
from fastvar_core.infinity.sampler import bits_to_codes
from fastvar_core.pruning import PruningConfig
from fastvar_core.pruning_request import PruningRequest

from .bench import machine_info
from .decode_bench import stub_module
from .randomized import SHAPES, build_transformer, random_conditioning

FULL = dict(width=1024, heads=8, depth=8, text_width=2048, budget="1M")  # the official FastVAR benchmark shape
QUICK = dict(width=256, heads=4, depth=4, text_width=2048, budget="1M")
CFG, TAU, TOP_K, TOP_P, SEED = 3.0, 0.5, 900, 0.97, 0


# ------------------------------------------------------------------------------------------------ stubs


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash-attn's call on (B, L, H, c) tensors, computed by SDPA on (B, H, L, c) views."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def _flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                     softmax_scale=None, **kwargs):
    """Packed q (Nq, H, c) against packed kv (Nk, 2, H, c), one sequence per row -> (Nq, H, c), float32.

    The official cross-attention casts float32 inputs to bf16 for the GPU kernel; on the CPU the stand-in
    computes in float32, as the parity reference cases were made (../shared/parity/README.md).
    """
    q, kv = q.float(), kv.float()
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        k, v = kv[ks:ke].unbind(1)  # (Lk, H, c) each
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           scale=softmax_scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def install_stubs() -> None:
    """Modules the official transformer imports but does not need for CPU sampling."""

    def register_model(fn):
        return fn

    class DropPath(torch.nn.Identity):
        def __init__(self, *args, **kwargs):
            super().__init__()

    stub_module("timm", __path__=[])
    stub_module("timm.models", register_model=register_model, __path__=[])
    stub_module("timm.models.layers", DropPath=DropPath, drop_path=lambda x, *a, **k: x)
    stub_module("timm.loss", SoftTargetCrossEntropy=type("SoftTargetCrossEntropy", (torch.nn.Module,), {}))
    stub_module("flash_attn", flash_attn_func=_flash_attn_func,
          flash_attn_varlen_kvpacked_func=_flash_attn_varlen_kvpacked_func)
    stub_module("cv2")
    stub_module("torchvision", __path__=[])
    stub_module("torchvision.transforms")
    stub_module("pytz", timezone=lambda name: None)


OFFICIAL_PACKAGE = "infinity"  # the official code's package name, in both checkouts


def _official_modules() -> list[str]:
    """Loaded modules of the official package."""
    return [n for n in sys.modules if n.partition(".")[0] == OFFICIAL_PACKAGE]


def import_official(root: Path, label: str):
    """The ``infinity.models.infinity`` module of a checkout (its own copy of the ``infinity`` package)."""
    if (root / "Infinity" / "infinity").is_dir():  # the root of csguoh/FastVAR
        root = root / "Infinity"
    if not (root / "infinity" / "models" / "infinity.py").is_file():
        raise ConfigError(f"{label}: '{root}' has no infinity/models/infinity.py; pass the root of the checkout")
    install_stubs()
    for name in _official_modules():
        del sys.modules[name]  # the other checkout's package of the same name
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("infinity.models.infinity")
    finally:
        sys.path.remove(str(root))
        for name in _official_modules():
            sys.modules[f"official_{label}_{name}"] = sys.modules.pop(name)


class _Quantiser:
    """What the official loop reads from ``vae.quantizer``: the bit-to-code step and the upsampling mode."""

    z_interplote_up = "trilinear"

    def __init__(self):
        self.lfq = types.SimpleNamespace(mask=None, indices_to_codes=self._codes)

    @staticmethod
    def _codes(bits, label_type="bit_label"):
        return bits_to_codes(bits)  # (B, 1, h, w, d) -> (B, d, 1, h, w)


def official_model(module, ours, quiet: bool = True):
    """The official ``Infinity`` of our model's config, with our weights (official key layout)."""
    c = ours.config
    if c.block_chunks == 1:  # the official loop walks block chunks only: one block per chunk
        c = replace(c, block_chunks=c.depth)
    vae = types.SimpleNamespace(embed_dim=c.bits, vocab_size=2**c.bits, quantizer=_Quantiser())
    kwargs = dict(vae_local=vae, text_channels=c.text_channels, text_maxlen=512, shared_aln=True, checkpointing=None,
                  customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128, use_flex_attn=False,
                  add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
                  rope2d_normalized_by_hw=2, pn="1M", apply_spatial_patchify=0, inference_mode=True,
                  train_h_div_w_list=[1.0], depth=c.depth, embed_dim=c.embed_dim, num_heads=c.num_heads,
                  mlp_ratio=4, block_chunks=c.block_chunks)
    out = sys.stdout
    if quiet:
        sys.stdout = open("/dev/null", "w")  # the constructor prints its whole config
    try:
        model = module.Infinity(**kwargs)
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = out
    state = {official_key(k, c): v.clone() for k, v in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"the official model's keys differ from ours: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False), vae


# ------------------------------------------------------------------------------------------------ runs


def run_official(model, vae, cond, scales, quiet: bool = True) -> dict:
    """One official generation; its sampled bits per executed scale and the summed codes."""
    lens = [int(n) for n in cond.lens]
    label = (cond.kv_compact, lens, cond.cu_seqlens, int(max(lens)))
    S = len(scales)
    seen = []
    quant = vae.quantizer

    def codes(bits, label_type="bit_label"):
        seen.append(bits)
        return bits_to_codes(bits)

    quant.lfq.indices_to_codes = codes
    out = sys.stdout
    if quiet:
        sys.stdout = open("/dev/null", "w")
    try:
        with torch.inference_mode():
            cpu, start = time.process_time(), time.perf_counter()
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=[(1, h, w) for h, w in scales], label_B_or_BLT=label, g_seed=SEED, B=1,
                negative_label_B_or_BLT=None, cfg_list=[CFG] * S, tau_list=[TAU] * S, top_k=TOP_K, top_p=TOP_P,
                returns_vemb=1, cfg_insertion_layer=[0], vae_type=1, ret_img=False, inference_mode=True,
                sampling_per_bits=1)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = out
    final = (1, *scales[-1])
    summed = sum(F.interpolate(bits_to_codes(b), size=final, mode="trilinear") if b.shape[2:4] != scales[-1]
                 else bits_to_codes(b) for b in seen)  # the official summed codes, rebuilt from its bits
    return {"seconds": seconds, "cpu_s": cpu, "bits": [b[:, 0] for b in seen], "latent": summed.squeeze(2)}


def run_ours(model, cond, schedule, config: PruningConfig) -> dict:
    family = get_family("infinity")
    cpu, start = time.process_time(), time.perf_counter()
    result = family.run_sampler(model, None, cond, schedule, negative=None,
                                knobs=dict(cfg=CFG, tau=TAU, top_k=TOP_K, top_p=TOP_P), seed=SEED, pruning=config,
                                callback=None, hooks=None)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "bits": [result.tokens[si].long() for si in result.executed_scales],
            "latent": result.latent, "scale_seconds": result.scale_seconds}


def agreement(theirs: dict, mine: dict) -> dict:
    """How far our bits and latent are from the official ones."""
    same_count = len(theirs["bits"]) == len(mine["bits"])
    bits = [(a != b).float().mean().item() for a, b in zip(theirs["bits"], mine["bits"])] if same_count else None
    return {"executed_scales": [len(theirs["bits"]), len(mine["bits"])],
            "bits_differing_share_per_scale": bits,
            "latent_max_abs_diff": (theirs["latent"] - mine["latent"]).abs().max().item()
            if theirs["latent"].shape == mine["latent"].shape else None}


# ------------------------------------------------------------------------------------------------ profile

# profiler op names -> what they are in the sampler (first match wins; the rest is "other")
OP_GROUPS = (
    ("linear", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::bmm")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention")),
    ("norm", ("layer_norm", "aten::norm", "aten::linalg_vector_norm", "aten::clamp_min", "aten::rsqrt")),
    ("sampling", ("multinomial", "aten::sort", "aten::topk", "aten::softmax", "aten::_softmax", "aten::cumsum",
                  "aten::masked_fill", "aten::scatter")),
    ("copy / layout", ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::index", "aten::gather",
                       "aten::index_select", "aten::empty", "aten::zeros", "aten::fill_", "aten::new_zeros",
                       "aten::index_put_", "aten::_index_put_impl_", "aten::to", "aten::_to_copy")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::gelu", "aten::exp", "aten::silu",
                     "aten::upsample", "aten::pixel", "aten::where", "aten::lt", "aten::le", "aten::amin")),
)


def op_group(name: str) -> str:
    return next((group for group, keys in OP_GROUPS if any(k in name for k in keys)), "other")


def profile_ours(model, cond, schedule, config: PruningConfig) -> dict:
    """One run of our sampler under torch.profiler: self CPU seconds per op group and per scale, and the
    ten heaviest ops."""
    from torch.profiler import ProfilerActivity, profile

    marks = []  # perf_counter at the end of each executed scale
    family = get_family("infinity")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        result = family.run_sampler(model, None, cond, schedule, negative=None,
                                    knobs=dict(cfg=CFG, tau=TAU, top_k=TOP_K, top_p=TOP_P), seed=SEED,
                                    pruning=config, callback=lambda *a: marks.append(time.perf_counter()),
                                    hooks=None)
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    base_us = min(e.time_range.start for e in events)
    # scale boundaries on the profiler's clock: its events start at base_us ~ our ``start``
    bounds = [(m - start) * 1e6 + base_us for m in marks]
    executed = result.executed_scales
    per_scale = {si: {} for si in executed}
    totals: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for e in events:
        t = e.self_cpu_time_total / 1e6
        if t <= 0:
            continue
        group = op_group(e.name)
        totals[group] = totals.get(group, 0.0) + t
        by_op[e.name] = by_op.get(e.name, 0.0) + t
        idx = next((i for i, b in enumerate(bounds) if e.time_range.start <= b), len(bounds) - 1)
        row = per_scale[executed[idx]]
        row[group] = row.get(group, 0.0) + t
    return {"pruning": config.name, "wall_s": wall, "self_cpu_s": totals,
            "scale_wall_s": {str(si): result.scale_seconds[si] for si in executed},
            "scale_self_cpu_s": {str(si): per_scale[si] for si in executed},
            "scales": {str(si): list(schedule.scales[si]) for si in executed},
            "top_ops": sorted(by_op.items(), key=lambda kv: -kv[1])[:12]}


def gemm_throughput(rows: int, width: int, ffn: int, repeats: int = 3) -> list[dict]:
    """GFLOP/s of this CPU's float32 products at the shapes the block's linears run (best of ``repeats``),
    through our dense layer (oneDNN) and through ``F.linear`` (MKL)."""
    from fastvar_core.linear import linear, use_onednn

    out = []
    for name, k, n in (("qkv", width, 3 * width), ("proj", width, width), ("fc1", width, ffn), ("fc2", ffn, width)):
        x, w, b = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.zeros(n)
        row = {"op": name, "shape": [rows, k, n]}
        for label, onednn in (("onednn", True), ("mkl", False)):
            with use_onednn(onednn), torch.inference_mode():
                linear(x, w, b)
                best = math.inf
                for _ in range(repeats):
                    t = time.perf_counter()
                    linear(x, w, b)
                    best = min(best, time.perf_counter() - t)
            row[f"{label}_gflops"] = 2 * rows * k * n / best / 1e9
        out.append(row)
    return out


def _summary(seconds: list[float]) -> dict:
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "rounds_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sampler_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-fastvar", type=Path, help="checkout of csguoh/FastVAR (the FastVAR side)")
    parser.add_argument("--official-infinity", type=Path, help="checkout of FoundationVision/Infinity (unpruned side)")
    parser.add_argument("--ours-only", action="store_true", help="run only our sampler (no checkouts needed)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--quick", action="store_true", help="small shape (width 256, 4 heads, depth 4): a smoke test")
    parser.add_argument("--budget", help="pixel budget at 1:1 (default 1M, the official benchmark's)")
    parser.add_argument("--profile", action="store_true",
                        help="profile our sampler (per scale and op group) and this CPU's GEMM throughput instead")
    parser.add_argument("--json", type=Path, help="default: docs/bench/sampler-vs-official-1024.json "
                        "(--profile: docs/bench/sampler-profile-1024.json)")
    args = parser.parse_args(argv)
    if args.profile:
        args.ours_only = True
    if args.json is None:
        args.json = Path("docs/bench/sampler-profile-1024.json" if args.profile
                         else "docs/bench/sampler-vs-official-1024.json")
    if not args.ours_only and (args.official_fastvar is None or args.official_infinity is None):
        parser.error("give --official-fastvar and --official-infinity (checkouts), or --ours-only")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    size = dict(QUICK if args.quick else FULL)
    if args.budget:
        size["budget"] = args.budget
    shape = SHAPES["infinity-2b"].with_overrides(depth=size["depth"], width=size["width"], heads=size["heads"],
                                                 text_width=size["text_width"])
    ours = build_transformer(shape)
    cond = random_conditioning(shape)
    family = get_family("infinity")
    schedule = family.schedule_for_template(ours, 1.0, size["budget"])
    configs = {name: resolve_pruning("infinity", PruningRequest(mode=name), schedule, ours.config, cond)
               for name in ("off", "paper")}
    if args.profile:
        return profile_main(args, size, ours, cond, schedule, configs)
    officials = {}
    if not args.ours_only:
        for side, root in (("off", args.official_infinity), ("paper", args.official_fastvar)):
            officials[side] = official_model(import_official(root, "fastvar" if side == "paper" else "infinity"), ours)
    print(f"shape: width {size['width']}, {size['heads']} heads, depth {size['depth']}, text {size['text_width']}, "
          f"{size['budget']} 1:1 ({len(schedule.scales)} scales, final {schedule.scales[-1]}), cfg {CFG}, batch 1, "
          f"float32, {torch.get_num_threads()} threads")
    times = {name: {"official": [], "ours": [], "official_cpu": [], "ours_cpu": []} for name in configs}
    checks = {}
    for r in range(args.rounds):
        for name, config in configs.items():
            if name in officials:
                theirs = run_official(*officials[name], cond, schedule.scales)
                times[name]["official"].append(theirs["seconds"])
                times[name]["official_cpu"].append(theirs["cpu_s"])
            mine = run_ours(ours, cond, schedule, config)
            times[name]["ours"].append(mine["seconds"])
            times[name]["ours_cpu"].append(mine["cpu_s"])
            if name in officials and name not in checks:
                checks[name] = agreement(theirs, mine)
            line = f"round {r + 1} {name}: ours {mine['seconds']:.2f} s ({mine['cpu_s']:.1f} CPU s)"
            if name in officials:
                line += f", official {theirs['seconds']:.2f} s ({theirs['cpu_s']:.1f} CPU s)"
            print(line, flush=True)
    rows = []
    for name in configs:
        row = {"pruning": name, "ours": _summary(times[name]["ours"]), "ours_cpu_s": times[name]["ours_cpu"]}
        if name in officials:
            row["official"] = _summary(times[name]["official"])
            row["official_cpu_s"] = times[name]["official_cpu"]
            row["speedup_best"] = row["official"]["best_s"] / row["ours"]["best_s"]
            row["speedup_median"] = row["official"]["median_s"] / row["ours"]["median_s"]
            row["agreement"] = checks[name]
            print(f"{name}: official {row['official']['best_s']:.2f} s, ours {row['ours']['best_s']:.2f} s (best of "
                  f"{args.rounds}) -> {row['speedup_best']:.2f}x; median {row['speedup_median']:.2f}x; "
                  f"agreement {checks[name]}")
        rows.append(row)
    out = {"machine": machine_info(torch.device("cpu"), True), "shape": size, "cfg": CFG, "tau": TAU, "top_k": TOP_K,
           "top_p": TOP_P, "seed": SEED, "rounds": args.rounds, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


def profile_main(args, size, ours, cond, schedule, configs) -> int:
    rows = []
    for name, config in configs.items():
        row = profile_ours(ours, cond, schedule, config)
        total = sum(row["self_cpu_s"].values())
        print(f"{name}: wall {row['wall_s']:.2f} s, profiled self CPU {total:.2f} s: " + ", ".join(
            f"{g} {t:.2f} s ({t / total:.0%})" for g, t in sorted(row["self_cpu_s"].items(), key=lambda kv: -kv[1])))
        for si, groups in row["scale_self_cpu_s"].items():
            print(f"  scale {si:>2} {row['scales'][si]}: wall {row['scale_wall_s'][si]:.3f} s; " + ", ".join(
                f"{g} {t:.3f}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])[:4]))
        rows.append(row)
    h, w = schedule.scales[-1]
    gemm = gemm_throughput(2 * h * w, ours.config.embed_dim, ours.config.ffn_hidden)
    for g in gemm:
        print(f"GEMM {g['op']} {g['shape']}: oneDNN {g['onednn_gflops']:.0f} GFLOP/s, MKL {g['mkl_gflops']:.0f} GFLOP/s")
    out = {"machine": machine_info(torch.device("cpu"), True), "shape": size, "rows": rows, "gemm": gemm}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
