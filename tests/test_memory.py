"""ComfyUI-managed memory (issue #14), checked without ComfyUI: every part is held by a patcher of its kind and
reaches its device only through compat.load_models with the library's working-memory estimate; fp8 storage;
one shared HART VAE; kept tokens recorded only for a Token Map node."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PARITY, SHARED
from pack import load_pack
from toy_family import register_toy

from fastvar_core import families as lib_families
from fastvar_core.cost import DECODE_BANDS_BYTES, ArchSpec, decode_memory, estimate, sampling_memory
from fastvar_core.pruning import PruningConfig

PACK = load_pack()
ROOT = Path(__file__).resolve().parents[1]


def _mod(name):
    return sys.modules[f"{PACK.__name__}.nodes.{name}"]


# ---- the estimates (cost.py) -------------------------------------------------------------------

ARCH = ArchSpec(depth=4, width=64, ffn_hidden=256, heads=4, head_outputs=32)
SCALES = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
PRUNED = PruningConfig(name="p", drop_ratios={4: 0.75, 3: 0.5}, cache_scale=2, layers=(0, 4))


def test_sampling_memory_grows_with_batch_and_size_and_falls_with_pruning():
    base = sampling_memory(ARCH, SCALES)
    assert sampling_memory(ARCH, SCALES, batch=2).total == 2 * base.total
    assert sampling_memory(ARCH, SCALES + [(32, 32)]).total > base.total
    pruned = sampling_memory(ARCH, SCALES, PRUNED)
    assert pruned.activation_bytes < base.activation_bytes and pruned.total < base.total


@pytest.mark.parametrize("config", [None, PRUNED])
@pytest.mark.parametrize("batch", [1, 3])
def test_sampling_memory_kv_term_is_the_cost_model_kv_cache_of_every_row(config, batch):
    """The cost model's KV cache without the last scale's keys, which are never stored: 16x16 = 256 tokens
    in each of the 4 layers, 64 with PRUNED (its 75 % drop), 64 wide, keys and values of 4 bytes."""
    final = 2 * 4 * (256 if config is None else 64) * 64 * 4
    kv = estimate(ARCH, SCALES, config).kv_cache_bytes - final
    assert sampling_memory(ARCH, SCALES, config, batch=batch).kv_cache_bytes == kv * 2 * batch
    assert sampling_memory(ARCH, SCALES, config, batch=batch, guided=False).kv_cache_bytes == kv * batch


def test_sampling_memory_holds_the_restore_cache_from_the_cache_scale_on():
    """Each pruned layer keeps every sub-layer's output at the cache scale (4x4) to the end: cross-attention
    (text tokens) adds one sub-layer per layer, 2 rows x 4 layers x 16 tokens x 64 wide x 4 bytes; no
    pruning, no restore cache."""
    text = dataclasses.replace(ARCH, text_tokens=8)
    gap = sampling_memory(text, SCALES, PRUNED).activation_bytes - sampling_memory(ARCH, SCALES, PRUNED).activation_bytes
    assert gap == 2 * 4 * 16 * 64 * 4
    assert sampling_memory(text, SCALES).activation_bytes == sampling_memory(ARCH, SCALES).activation_bytes


def test_sampling_memory_counts_room_for_the_last_scales_keys_not_a_copy_of_the_held_ones():
    """Scale 3 keeping 32 of its 64 keys: every layer stores 32 fewer (2 rows, 64 wide, 4 bytes); the last
    scale's extra is the first layer's room for its own keys, not a copy of held ones, so it is the same."""
    fewer = PruningConfig(name="kv", kv_drop_ratios={3: 0.5})
    full = sampling_memory(ARCH, SCALES, score_matrices=False)
    dropped = sampling_memory(ARCH, SCALES, fewer, score_matrices=False)
    assert full.activation_bytes == dropped.activation_bytes
    assert full.kv_cache_bytes - dropped.kv_cache_bytes == 2 * 2 * 4 * 32 * 64 * 4


def test_sampling_memory_counts_the_last_scale_extra_work():
    plain = sampling_memory(ARCH, SCALES)
    head = sampling_memory(ArchSpec(**{**ARCH.__dict__, "last_scale_values_per_token": 4096}), SCALES)
    assert head.activation_bytes > plain.activation_bytes and head.kv_cache_bytes == plain.kv_cache_bytes


def test_sampling_memory_counts_the_largest_step_of_a_scale_not_the_sum_of_them():
    """At the last scale (256 tokens, 64 wide, float32, 2 rows) beside the residual stream (65536 bytes a row)
    and the first layer's room for its keys and values (131072): the self-attention's 7 hidden-sized tensors
    (458752) outweigh the FFN (normalised input, output, 256 hidden: 393216) and the logits (32 a token: 32768).
    HART's diffusion head (4096 values a token) outweighs them all, by the chunk it runs at once."""
    stream, room = 4 * 256 * 64, 2 * 4 * 256 * 64
    assert sampling_memory(ARCH, SCALES, score_matrices=False).activation_bytes == 2 * (stream + 458752 + room)
    diffusion = dataclasses.replace(ARCH, last_scale_values_per_token=4096)
    assert sampling_memory(diffusion, SCALES, score_matrices=False).activation_bytes == 2 * (stream + 4 * 256 * 4096 + room)
    chunked = dataclasses.replace(diffusion, last_scale_chunk=64)
    assert sampling_memory(chunked, SCALES, score_matrices=False).activation_bytes == 2 * (stream + 4 * 64 * 4096 + room)
    # In bfloat16 with Infinity's attention (4 tensors in the compute dtype, 5 in float32 whatever it is): the
    # stream and the room halve (32768, 65536), the attention is (2 x 4 + 4 x 5) bytes x 256 x 64 = 458752.
    bf16 = dataclasses.replace(ARCH, dtype_bytes=2, attention_hidden=4, attention_float32=5)
    assert sampling_memory(bf16, SCALES, score_matrices=False).activation_bytes == 2 * (32768 + 458752 + 65536)


