"""The Family interface (docs/architecture.md §2): registry, shared checks, and a third family run unchanged
through the Pipeline and the ComfyUI nodes (docs/architecture.md §4)."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from pack import load_pack
from toy_family import ToyConditioning, ToyModel, ToyTextEncoder, ToyVAE, register_toy

from fastvar_core import families
from fastvar_core.errors import ConfigError
from fastvar_core.pipeline import Pipeline
from fastvar_core.pruning_request import PruningRequest
from fastvar_core.sampling import SamplingHooks

PACK = load_pack()


def pack_module(name: str):
    return importlib.import_module(f"{PACK.__name__}.{name}")


@pytest.fixture
def toy():
    """The toy family registered in the library's registry and in the pack's copy of it; removed afterwards."""
    copies = [families, pack_module("fastvar_core.families")]
    registered = [register_toy(f) for f in copies]
    yield registered[0]
    for f in copies:
        f.FAMILIES.pop("toy", None)


def test_registry_lists_the_builtin_families_first_and_refuses_unknown_names():
    assert families.family_names()[:2] == ["infinity", "hart"]
    assert families.get_family("hart").label == "HART"
    assert families.get_family(families.get_family("infinity")) is families.get_family("infinity")
    with pytest.raises(ConfigError, match=r"model family 'sd' is unknown; allowed: \['infinity', 'hart'"):
        families.get_family("sd")


def test_top_k_meaning_is_the_familys():
    hart, infinity = families.get_family("hart"), families.get_family("infinity")
    assert [hart.sampler_top_k(k) for k in (None, 0, 900, 50)] == [None, None, None, 50]
    assert [infinity.sampler_top_k(k) for k in (None, 0, 900, 50)] == [None, 0, 900, 50]


def test_decode_tiling_rule_is_written_once():
    infinity, hart = families.get_family("infinity"), families.get_family("hart")
    vae16, vae8 = (SimpleNamespace(config=SimpleNamespace(patch_size=p)) for p in (16, 8))
    assert infinity.decode_tile(vae16, torch.zeros(1, 32, 64, 64)) is None
    assert infinity.decode_tile(vae16, torch.zeros(1, 32, 64, 128)) == 64
    assert infinity.decode_tile(vae8, torch.zeros(1, 32, 128, 128)) is None  # 8B: twice the token map
    assert hart.decode_tile(None, torch.zeros(1, 32, 65, 64)) == 64
    with pytest.raises(ConfigError, match="tiling must be one of"):
        families.decode("hart", None, torch.zeros(1, 32, 4, 4), "sometimes")


def test_decode_tile_from_a_memory_budget():
    # Infinity cost model, widths (8, 16, 32, 32), patch 8 (levels at 8x, 4x, 2x, 1x the latent), float32 on the
    # CPU (banded). Per tile cell the fine levels peak in level 0's first block: its input (16 ch x 64 px) and
    # conv1's output (8 ch x 64 px): 1536 values, 6144 bytes. Beside the tiles: the coarse output (32 ch at 4x:
    # 512 values a latent cell) and the float32 image (3 x 64), and three row bands of 64 MiB.
    vae = SimpleNamespace(config=SimpleNamespace(base_ch=8, ch_mult=(1, 2, 4, 4), patch_size=8))
    latent = torch.zeros(1, 32, 128, 96)
    per_cell, bands = 6144, 3 * 64 * 2**20
    fixed = bands + (512 + 192) * 4 * 128 * 96

    def tile(budget):
        return families.decode_tile("infinity", vae, latent, "auto", budget)

    assert families.decode_memory("infinity", vae, latent, None) == per_cell * 128 * 96 + bands
    assert tile(per_cell * 128 * 96 + bands) is None  # the whole latent fits: untiled
    # Side 128 in 1, 2, 3, 4, 5 tiles sharing 8 cells: 128, 68, 48, 38, 32 (the minimum); side 96: 96, 52, 38.
    # Just too little: two 68 x 96 strips decode 13056 cells, 128 x 52 ones 13312, 2 x 2 tiles of 68 x 52 14144.
    assert tile(per_cell * 128 * 96 + bands - 1) == (68, 96) and tile(per_cell * 68 * 96 + fixed) == (68, 96)
    # 68 x 96 no longer fits: 3 strips of 48 x 96 (13824 cells) beat 2 x 2 tiles of 68 x 52 (14144)
    assert tile(per_cell * 68 * 96 + fixed - 1) == (48, 96)
    # 48 x 96 (4608 cells) does not fit: 2 x 2 of 68 x 52 (14144) beat 4 strips of 38 x 96 (14592)
    assert tile(per_cell * 48 * 96 + fixed - 1) == (68, 52)
    assert tile(0) == (families.MIN_TILE, families.MIN_TILE) == (32, 32)  # impossible: the minimum
    budgets = [fixed + extra for extra in (3 * 10**7, 2 * 10**7, 10**7)]
    tiles = [tile(b) for b in budgets]
    assert [t[0] * t[1] for t in tiles] == sorted(t[0] * t[1] for t in tiles)[::-1]  # a smaller budget, a smaller tile
    for budget in budgets:  # ... whose predicted memory fits
        assert families.decode_memory("infinity", vae, latent, "auto", budget) <= budget
    # the coarse levels on the whole latent (level 2's up-sampling: 32 ch x (4 + 16) values a cell) bound a small tile
    assert families.decode_memory("infinity", vae, latent, 1) == max(640 * 4 * 128 * 96, per_cell + fixed)
    assert families.decode_tile("infinity", vae, torch.zeros(1, 32, 30, 30), "auto", 0) is None  # below one tile
    # Where the decoder runs the plain ops (a GPU, or not float32): level 0's first block holds its input, its
    # normalised copy and conv1's output, 40 values x 64 px a cell; the tile follows the device the decode runs on.
    plain = 40 * 64 * 4
    assert families.decode_memory("infinity", vae, latent, None, device="meta") == plain * 128 * 96 + bands
    assert families.decode_tile("infinity", vae, latent, "auto", plain * 68 * 96 + fixed, device="meta") == (68, 96)
    assert families.decode_tile("infinity", vae, latent, "auto", plain * 68 * 96 + fixed - 1, device="meta") == (48, 96)
    bf16 = SimpleNamespace(config=vae.config, compute_anchor=torch.empty(0, dtype=torch.bfloat16))
    assert families.decode_memory("infinity", bf16, latent, None) == plain * 128 * 96 + bands  # bf16 on the CPU
    # no budget: the fixed rule; explicit tilings ignore the budget
    assert families.decode_tile("infinity", SimpleNamespace(config=SimpleNamespace(patch_size=16)), latent) == 64
    assert families.decode_tile("infinity", vae, latent, "off", 0) is None
    assert families.decode_tile("infinity", vae, latent, "on", 0) == families.TILE
    assert families.decode_tile("infinity", vae, latent, (40, 96), 0) == (40, 96)
    # HART, widths (8, 8, 16), downsample 4: the coarse part (top level, its up-sampling, level 1's blocks) runs
    # on the whole latent, peaking in level 1's first block: 16 ch in and 8 out, x 4 px: 96 values (384 bytes) a
    # cell. Per tile: level 0's blocks, 2 maps of 8 ch x 16 px (1024 bytes a cell), beside the coarse output (8 ch
    # at 2x: 32 values a cell) and the float32 image (3 x 16 a cell).
    hart_vae = SimpleNamespace(config=SimpleNamespace(ch=8, ch_mult=(1, 1, 2), downsample=4))
    square = torch.zeros(1, 32, 128, 128)
    per_cell = 1024
    held = (32 + 3 * 16) * 4 * 128 * 128
    assert families.decode_memory("hart", hart_vae, square, 68) == per_cell * 68**2 + held + bands
    assert families.decode_memory("hart", hart_vae, square, (68, 128)) == per_cell * 68 * 128 + held + bands
    assert families.decode_memory("hart", hart_vae, square, None) == per_cell * 128**2 + bands
    coarse = 384 * 128 * 128  # above a 16 x 16 tile's fine part and what is held beside it
    assert families.decode_memory("hart", hart_vae, square, 16) == coarse + bands
    assert families.decode_tile("hart", hart_vae, square, "auto", per_cell * 68 * 128 + held + bands) == (68, 128)
    assert families.decode_tile("hart", hart_vae, square, "auto", per_cell * 68 * 128 + held + bands - 1) == (48, 128)


def test_the_decode_budget_is_the_smaller_of_free_and_unpruned_sampling_less_the_allocators_slack():
    slack = families.DECODE_SLACK_BYTES
    assert families.decode_budget(None, None) is None
    assert families.decode_budget(5 * 2**30, None) == 5 * 2**30 - slack
    assert families.decode_budget(5 * 2**30, 2 * 2**30) == 2 * 2**30 - slack
    assert families.decode_budget(None, 2 * 2**30) == 2 * 2**30 - slack
    assert families.decode_budget(2**20, 2 * 2**30) == 0  # nothing fits: the smallest tile


def test_a_third_family_runs_through_the_pipeline(toy):
    pipe = Pipeline.load("toy", "nowhere", "nowhere", "nowhere", device="cpu")
    assert pipe.spec is toy and pipe.depth == 2
    images, result = pipe.generate("a toy", "not this", width=64, height=48, pruning="paper", seed=3,
                                   hooks=SamplingHooks(record_kept=True))
    assert images.shape == (1, 48, 64, 3) and torch.isfinite(images).all()
    assert result.schedule.scales == ((1, 1), (2, 2), (3, 3), (3, 4)) and result.pruning.name == "paper"
    assert {s for (s, _, _) in result.kept} == {3}  # the preset's last scale, half its tokens
    again, _ = pipe.generate("a toy", "not this", width=64, height=48, pruning="paper", seed=3)
    assert torch.equal(images, again)


def test_the_pipeline_decodes_within_the_budget_the_decode_node_uses(toy, monkeypatch):
    """Pipeline.decode("auto") caps the decode at what sampling the image unpruned needs (also after a pruned
    run) and at the memory free on the latent's device, each less the allocator's slack; explicit tilings have
    no budget."""
    budgets = []
    decode = families.decode
    monkeypatch.setattr(families, "decode", lambda *a, budget=None, **k: budgets.append(budget) or decode(*a, **k))
    pipe = Pipeline.load("toy", "nowhere", "nowhere", "nowhere", device="cpu")
    cond, _ = pipe.encode(["a toy"])
    schedule = pipe.schedule(64, 48)
    result = pipe.sample(cond, schedule, pruning="paper", seed=3)
    unpruned = families.sampling_memory("toy", pipe.model, None, schedule, score_matrices=False).total
    pruned = families.sampling_memory("toy", pipe.model, None, schedule, score_matrices=False, plan=result.pruning)
    assert pruned.total < unpruned
    monkeypatch.setattr(families, "DECODE_SLACK_BYTES", 0)  # the toy's estimates are far below the real slack
    monkeypatch.setattr(families, "free_memory", lambda device: 1 << 40)  # plenty free: the sampler's bound
    pipe.decode(result)
    monkeypatch.setattr(families, "free_memory", lambda device: unpruned // 2)  # little free: the free memory
    pipe.decode(result)
    pipe.decode(result, "off")
    assert budgets == [unpruned, unpruned // 2, None]


def test_the_tools_build_random_weight_parts_of_a_third_family(toy):
    from tools.bench import bench_schedule
    from tools.randomized import build_transformer, build_vae, random_conditioning, released_shapes

    shape = released_shapes()["toy"].with_overrides(depth=3, width=16)
    assert (shape.depth, shape.width, shape.heads, shape.text_width) == (3, 16, 1, 4)
    model, vae, cond = build_transformer(shape), build_vae(shape), random_conditioning(shape, batch=2, tokens=3)
    schedule = bench_schedule("toy", model, "256")
    result = families.sample("toy", model, cond, schedule, pruning=PruningRequest(mode="paper"), seed=1)
    assert families.decode("toy", vae, result.latent).shape == (2, *schedule.image_size, 3)
    with pytest.raises(ConfigError, match="one head only"):
        shape.with_overrides(heads=2)


@pytest.mark.parametrize("pruning", ["paper", "fast", "hand-built"])
def test_a_plan_is_validated_exactly_once_per_run(toy, monkeypatch, pruning):
    from fastvar_core.pruning import PruningConfig

    if pruning == "hand-built":
        pruning = PruningConfig({3: 0.5}, cache_scale=1, layers=(0, 2))
    calls = []
    original = PruningConfig.validate
    monkeypatch.setattr(PruningConfig, "validate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    pipe = Pipeline.load("toy", "nowhere", "nowhere", "nowhere", device="cpu")
    pipe.generate("a toy", width=64, height=48, pruning=pruning, seed=3)
    assert calls == [1]


def test_shared_checks_hold_for_a_third_family(toy):
    pipe = Pipeline("toy", ToyModel(), ToyVAE(), ToyTextEncoder())
    schedule = pipe.schedule()
    bad = ToyConditioning(torch.full((1, 2, 4), float("nan")))
    with pytest.raises(ConfigError, match="text conditioning contains NaN"):
        pipe.sample(bad, schedule)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        pipe.sample(pipe.encode(["x"])[0], schedule, seed=-1)
    broken = ToyModel()
    with torch.no_grad():
        broken.codebook.fill_(float("nan"))
    with pytest.raises(ConfigError, match="scale 1: the model produced NaN or Inf logits"):
        Pipeline("toy", broken, ToyVAE()).sample(pipe.encode(["x"])[0], schedule)


def test_the_shared_path_checks_every_familys_latent(toy, monkeypatch):
    pipe = Pipeline("toy", ToyModel(), ToyVAE(), ToyTextEncoder())
    run = type(toy).run_sampler

    def nan_latent(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        result.latent[0, 0, 0, 0] = float("nan")
        return result

    monkeypatch.setattr(type(toy), "run_sampler", nan_latent)
    with pytest.raises(ConfigError, match=r"the sampled latent contains NaN or Inf \(first at index"):
        pipe.generate("x")


def test_a_third_family_runs_through_the_nodes_unchanged(toy):
    generation, objects = pack_module("nodes.generation"), pack_module("nodes.objects")
    compat = pack_module("nodes.compat")

    def Part(family, module, source):
        return objects.Part(family, module, source, compat.patcher(module, compat.DIFFUSION))

    encoder = Part("toy", ToyTextEncoder(), "toy")
    positive, negative = generation.TextEncode().encode(encoder, "a toy", "not this")
    (spec,) = generation.FastVARPruning().build("paper", 2.0, 5, -1, -1, "Infinity-2B 1024px")
    out = generation.FastVARSampler().sample(
        Part("toy", ToyModel(), "toy"), positive, seed=3, width=64, height=48, aspect_ratio="from width/height",
        pixel_budget="auto", cfg=2.0, tau=0.5, top_k=0, top_p=0.0, batch_size=2, negative=negative, pruning=spec)
    latent, info = out["result"]
    assert info.startswith("toy 64x48 (4 scales), pruning paper")
    (image,) = generation.FastVARDecode().decode(Part("toy", ToyVAE(), "toy"), latent, "auto")
    assert image.shape == (2, 48, 64, 3)
    maps, mask = generation.FastVARTokenMap().render(latent, -1, "attention", 0)
    assert maps.shape == (1, 48, 64, 3) and 0 < float(mask.mean()) < 1
    # The same request through the Pipeline gives the same pixels: one shared path.
    pipe = Pipeline("toy", ToyModel(), ToyVAE(), ToyTextEncoder())
    images, _ = pipe.generate("a toy", "not this", width=64, height=48, pruning="paper", seed=3, cfg=2.0, batch=2)
    assert torch.equal(images, image.cpu())


def test_front_doors_speak_only_to_the_family_interface():
    """No node or tool imports a family folder; no family-name branch outside the family folders (issue #13).

    Some tools write or load the official files or code of one family on purpose: tiny_models (Infinity checkpoint
    keys), comfy_ops_check and fp8_effect (the loaders' ``operations=``), sampler_bench (the official Infinity
    code beside ours, fed our weights through the loader's key map).
    """
    branch = re.compile(r"\bfamily\s*(==|!=|in\s*\()|\.family\s*(==|!=)|(==|!=)\s*[\"'](infinity|hart)[\"']"
                        r"|[\"'](infinity|hart)[\"']\s*(==|!=)")
    family_import = re.compile(r"fastvar_core\.(infinity|hart)\b|fastvar_core import (infinity|hart)")
    official_files = ("tools/tiny_models.py", "tools/comfy_ops_check.py", "tools/fp8_effect.py",
                      "tools/sampler_bench.py")
    offenders = []
    for path in sorted([*ROOT.joinpath("nodes").glob("*.py"), *ROOT.joinpath("tools").glob("*.py"),
                        *ROOT.joinpath("fastvar_core").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("fastvar_core/infinity/", "fastvar_core/hart/")):
            continue
        text = path.read_text(encoding="utf-8")
        if branch.search(text):
            offenders.append(rel)
        if rel.startswith(("nodes/", "tools/")) and rel not in official_files and family_import.search(text):
            offenders.append(f"{rel} imports a family folder")
    assert offenders == []


@pytest.mark.parametrize("name", ["infinity", "hart"])
def test_declared_defaults_are_the_samplers(name):
    """Family.defaults documents what a None knob gets: the scale loop's own defaults."""
    import inspect

    sampler = {"infinity": "fastvar_core.infinity.sampler:sample_infinity", "hart": "fastvar_core.hart.sampler:sample_hart"}
    module, func = sampler[name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
    family = families.get_family(name)
    for knob, value in family.defaults.items():
        if value is None and knob not in params:
            continue  # a knob the family does not have (HART: tau)
        assert params[knob].default == value, knob
