"""`python -m tools.bench --quick` on a tiny config writes well-formed JSON and a PNG; the numbers obey the cost model.

Only a smoke run of a few seconds: real benchmarks never run inside the tests.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

from fastvar_core import families
from fastvar_core.cost import predicted_speedup
from fastvar_core.families import get_family
from fastvar_core.infinity.config import INFINITY_2B
from fastvar_core.pruning import make_preset
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import hart_schedule, infinity_schedule
from tools.bench import chart, main, print_table
from tools.randomized import SHAPES, build_transformer

REQUIRED = {"model": str, "resolution": str, "pruning": str, "median_s": float, "decode_s": float, "speedup": float,
            "ideal_speedup": float, "peak_bytes": int, "baseline_peak_bytes": int}
TINY = ["--warmup", "0", "--repeats", "1", "--width", "64", "--heads", "1", "--depth", "4", "--text-channels", "128",
        "--vae-base", "32"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--models", "infinity-2b,hart-0.7b", "--resolutions", "256", *TINY,
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_json_has_one_result_per_model_resolution_and_config(report):
    data, _ = report
    rows = [(r["model"], r["resolution"], r["pruning"]) for r in data["results"]]
    assert rows == [(m, "256", p) for m in ("infinity-2b", "hart-0.7b") for p in ("off", "paper", "fast")]
    for r in data["results"]:
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind), f"{key} = {r[key]!r} is not {kind.__name__}"
        assert r["median_s"] > 0 and r["decode_s"] > 0 and r["peak_bytes"] > 0
        assert r["baseline_peak_bytes"] == next(b["peak_bytes"] for b in data["results"]
                                                if b["model"] == r["model"] and b["pruning"] == "off")
        share = r["overhead_share"]
        assert (share is None) == (r["pruning"] == "off") and (share is None or 0 < share < 1)
    assert data["machine"]["cpu_count"] >= 1 and "torch" in data["machine"]


def test_end_to_end_total_is_the_sum_of_its_parts_and_its_speedup_is_against_the_baseline(report):
    data, _ = report
    for r in data["results"]:
        base = next(b for b in data["results"] if b["model"] == r["model"] and b["pruning"] == "off")
        assert isinstance(r["text_s"], float) and r["text_s"] > 0 and r["text_layers"] == 1  # --quick: one layer
        assert r["text_s"] == base["text_s"]  # one prompt encoded per model, whatever the pruning
        assert r["total_s"] == pytest.approx(r["text_s"] + r["median_s"] + r["decode_s"])
        assert r["e2e_speedup"] == pytest.approx(base["total_s"] / r["total_s"])
        assert r["run_peak_bytes"] == max(r["text_peak_bytes"], r["peak_bytes"], r["decode_peak_bytes"])
    assert data["machine"]["device"] == "cpu" and data["machine"]["dtype"] == "float32"
    out = io.StringIO()
    print_table(data["results"], out, machine=data["machine"])
    table = out.getvalue()
    assert table.splitlines()[0] == f"machine: {data['machine']['cpu']}, device cpu, float32"
    header = next(line for line in table.splitlines() if line.startswith("pruning"))
    assert header.split() == ["pruning", "tokens", "TFLOP", "ideal", "text", "s", "sample", "s", "speedup", "of",
                              "ideal", "overhead", "decode", "s", "total", "s", "e2e", "peak", "GiB", "vs", "off",
                              "run", "peak"]
    first = next(line for line in table.splitlines() if line.startswith("off"))
    off = next(r for r in data["results"] if r["pruning"] == "off")
    assert f"{off['total_s']:.2f}" in first.split() and first.split()[4] == f"{off['text_s']:.2f}"


def test_speedups_are_relative_to_the_baseline_and_ideal_matches_the_cost_model(report):
    data, _ = report
    models = {}
    for r in data["results"]:
        base = next(b for b in data["results"] if b["model"] == r["model"] and b["pruning"] == "off")
        assert r["speedup"] == pytest.approx(base["median_s"] / r["median_s"])
        shape = SHAPES[r["model"]].with_overrides(depth=4, width=64, heads=1, text_width=128)
        model = models.setdefault(r["model"], build_transformer(shape))
        if shape.family == "infinity":
            sched, arch = infinity_schedule(1.0, "0.06M"), replace(get_family("infinity").arch_spec(model.config),
                                                                     text_tokens=24)
        else:
            sched, arch = hart_schedule((1, 2, 3, 4, 5, 7, 9, 12, 16)), get_family("hart").arch_spec(model.config)
        config = make_preset(get_family(shape.family).presets, r["pruning"], sched.num_scales, 4)
        assert r["config"] == config.to_dict()
        assert r["ideal_speedup"] == pytest.approx(predicted_speedup(arch, list(sched.scales), config, guided=True))


def test_per_scale_rows_follow_the_schedule_and_the_config(report):
    data, _ = report
    inf_fast = next(r for r in data["results"] if r["model"] == "infinity-2b" and r["pruning"] == "fast")
    assert [tuple(s["hw"]) for s in inf_fast["scales"]] == list(infinity_schedule(1.0, "0.06M").scales)
    config = inf_fast["config"]  # 0.06M, 7 scales: prune 3 and 4, skip 5 and 6, no CFG from 3 on
    assert [s["skipped"] for s in inf_fast["scales"]] == [False] * 5 + [True] * 2
    assert [s["rows"] for s in inf_fast["scales"]][:5] == [2, 2, 2, 1, 1] and config["cfg_cutoff"] == 3
    assert all(s["seconds"] == 0 for s in inf_fast["scales"][5:])
    # tokens forwarded at scale 3 (6x6 = 36, 40 % dropped in layer 3 of 4): (36 * 3 + 22) / 4 per row, 1 row
    assert inf_fast["scales"][3]["tokens_forwarded"] == pytest.approx((36 * 3 + 22) / 4)


def test_plot_is_a_png(report):
    _, png = report
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 500


def test_chart_shows_seconds_per_scale_of_each_config_and_the_cost_curves(report):
    data, _ = report
    axes = chart(data["results"], data["cost_curves"]).axes
    assert [ax.get_title() for ax in axes] == [
        "Infinity-2B at 256: seconds per scale", "HART-0.7B at 256: seconds per scale",
        "infinity-2b: analytic TFLOP per image vs resolution (both CFG rows)",
        "hart-0.7b: analytic TFLOP per image vs resolution (both CFG rows)"]
    for ax, model in zip(axes, ("infinity-2b", "hart-0.7b")):
        rows = [r for r in data["results"] if r["model"] == model]
        assert [bars.get_label() for bars in ax.containers] == [r["pruning"] for r in rows]
        assert [[bar.get_height() for bar in bars] for bars in ax.containers] == \
            [[s["seconds"] for s in r["scales"]] for r in rows]
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(s["hw"][0]) for s in rows[0]["scales"]]
    for ax, model in zip(axes[2:], ("infinity-2b", "hart-0.7b")):
        curve = data["cost_curves"][model]
        assert {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} == curve["tflops"]
        assert ax.get_yscale() == "log" and len(ax.get_lines()[0].get_xdata()) == len(curve["resolutions"])


# ---------------------------------------------------------------- speed work and accelerations the bench measures


def test_self_attention_forms_no_score_matrix():
    """With the default backend no tensor as large as the last scale's attention score matrix is ever made;
    the explicit math backend does make one, so the check can fail."""
    import torch
    from torch.overrides import TorchFunctionMode

    from fastvar_core import attention
    from fastvar_core.infinity import sample_infinity
    from tools.randomized import random_conditioning

    class LargestOutput(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.largest = max(self.largest, out.numel())
            return out

    shape = SHAPES["infinity-2b"].with_overrides(depth=2, width=64, heads=1, text_width=128)
    model, cond = build_transformer(shape), random_conditioning(shape, tokens=5)
    sched = infinity_schedule(1.0, "0.06M")
    last = sched.tokens_per_scale[-1]
    scores = 2 * 1 * last * sum(sched.tokens_per_scale)  # CFG rows x heads x queries x keys of the last scale
    largest = {}
    for backend in ("auto", "math"):
        before = attention.default_backend()
        attention.set_default_backend(backend)
        try:
            with LargestOutput() as mode:
                sample_infinity(model, cond, sched)
        finally:
            attention.set_default_backend(before)
        largest[backend] = mode.largest
    assert largest["math"] >= scores > largest["auto"], (largest, scores)


def test_kv_cache_is_written_in_place_and_keeps_the_most_distinct_keys():
    import torch

    from fastvar_core.kvcache import KVBuffer

    cache = KVBuffer(capacity=6)
    k1, v1 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    keys, _ = cache.extend(k1, v1, keep=2)
    buffer = cache._k
    assert torch.equal(keys, k1) and keys.data_ptr() == buffer.data_ptr()
    k2 = torch.zeros(2, 1, 3, 4)
    k2[0, 0, 1] = 5.0  # row 0: token 1 is far from the scale's mean key
    k2[1, 0, 2] = -5.0  # row 1: token 2
    keys, values = cache.extend(k2, k2 + 1, keep=1)
    assert keys.shape == (2, 1, 5, 4) and cache._k is buffer  # attends to all 5, no reallocation
    assert cache.length == 3 and torch.equal(cache.k[:, :, :2], k1)
    assert torch.equal(cache.k[0, 0, 2], k2[0, 0, 1]) and torch.equal(cache.k[1, 0, 2], k2[1, 0, 2])
    assert torch.equal(cache.v[1, 0, 2], k2[1, 0, 2] + 1)  # values follow their keys
    held = cache.k.clone()
    final, _ = cache.extend(torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4), keep=0)  # last scale: not stored
    assert final.shape == (2, 1, 7, 4) and torch.equal(final[:, :, :3], held)  # 7 > 6 slots: a copy
    assert cache.k is None and cache.v is None and cache.length == 0  # the buffer is released


def test_last_scale_keys_go_in_place_where_the_buffer_has_room():
    import torch

    from fastvar_core.kvcache import KVBuffer

    cache = KVBuffer(capacity=5)
    k1 = torch.randn(2, 1, 2, 4)
    cache.extend(k1, k1 + 1, keep=2)
    buffer = cache._k
    k2 = torch.randn(1, 1, 3, 4)  # after a CFG cut-off: the leading row only
    keys, values = cache.extend(k2, k2 + 1, keep=0)
    assert keys.data_ptr() == buffer.data_ptr()  # no copy of the held keys
    assert torch.equal(keys, torch.cat((k1[:1], k2), dim=2)) and torch.equal(values, keys + 1)
    assert cache.k is None  # released: the memory lives on only in the returned keys


def test_only_the_first_layer_has_room_for_the_last_scale():
    from fastvar_core.pruning import PruningConfig, PruningRun

    tokens = [1, 4, 16, 64]
    cfg = PruningConfig(drop_ratios={3: 0.75}, cache_scale=2, layers=(1, 3))
    run = PruningRun(cfg, [(1, 1), (2, 2), (4, 4), (8, 8)], depth=3, sublayers=("sa",))
    # layers hold the 21 keys of scales 0-2; layer 0 also the last scale's 64 (unpruned), not layers 1-2
    assert run.kv_capacities(tokens, [0, 1, 2, 3]) == [85, 21, 21]
    pruned_first = PruningRun(PruningConfig(drop_ratios={3: 0.75}, cache_scale=2, layers=(0, 3)), [(1, 1), (2, 2), (4, 4), (8, 8)],
                              depth=2, sublayers=("sa",))
    assert pruned_first.kv_capacities(tokens, [0, 1, 2, 3]) == [21 + 16, 21]  # the 16 kept tokens


def test_cfg_cutoff_equals_unguided_logits_from_that_scale_with_half_the_rows():
    import torch

    from fastvar_core.infinity import sample_infinity
    from fastvar_core.pruning import PruningConfig
    from tools.randomized import random_conditioning

    shape = SHAPES["infinity-2b"].with_overrides(depth=2, width=64, heads=1, text_width=128)
    model, cond = build_transformer(shape), random_conditioning(shape, batch=2, tokens=5)
    sched = infinity_schedule(1.0, "0.06M")
    cut = PruningConfig(cfg_cutoff=5)
    rows = []
    original = model.forward_scale
    model.forward_scale = lambda x, *a, **k: rows.append(x.shape[0]) or original(x, *a, **k)
    logits = {"dropped": {}, "plain": {}}

    def recorder(name):
        return SamplingHooks(on_logits=lambda si, guided: logits[name].__setitem__(si, guided.clone()))

    sample_infinity(model, cond, sched, cfg=3.0, pruning=cut, hooks=recorder("dropped"))
    assert rows == [4] * 5 + [2] * 2
    del model.forward_scale
    sample_infinity(model, cond, sched, cfg=[3.0] * 5 + [1.0] * 2, hooks=recorder("plain"))
    assert sorted(logits["dropped"]) == sorted(logits["plain"]) == list(range(7))
    for si in range(7):
        torch.testing.assert_close(logits["dropped"][si], logits["plain"][si], atol=1e-4, rtol=1e-4)


def test_cost_model_counts_cfg_rows_and_the_kv_budget():
    from fastvar_core.cost import ArchSpec, estimate
    from fastvar_core.pruning import PruningConfig

    arch = ArchSpec(depth=1, width=4, ffn_hidden=8)
    scales = [(1, 1), (2, 2), (2, 2)]
    plain = estimate(arch, scales, guided=True)
    assert [s.rows for s in plain.scales] == [2, 2, 2]
    # scale 1 keeps 4 - floor(4 * 0.5) = 2 of its keys: scale 2 attends to 1 + 2 + 4 keys instead of 1 + 4 + 4
    budget = estimate(arch, scales, PruningConfig(cfg_cutoff=2, kv_drop_ratios={1: 0.5}), guided=True)
    assert [s.rows for s in budget.scales] == [2, 2, 1]
    assert plain.scales[2].flops["attention"] == 2 * (8 * 4 * 16 + 4 * 4 * 9 * 4)
    assert budget.scales[2].flops["attention"] == 1 * (8 * 4 * 16 + 4 * 4 * 7 * 4)
    assert budget.scales[1].flops == plain.scales[1].flops


def test_fast_preset_and_accelerated_configs_round_trip_and_validate():
    from fastvar_core.errors import ConfigError
    from fastvar_core.pruning import PruningConfig
    from fastvar_core.pruning_request import PruningRequest

    fast = make_preset(get_family("infinity").presets, "fast", 13, 32)
    assert (fast.cfg_cutoff, fast.kv_drop_ratios) == (9, {8: 0.5, 9: 0.5})  # the pruned 32x32 and 40x40 run unguided
    assert fast.drop_ratios == make_preset(get_family("infinity").presets, "paper", 13, 32).drop_ratios
    assert PruningConfig.from_json(fast.to_json()) == fast
    assert "cfg_cutoff" not in make_preset(get_family("infinity").presets, "paper", 13, 32).to_dict()  # paper JSON unchanged
    two_k = make_preset(get_family("infinity").presets, "fast", 15, 32)
    assert two_k.drop_ratios == make_preset(get_family("infinity").presets, "2k", 15, 32).drop_ratios and two_k.cfg_cutoff == 12
    infinity = get_family("infinity")
    two_k_request = PruningRequest(mode="2k", accelerate=True)
    assert families.resolve_pruning(infinity, two_k_request, infinity_schedule(1.0, "2K"), INFINITY_2B) \
        .kv_drop_ratios == two_k.kv_drop_ratios
    with pytest.raises(ConfigError, match="pruning.cfg_cutoff = 0 .*allowed: 1..12"):
        PruningConfig(cfg_cutoff=0).validate(13, 32)
    with pytest.raises(ConfigError, match=r"pruning.kv_drop_ratios\[3\] = 1.0 is outside \[0, 1\)"):
        PruningConfig(kv_drop_ratios={3: 1.0}).validate(13, 32)
    with pytest.raises(ConfigError, match="pruning.cfg_cutoff must be a scale index"):
        PruningConfig.from_dict({"cfg_cutoff": "late"})


def test_hart_fast_matches_paper_before_its_cutoff_and_runs_one_row_after():
    import torch

    from fastvar_core.hart import sample_hart
    from tools.randomized import build_vae, random_conditioning

    shape = SHAPES["hart-0.7b"].with_overrides(depth=2, width=64, heads=1, text_width=32)
    from dataclasses import replace

    model, vae = build_transformer(shape), build_vae(replace(shape, vae_base=32))
    cond = random_conditioning(shape, batch=1, tokens=4)
    sched = hart_schedule((1, 2, 3, 4, 5, 6))
    paper = sample_hart(model, cond, sched, vae=vae, pruning=make_preset(get_family("hart").presets, "paper", 6, 2))
    fast_cfg = make_preset(get_family("hart").presets, "fast", 6, 2)
    assert fast_cfg.cfg_cutoff == 4 and fast_cfg.kv_drop_ratios == {3: 0.5, 4: 0.5}
    rows = []
    original = model.forward_blocks
    model.forward_blocks = lambda x, *a, **k: rows.append(x.shape[0]) or original(x, *a, **k)
    fast = sample_hart(model, cond, sched, vae=vae, pruning=fast_cfg)
    assert rows == [2, 2, 2, 2, 1, 1]
    assert all(torch.equal(paper.tokens[s], fast.tokens[s]) for s in range(4))
    assert fast.latent.shape == paper.latent.shape and torch.isfinite(fast.latent).all()


def test_bench_restores_threads_and_onednn(monkeypatch, tmp_path):
    import torch

    import tools.bench as bench
    from fastvar_core import linear

    seen = []
    monkeypatch.setattr(bench, "_measure", lambda args: seen.append((torch.get_num_threads(), linear._enabled)) or 0)
    threads = torch.get_num_threads()
    assert main(["--quick", "--threads", str(threads + 1), "--no-onednn", *TINY, "--json", str(tmp_path / "b.json")]) == 0
    assert seen == [(threads + 1, False)]
    assert (torch.get_num_threads(), linear._enabled) == (threads, True)


def test_device_auto_picks_cuda_only_when_available_and_cuda_without_it_says_what_to_do(monkeypatch):
    from fastvar_core.errors import ConfigError
    from tools import bench

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.pick_device("auto") == bench.torch.device("cpu")
    assert bench.pick_device("cpu") == bench.torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device cuda: no CUDA device is available .*pass --device cpu"):
        bench.pick_device("cuda")
    with pytest.raises(ConfigError, match=r"--device must be cpu, cuda or auto, found 'gpu'"):
        bench.pick_device("gpu")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    assert bench.pick_device("auto") == bench.torch.device("cuda")
    assert bench.pick_device("cuda") == bench.torch.device("cuda")


def test_cuda_defaults_to_bfloat16_and_the_cpu_to_float32(monkeypatch):
    from tools import bench

    def resolved(*argv):
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        return bench._resolve_args(parser.parse_args(["--quick", *argv]))

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    args = resolved("--device", "cuda")
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert resolved("--device", "cuda", "--dtype", "float32").dtype == "float32"
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    args = resolved()
    assert (args.device, args.dtype, args.text_depth) == ("cpu", "float32", 1)


def test_bench_with_cuda_on_a_machine_without_it_fails_before_building_anything(monkeypatch, capsys):
    from tools import bench

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "build_cases", lambda *a: pytest.fail("built models before checking the device"))
    assert main(["--quick", "--device", "cuda"]) != 0
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_a_text_encoder_too_big_for_free_memory_is_refused_with_the_flag_to_pass(monkeypatch):
    from fastvar_core.errors import ConfigError
    from tools import bench

    monkeypatch.setattr(bench, "free_memory", lambda device: 2**30)  # 1 GiB free; flan-t5-xl's 24 layers: ~4.5 GiB
    with pytest.raises(ConfigError, match=r"random flan-t5-xl text encoder at 24 layers needs about 4\.\d GiB .* "
                                          r"only 1\.0 GiB are free on cpu: pass --text-depth N"):
        bench._check_text_fits(SHAPES["infinity-2b"], None, bench.torch.device("cpu"), bench.torch.float32)
    bench._check_text_fits(SHAPES["infinity-2b"], 1, bench.torch.device("cpu"), bench.torch.float32)  # ~0.4 GiB


def test_sampler_bench_ours_only_writes_times_per_config_and_the_machine(tmp_path):
    from tools import sampler_bench

    out = tmp_path / "sampler.json"
    assert sampler_bench.main(["--ours-only", "--quick", "--budget", "0.06M", "--rounds", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [row["pruning"] for row in data["rows"]] == ["off", "paper"]
    assert data["shape"] == {"width": 256, "heads": 4, "depth": 4, "text_width": 2048, "budget": "0.06M"}
    assert data["machine"]["cpu"] and data["rounds"] == 2
    for row in data["rows"]:
        assert len(row["ours"]["rounds_s"]) == 2 and row["ours"]["best_s"] == min(row["ours"]["rounds_s"])
        assert "official" not in row and "speedup_best" not in row


def test_sampler_bench_needs_both_checkouts_or_ours_only(capsys):
    from tools import sampler_bench

    with pytest.raises(SystemExit):
        sampler_bench.main(["--official-fastvar", "/nonexistent"])
    assert "--official-infinity" in capsys.readouterr().err


def test_sampler_bench_names_a_checkout_without_the_model_code(tmp_path):
    from fastvar_core.errors import ConfigError
    from tools import sampler_bench

    with pytest.raises(ConfigError, match="has no infinity/models/infinity.py"):
        sampler_bench.import_official(tmp_path, "fastvar")


def test_sampler_bench_agreement_counts_differing_bits_per_scale():
    import torch

    from tools.sampler_bench import agreement

    bits = [torch.zeros(1, 2, 2, 4, dtype=torch.long), torch.zeros(1, 4, 4, 4, dtype=torch.long)]
    flipped = [bits[0].clone(), bits[1].clone()]
    flipped[1][0, 0, 0, 0] = 1  # 1 of 64 bits
    latent = torch.zeros(1, 4, 4, 4)
    got = agreement({"bits": bits, "latent": latent}, {"bits": flipped, "latent": latent + 0.25})
    assert got["bits_differing_share_per_scale"] == [0.0, 1 / 64]
    assert got["latent_max_abs_diff"] == 0.25
    assert got["executed_scales"] == [2, 2]