def test_sampling_memory_counts_the_heads_logits_whole_or_a_chunk_at_a_time():
    """4096 logits a token: the head (two logit-sized float32 tensors a row, 2 x 4 x 2 rows x 256 x 4096 bytes)
    outweighs the attention at the last scale; where the head runs in chunks (HART on the CPU) it holds two
    copies of a chunk (65536 logits) and the attention (2 x 458752) is the peak again."""
    stream, room = 4 * 256 * 64, 2 * 4 * 256 * 64
    wide = dataclasses.replace(ARCH, head_outputs=4096, head_chunk=1 << 16)
    whole = 2 * 4 * 2 * 256 * 4096
    assert sampling_memory(wide, SCALES, score_matrices=False).activation_bytes == 2 * (stream + room) + whole
    chunked = sampling_memory(wide, SCALES, score_matrices=False, chunked_head=True).activation_bytes
    assert chunked == 2 * (stream + room + 458752)
    no_chunks = dataclasses.replace(wide, head_chunk=0)  # a head without chunks is whole on every device
    assert sampling_memory(no_chunks, SCALES, score_matrices=False, chunked_head=True).activation_bytes == 2 * (stream + room) + whole


def test_hart_sampling_memory_depends_on_the_device_its_head_runs_on():
    """HART's head runs in chunks on the CPU only (a CUDA generator draws the whole scale): at 2K in bfloat16 the
    whole-scale logits are the peak on a GPU; the estimate follows the device it is asked for."""
    from fastvar_core.memory import find_model, meta_transformer

    fam, _, config = find_model("hart-0.7b")
    model = meta_transformer(fam, config, torch.bfloat16, "default")
    schedule = fam.schedule_for_size(model, None, None, "2K")
    cpu = lib_families.sampling_memory(fam, model, None, schedule, score_matrices=False, device="cpu")
    gpu = lib_families.sampling_memory(fam, model, None, schedule, score_matrices=False, device="cuda")
    assert cpu.kv_cache_bytes == gpu.kv_cache_bytes and cpu.activation_bytes < gpu.activation_bytes
    logits = 2 * 128 * 128 * config.vocab_size  # the last scale's, both CFG rows
    assert gpu.activation_bytes >= 2 * 4 * logits
    assert lib_families.sampling_memory(fam, model, None, schedule, score_matrices=False) == gpu  # a meta model


def test_decode_memory_follows_the_tile_and_batch():
    widths = [32, 64, 64]
    whole = decode_memory(widths, 16, (64, 64))
    assert decode_memory(widths, 16, (32, 32)) < whole
    bands = DECODE_BANDS_BYTES  # row-band buffers: bounded whatever the batch
    assert decode_memory(widths, 16, (64, 64), batch=2) - bands == 2 * (whole - bands)


@pytest.fixture
def toy():
    """The toy family registered in the library and in the pack's copy; removed afterwards."""
    copies = [lib_families, sys.modules[f"{PACK.__name__}.fastvar_core.families"]]
    for f in copies:
        register_toy(f)
    yield
    for f in copies:
        f.FAMILIES.pop("toy", None)


# ---- the nodes -----------------------------------------------------------------------------------


@pytest.fixture
def hart_dirs():
    compat = _mod("compat")
    compat.set_model_dirs({"hart": [PARITY / "hart"], "text_encoders": [SHARED / "models"]})
    yield compat
    compat.set_model_dirs({})


@pytest.fixture
def calls(monkeypatch, hart_dirs):
    """Every patcher made (module, kind) and every load (patchers, memory_required) through compat."""
    compat = hart_dirs
    made, loads = [], []
    make, load = compat.patcher, compat.load_models
    monkeypatch.setattr(compat, "patcher", lambda module, kind: made.append((module, kind)) or make(module, kind))
    monkeypatch.setattr(compat, "load_models",
                        lambda patchers, memory, full=False:
                        loads.append((patchers, memory, full)) or load(patchers, memory, full))
    return made, loads


def _kind(made, module):
    return next(kind for m, kind in made if m is module)


def test_hart_nodes_load_each_part_through_compat_with_its_kind_and_estimate(calls):
    made, loads = calls
    loaders, generation = _mod("loaders"), _mod("generation")
    families = sys.modules[f"{PACK.__name__}.fastvar_core.families"]
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto")["result"]
    (vae,) = loaders.LoadHARTVAE().load("checkpoint/tokenizer")["result"]
    (enc,) = loaders.LoadQwen2TextEncoder().load("tiny-qwen2-vl-1.5b-instruct", "float32")["result"]
    assert (_kind(made, model.module), _kind(made, vae.module), _kind(made, enc.module)) == \
        ("diffusion", "vae", "text_encoder")

    positive, _ = generation.TextEncode().encode(enc, "a red fox", "")
    patchers, memory, full = loads[-1]
    assert patchers == [enc.patcher] and full and memory == enc.module.working_memory(1) > 0

    (spec,) = generation.FastVARPruning().build("paper", 2.0, 5, -1, -1, "Infinity-2B 1024px")
    args = dict(seed=1, width=1024, height=1024, aspect_ratio="from width/height", pixel_budget="auto", cfg=4.5,
                tau=0.5, top_k=0, top_p=0.0, batch_size=2, pruning=spec)
    latent = generation.FastVARSampler().sample(model, positive, **args)["result"][0]
    patchers, memory, _ = loads[-1]
    schedule = latent.result.schedule
    cond = positive.value.repeat(2)
    plan = families.resolve_pruning("hart", spec, schedule, model.module.config, cond)
    # The loader's attention "auto" is a fused kernel: no score matrices in the estimate.
    expected = families.sampling_memory("hart", model.module, cond, schedule, plan=plan, batch=2,
                                        score_matrices=False).total
    assert patchers == [model.patcher, vae.patcher] and memory == expected > 0
    unpruned = families.sampling_memory("hart", model.module, cond, schedule, batch=2, score_matrices=False).total
    assert memory < unpruned

    generation.FastVARDecode().decode(vae, latent, "auto")
    patchers, memory, _ = loads[-1]
    assert patchers == [vae.patcher]
    # the decode is capped at what sampling the same image unpruned needs (carried on the latent)
    assert latent.sampling_bytes == unpruned
    assert memory == families.decode_memory("hart", vae.module, latent.result.latent, "auto", unpruned) > 0


def test_the_hart_vae_is_loaded_once(hart_dirs):
    loaders = _mod("loaders")
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto")["result"]
    (vae,) = loaders.LoadHARTVAE().load("checkpoint")["result"]
    (same,) = loaders.LoadHARTVAE().load("checkpoint/tokenizer")["result"]
    assert model.companion is vae is same


@pytest.mark.parametrize("weight_dtype, stored", [("default", torch.float32), ("fp8_e4m3fn", torch.float8_e4m3fn),
                                                  ("fp8_e5m2", torch.float8_e5m2)])
def test_model_loaders_store_linear_weights_in_the_weight_dtype(hart_dirs, weight_dtype, stored):
    loaders = _mod("loaders")
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto", weight_dtype)["result"]
    linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {m.weight.dtype for m in linears} == {stored}
    assert model.module.dtype == torch.float32  # the compute dtype stays
    if stored != torch.float32:
        ops = type(linears[0])
        assert ops is not torch.nn.Linear and hasattr(ops, "forward")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@pytest.mark.parametrize("weight_dtype, linear_bytes", [("default", 4), ("fp8_e4m3fn", 1)])
def test_model_loader_shows_its_weight_bytes(weight_dtype, linear_bytes):
    """The info text counts 4 bytes per float32 element and 1 per fp8 Linear element of the file's tensors."""
    compat, loaders = _mod("compat"), _mod("loaders")
    compat.set_model_dirs({"infinity": [PARITY / "infinity" / "checkpoints"]})
    try:
        out = loaders.LoadInfinityModel().load("infinity_tiny.pth", "float32", "auto", weight_dtype)
    finally:
        compat.set_model_dirs({})
    (model,) = out["result"]
    linears = {f"{n}.{p}" for n, m in model.module.named_modules() if isinstance(m, torch.nn.Linear)
               for p in ("weight", "bias") if getattr(m, p, None) is not None}
    state = model.module.state_dict()
    expected = sum(t.numel() * (linear_bytes if k in linears else 4) for k, t in state.items() if t.is_floating_point())
    kinds = "float32" if weight_dtype == "default" else "float32 + float8_e4m3fn"
    assert out["ui"] == {"text": [f"weights: {_mib(expected)} ({weight_dtype}, {kinds})"]}


def test_vae_and_text_encoder_loaders_show_their_weight_bytes(hart_dirs):
    loaders = _mod("loaders")
    vae = loaders.LoadHARTVAE().load("checkpoint")
    enc = loaders.LoadQwen2TextEncoder().load("tiny-qwen2-vl-1.5b-instruct", "float32")
    model = loaders.LoadHARTModel().load("checkpoint", "float32", "auto")
    for out in (vae, enc, model):
        module = out["result"][0].module
        elements = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point())
        assert out["ui"]["text"][0].startswith(f"weights: {_mib(4 * elements)} (")
    assert vae["ui"]["text"] == [f"weights: {_mib(4 * sum(t.numel() for t in vae['result'][0].module.state_dict().values()))} (float32)"]
    assert model["ui"]["text"][0].endswith(f"(default, float32); its VAE: {vae['ui']['text'][0][len('weights: '):-len(' (float32)')]}")


def _toy_run(prompt, unique_id="5"):
    from toy_family import ToyModel, ToyTextEncoder

    compat, generation, objects = _mod("compat"), _mod("generation"), _mod("objects")
    enc, net = ToyTextEncoder(), ToyModel()
    positive, _ = generation.TextEncode().encode(objects.Part("toy", enc, "toy", compat.patcher(enc, "text_encoder")),
                                                 "a toy", "")
    (spec,) = generation.FastVARPruning().build("paper", 2.0, 5, -1, -1, "Infinity-2B 1024px")
    out = generation.FastVARSampler().sample(
        objects.Part("toy", net, "toy", compat.patcher(net, "diffusion")), positive, seed=3, width=64, height=48,
        aspect_ratio="from width/height", pixel_budget="auto", cfg=2.0, tau=0.5, top_k=0, top_p=0.0, batch_size=1,
        pruning=spec, prompt=prompt, unique_id=unique_id)
    return out["result"][0]


def test_kept_tokens_are_recorded_only_for_a_token_map_consumer(toy):
    generation = _mod("generation")
    wiring = _mod("wiring")
    consumer = {"5": {"class_type": "FastVAR_Sampler", "inputs": {}},
                "9": {"class_type": "FastVAR_TokenMap", "inputs": {"latent": ["5", 0], "layer": -1}}}
    other = {"9": {"class_type": "FastVAR_TokenMap", "inputs": {"latent": ["6", 0]}},
             "10": {"class_type": "FastVAR_Decode", "inputs": {"latent": ["5", 0]}}}
    assert wiring.feeds_token_map(consumer, "5") and not wiring.feeds_token_map(other, "5")
    recorded = _toy_run(consumer)
    assert recorded.result.kept and recorded.rerun is None
    silent = _toy_run(other)
    assert not silent.result.kept and silent.rerun is not None
    # A Token Map added later gets a cached latent without records: it runs the sampler again, recording.
    maps, _ = generation.FastVARTokenMap().render(silent, -1, "all", 0)
    assert silent.result.kept and torch.equal(silent.result.latent, recorded.result.latent)
    assert torch.equal(maps, generation.FastVARTokenMap().render(recorded, -1, "all", 0)[0])


def test_token_map_of_an_unpruned_run_says_what_to_do(toy):
    generation = _mod("generation")
    latent = _toy_run({})
    latent.result.pruning = PruningConfig(name="off")
    with pytest.raises(Exception, match="connect a FastVAR Pruning node with a preset other than 'off'"):
        generation.FastVARTokenMap().render(latent, -1, "all", 0)


def test_infinity_loader_builds_with_the_operations_compat_picks(monkeypatch):
    compat, loaders = _mod("compat"), _mod("loaders")
    cast_ops = sys.modules[f"{PACK.__name__}.fastvar_core.ops"].CastOps
    picked, pick = [], compat.operations
    monkeypatch.setattr(compat, "operations", lambda *a, **k: picked.append((a, k)) or pick(*a, **k))
    compat.set_model_dirs({"infinity": [PARITY / "infinity" / "checkpoints"]})
    try:
        (model,) = loaders.LoadInfinityModel().load("infinity_tiny.pth", "float32", "auto", "fp8_e4m3fn_fast")["result"]
    finally:
        compat.set_model_dirs({})
    assert picked == [((torch.float8_e4m3fn, torch.float32, torch.device("cpu")), {"fast": True})]
    linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, cast_ops.Linear) and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert model.module.block_dtype == torch.float32


def test_token_map_of_a_layer_that_did_not_prune_names_the_pruned_layers(toy):
    generation = _mod("generation")
    latent = _toy_run({"9": {"class_type": "FastVAR_TokenMap", "inputs": {"latent": ["5", 0]}}})
    first, stop = latent.result.pruning.layers
    with pytest.raises(Exception) as info:
        generation.FastVARTokenMap().render(latent, stop, "all", 0)
    assert str(info.value) == (f"layer {stop} did not prune in this run (it pruned layers {first} to {stop - 1}): "
                               f"set 'layer' to one of those, or -1 for all of them")
    assert generation.FastVARTokenMap().render(latent, stop - 1, "all", 0)[0].shape[0] >= 1


# ---- the memory report (fastvar_core/memory.py, `python -m fastvar_core memory`) ---------------------

GIB = 2**30
# Element counts of the released checkpoints (parameters and buffers) from the fact sheets: Infinity-2B
# 2,204,697,152 (an 8.82 GB fp32 file), Infinity-8B 8,375,791,824 + 290,304 buffers, HART-0.7B 732.40 M.
FACT_ELEMENTS = {"Infinity-2B": 2_204_697_152, "Infinity-8B": 8_375_791_824 + 290_304, "HART-0.7B": 732_400_000}


@pytest.fixture(scope="module")
def reports():
    from fastvar_core.memory import build_report

    return {name: build_report(name.lower()) for name in FACT_ELEMENTS}


@pytest.mark.parametrize("name", list(FACT_ELEMENTS))
def test_report_weight_bytes_of_the_released_shapes_match_the_fact_sheets(reports, name):
    weights = reports[name].part("transformer").weights
    elements = FACT_ELEMENTS[name]
    # bf16: 2 bytes an element (Infinity keeps a few sensitive parameters in float32: under 3% more);
    # fp8: the Linear weights at 1 byte, which are nearly all of them.
    assert 2 * elements <= weights["default"] <= 1.03 * 2 * elements
    for fp8 in ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"):
        assert 0.99 * elements <= weights[fp8] <= 1.03 * elements
    if name == "Infinity-2B":  # the "about 4.1 GB in bf16 (2 GB in fp8)", in GiB
        assert round(weights["default"] / GIB, 1) in (4.1, 4.2) and round(weights["fp8_e4m3fn"] / GIB) == 2
    if name == "Infinity-8B":  # "about 16 GB (8 GB)"
        assert round(weights["default"] / GIB) == 16 and round(weights["fp8_e4m3fn"] / GIB) == 8


def test_report_text_encoders_match_the_release_sizes(reports):
    # flan-t5-xl's encoder about 2.4 GB and Qwen2-1.5B about 3.09 GB in 16 bits (the issue; docs/hart.md).
    t5 = reports["Infinity-2B"].part("text encoder").weights["default"]
    qwen = reports["HART-0.7B"].part("text encoder").weights["default"]
    assert abs(t5 - 2.4e9) < 0.1e9 and abs(qwen - 3.09e9) < 0.05e9
    assert reports["Infinity-8B"].part("text encoder") == reports["Infinity-2B"].part("text encoder")


def test_fp8_stores_each_transformer_linear_in_half_the_bytes_of_bf16():
    from fastvar_core.families import get_family
    from fastvar_core.memory import meta_transformer, tensor_bytes

    fam = get_family("infinity")
    config = fam.released_configs()["Infinity-2B"]
    bf16, fp8 = (meta_transformer(fam, config, torch.bfloat16, w) for w in ("default", "fp8_e4m3fn"))
    pairs = list(zip(bf16.modules(), fp8.modules()))
    linears = [(a, b) for a, b in pairs if isinstance(a, torch.nn.Linear)]
    # Infinity computes its blocks in bf16; a few Linears outside them stay float32 (then a quarter in fp8).
    blocks = [(a, b) for a, b in linears if a.weight.dtype == torch.bfloat16]
    assert len(blocks) >= 32 * 6
    assert sum(tensor_bytes(a) for a, _ in blocks) > 0.95 * tensor_bytes(bf16)
    for a, b in linears:
        assert b.weight.dtype == torch.float8_e4m3fn
        assert a.weight.element_size() * tensor_bytes(b) == tensor_bytes(a)
    others = [(a, b) for a, b in pairs if not isinstance(a, torch.nn.Linear)]
    assert all(sum(t.numel() * t.element_size() for t in a.parameters(recurse=False))
               == sum(t.numel() * t.element_size() for t in b.parameters(recurse=False)) for a, b in others)


def _hand_report(sampler_needs_vae=False):
    from fastvar_core.memory import Part, Report

    parts = (Part("transformer", {"default": 4 * GIB, "fp8_e4m3fn": 2 * GIB}, 3 * GIB),
             Part("text encoder", {"default": 2 * GIB, "fp8_e4m3fn": 2 * GIB}, GIB // 10),
             Part("VAE", {"default": GIB // 2, "fp8_e4m3fn": GIB // 2}, GIB))
    return Report("toy", (1024, 1024), 1, "off", "bfloat16", "flash", parts, sampler_needs_vae)


def test_fits_follows_the_numbers():
    report = _hand_report()
    # all resident: 4 + 2 + 0.5 weights + 3 working = 9.5; in turns: sampling 4 + 3 = 7 is the largest stage.
    assert report.peak_resident("default") == 9.5 * GIB and report.peak_in_turns("default") == 7 * GIB
    assert [report.fits(g, "default") for g in (9.5, 9.4, 7, 6.9, 3.1, 3)] == [
        "yes", "swap", "swap", "lowvram", "lowvram", "no"]
    assert report.fits(7.5, "fp8_e4m3fn") == "yes"  # 2 + 2 + 0.5 + 3
    # A sampler that needs the VAE keeps it resident while sampling: 4 + 3 + 0.5.
    assert _hand_report(sampler_needs_vae=True).peak_in_turns("default") == 7.5 * GIB


def test_fits_table_rows_follow_the_reports():
    from fastvar_core.memory import build_report, fits_table

    table = fits_table([1, 100], models=("HART-0.7B",), sizes=("1024",))
    report = build_report("hart-0.7b", "1024")
    rows = [line for line in table.splitlines() if line.startswith("| HART-0.7B")]
    assert [r.split(" | ")[2] for r in rows] == ["default", "fp8_e4m3fn"]
    for row, wd in zip(rows, ("default", "fp8_e4m3fn")):
        assert row.endswith(f"| {report.fits(1, wd)} | yes |")
        assert f"| {report.weights(wd) / GIB:.2f} |" in row
    assert report.fits(1, "default") == "no"  # 1 GiB holds not even the transformer's working memory


def test_flash_attention_estimate_drops_only_the_score_matrices():
    flash = sampling_memory(ARCH, SCALES, score_matrices=False)
    math = sampling_memory(ARCH, SCALES)
    assert flash.kv_cache_bytes == math.kv_cache_bytes and flash.activation_bytes < math.activation_bytes
    # The largest scale (16x16 = 256 tokens, attending to every key so far: 341) dominates both.
    assert math.activation_bytes - flash.activation_bytes == 2 * 4 * ARCH.heads * 256 * 341


@pytest.mark.parametrize("size, message", [
    ("12x", "--size must be a side such as 1024, 2K, or WIDTHxHEIGHT"),
    ("big", "--size must be a side such as 1024, 2K, or WIDTHxHEIGHT"),
    ("0x512", "width must be a positive number of pixels"),
])
def test_memory_cli_refuses_a_bad_size(capsys, size, message):
    from fastvar_core import cli

    assert cli.main(["memory", "--size", size]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_memory_cli_refuses_an_unknown_model(capsys):
    from fastvar_core import cli

    assert cli.main(["memory", "--model", "infinity-20b"]) == 2
    assert "--model 'infinity-20b' is not a released model; choose one of infinity-2b, infinity-8b, hart-0.7b" in (
        capsys.readouterr().err)


def test_memory_cli_prints_the_parts_and_the_summary(capsys):
    from fastvar_core import cli
    from fastvar_core.memory import build_report

    assert cli.main(["memory", "--model", "hart-0.7b", "--size", "2K", "--weight-dtype", "fp8_e4m3fn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("HART-0.7B at 2048x2048, batch 1, pruning off, compute bfloat16, attention flash")
    for part in ("| transformer |", "| text encoder |", "| VAE |", "| total weights |"):
        assert part in out
    report = build_report("hart-0.7b", "2K")
    working = report.part("transformer").working  # sampling at 2K is the largest stage
    assert working > max(report.part(p).working for p in ("text encoder", "VAE"))
    assert (f"weight_dtype fp8_e4m3fn, all parts resident: memory: weights {report.weights('fp8_e4m3fn') / GIB:.2f} "
            f"GiB resident + predicted peak {working / GIB:.2f} GiB") in out


def test_sampler_info_states_the_weights_and_the_predicted_peak(toy, monkeypatch):
    from fastvar_core.cost import MemoryEstimate

    generation = _mod("generation")
    measured, planned = [], []
    monkeypatch.setattr(generation, "tensor_bytes", lambda m: measured.append(type(m).__name__) or 3 * GIB // 2)
    monkeypatch.setattr(generation.families, "sampling_memory",
                        lambda *a, **k: planned.append(("plan" in k, k["batch"], k["score_matrices"]))
                        or MemoryEstimate(2 * GIB, GIB // 4))
    latent = _toy_run({})
    # The sampled parts' bytes; the estimate for the run, without score matrices for the default (fused) attention,
    # then the unpruned one that caps the decode.
    assert measured == ["ToyModel"] and planned == [(True, 1, False), (False, 1, False)]
    assert latent.info.splitlines()[-1] == "memory: weights 1.50 GiB resident + predicted peak 2.25 GiB"


def test_summary_shows_small_amounts_in_mib():
    from fastvar_core.memory import summary

    assert summary(3 * 2**20, GIB) == "memory: weights 3.0 MiB resident + predicted peak 1.00 GiB"


# ---- partial (lowvram) load through ComfyUI's real ModelPatcher (the e2e environment) -------------------

# The harness installs beside the folder that holds ../shared (its default FV_E2E_HOME); ../shared may be a link.
E2E = Path(os.environ.get("FV_E2E_HOME", (ROOT.parent / "shared").resolve().parent / ".fv-e2e"))
_NEEDS_E2E = pytest.mark.skipif(
    not (E2E / "venv" / "bin" / "python").is_file() or not (E2E / "ComfyUI" / "comfy").is_dir(),
    reason="needs the comfy-e2e environment (ComfyUI 0.3.64 and its venv)")


@_NEEDS_E2E
def test_partial_load_moves_our_own_tensors_and_the_unload_takes_everything_back():
    """ModelPatcher.load with a third of the weights: some comfy.ops layers stay offloaded, every tensor held
    outside them follows to the load device (our ON_LOAD callback); detach() leaves nothing there."""
    out = subprocess.run([str(E2E / "venv" / "bin" / "python"), str(ROOT / "tests" / "comfy_partial_load.py"),
                          str(E2E / "ComfyUI"), str(PARITY / "infinity" / "checkpoints" / "infinity_tiny.pth")],
                         cwd=E2E / "ComfyUI", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["lowvram"] and seen["clone_keeps_callback"]
    assert set(seen["cast_loaded"].values()) == {"cpu", "meta"}  # partly loaded
    assert seen["own_loaded"] and set(seen["own_loaded"].values()) == {"meta"}
    assert {"blocks.0.sa.q_bias", "pos_start", "blocks.0.ada_gss"} <= {k.removeprefix("part.") for k in seen["own_loaded"]}
    assert set(seen["cast_unloaded"].values()) == set(seen["own_unloaded"].values()) == {"cpu"}


@_NEEDS_E2E
def test_comfyui_manager_keeps_our_parts_between_runs_and_the_unload_takes_them_off():
    """Two generations per family through the nodes under ComfyUI's real model management (--cpu): after the first
    every part is in current_loaded_models, the second moves no weights again and gives the same image,
    unload_all_models drops them all to the offload device; the fp8 loader's Linear weights are float8 in comfy.ops
    layers."""
    out = subprocess.run([str(E2E / "venv" / "bin" / "python"), str(ROOT / "tests" / "comfy_managed_run.py"),
                          str(E2E / "ComfyUI"), str(SHARED)],
                         cwd=E2E / "ComfyUI", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    parts = [f"{fam}.{role}" for fam in ("hart", "infinity") for role in ("model", "text_encoder", "vae")]
    assert seen["held_first"] == seen["held_second"] == parts
    assert seen["loads_first"] == seen["loads_second"] == dict.fromkeys(parts, 1)
    assert seen["same_images"] == {"hart": True, "infinity": True}
    assert seen["image_shapes"] == {"hart": [1, 1024, 1024, 3], "infinity": [1, 1024, 1024, 3]}
    assert seen["held_after_unload"] == []
    assert seen["devices_loaded"] == dict.fromkeys(parts, ["cpu"])
    assert seen["devices_unloaded"] == dict.fromkeys(parts, ["meta"])
    assert seen["fp8_linear_dtypes"] == ["float8_e4m3fn"] and seen["fp8_linears_cast"]


# ---- text-encoder precision: ComfyUI's flags when the loader says "auto" ------------------------------


def _fake_comfy(monkeypatch, compat, flags: dict, chosen: torch.dtype):
    """comfy.cli_args.args with ``flags`` set and a model_management whose text_encoder_dtype gives ``chosen``."""
    import types

    comfy, cli_args = types.ModuleType("comfy"), types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(**{**{f: False for f in compat.TEXT_ENCODER_FLAGS}, **flags})
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    monkeypatch.setattr(compat, "mm", types.SimpleNamespace(text_encoder_dtype=lambda device: chosen))


@pytest.mark.parametrize("flags, chosen, expected", [
    ({}, torch.float16, None),  # no flag: ComfyUI's float16 default is not taken (float32 stays on the CPU)
    ({"bf16_text_enc": True}, torch.bfloat16, torch.bfloat16),
    ({"fp16_text_enc": True}, torch.float16, torch.float16),
    ({"fp32_text_enc": True}, torch.float32, torch.float32),
    ({"fp8_e4m3fn_text_enc": True}, torch.float8_e4m3fn, None),  # no comfy.ops layers to store fp8 in
])
def test_text_encoder_dtype_follows_comfyui_flags_only(monkeypatch, flags, chosen, expected):
    compat = _mod("compat")
    _fake_comfy(monkeypatch, compat, flags, chosen)
    assert compat.text_encoder_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("widget, expected", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_t5_loader_auto_takes_the_flagged_dtype(monkeypatch, widget, expected):
    compat, loaders = _mod("compat"), _mod("loaders")
    monkeypatch.setattr(compat, "text_encoder_dtype", lambda device: torch.bfloat16)  # as with --bf16-text-enc
    compat.set_model_dirs({"text_encoders": [SHARED / "models"]})
    try:
        (enc,) = loaders.LoadT5TextEncoder().load("tiny-flan-t5-xl", "same folder", widget)["result"]
    finally:
        compat.set_model_dirs({})
    assert {p.dtype for p in enc.module.parameters()} == {expected}


def test_vae_loader_takes_comfyui_vae_dtype(monkeypatch):
    compat, loaders = _mod("compat"), _mod("loaders")
    asked = []
    monkeypatch.setattr(compat, "vae_dtype", lambda device, working: asked.append(working) or torch.bfloat16)
    monkeypatch.setattr(loaders, "_vaes", type(loaders._vaes)())  # no VAE cached by an earlier test
    compat.set_model_dirs({"vae": [PARITY / "infinity" / "checkpoints"]})
    try:
        (vae,) = loaders.LoadInfinityVAE().load("infinity_vae_d32_tiny.pth")["result"]
    finally:
        compat.set_model_dirs({})
    assert asked == [(torch.bfloat16, torch.float32)]  # ComfyUI's default working dtypes for a VAE
    assert {p.dtype for p in vae.module.parameters()} == {torch.bfloat16}
