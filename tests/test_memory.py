"""ComfyUI-managed memory (issue #14), checked without ComfyUI: every part is held by a patcher of its kind and
reaches its device only through compat.load_models with the library's working-memory estimate; fp8 storage;
one shared HART VAE; kept tokens recorded only for a Token Map node."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import PARITY, SHARED
from pack import load_pack
from toy_family import register_toy

from fastvar_core import families as lib_families
from fastvar_core.cost import ArchSpec, decode_memory, estimate, sampling_memory
from fastvar_core.pruning import PruningConfig

PACK = load_pack()


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
    kv = estimate(ARCH, SCALES, config).kv_cache_bytes
    assert sampling_memory(ARCH, SCALES, config, batch=batch).kv_cache_bytes == kv * 2 * batch
    assert sampling_memory(ARCH, SCALES, config, batch=batch, guided=False).kv_cache_bytes == kv * batch


def test_sampling_memory_counts_the_last_scale_extra_work():
    plain = sampling_memory(ARCH, SCALES)
    head = sampling_memory(ArchSpec(**{**ARCH.__dict__, "last_scale_values_per_token": 4096}), SCALES)
    assert head.activation_bytes > plain.activation_bytes and head.kv_cache_bytes == plain.kv_cache_bytes


def test_decode_memory_follows_the_tile_and_batch():
    widths = [32, 64, 64]
    whole = decode_memory(widths, 16, (64, 64))
    assert decode_memory(widths, 16, (32, 32)) < whole
    assert decode_memory(widths, 16, (64, 64), batch=2) == 2 * whole


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
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto")
    (vae,) = loaders.LoadHARTVAE().load("checkpoint/tokenizer")
    (enc,) = loaders.LoadQwen2TextEncoder().load("tiny-qwen2-vl-1.5b-instruct", "float32")
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
    expected = families.sampling_memory("hart", model.module, cond, schedule, plan=plan, batch=2).total
    assert patchers == [model.patcher, vae.patcher] and memory == expected > 0
    unpruned = families.sampling_memory("hart", model.module, cond, schedule, batch=2).total
    assert memory < unpruned

    generation.FastVARDecode().decode(vae, latent, "auto")
    patchers, memory, _ = loads[-1]
    assert patchers == [vae.patcher]
    assert memory == families.decode_memory("hart", vae.module, latent.result.latent, "auto") > 0


def test_the_hart_vae_is_loaded_once(hart_dirs):
    loaders = _mod("loaders")
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto")
    (vae,) = loaders.LoadHARTVAE().load("checkpoint")
    (same,) = loaders.LoadHARTVAE().load("checkpoint/tokenizer")
    assert model.companion is vae is same


@pytest.mark.parametrize("weight_dtype, stored", [("default", torch.float32), ("fp8_e4m3fn", torch.float8_e4m3fn),
                                                  ("fp8_e5m2", torch.float8_e5m2)])
def test_model_loaders_store_linear_weights_in_the_weight_dtype(hart_dirs, weight_dtype, stored):
    loaders = _mod("loaders")
    (model,) = loaders.LoadHARTModel().load("checkpoint", "float32", "auto", weight_dtype)
    linears = [m for m in model.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {m.weight.dtype for m in linears} == {stored}
    assert model.module.dtype == torch.float32  # the compute dtype stays
    if stored != torch.float32:
        ops = type(linears[0])
        assert ops is not torch.nn.Linear and hasattr(ops, "forward")


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
    consumer = {"5": {"class_type": "FastVAR_Sampler", "inputs": {}},
                "9": {"class_type": "FastVAR_TokenMap", "inputs": {"latent": ["5", 0], "layer": -1}}}
    other = {"9": {"class_type": "FastVAR_TokenMap", "inputs": {"latent": ["6", 0]}},
             "10": {"class_type": "FastVAR_Decode", "inputs": {"latent": ["5", 0]}}}
    assert generation.feeds_token_map(consumer, "5") and not generation.feeds_token_map(other, "5")
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
        (model,) = loaders.LoadInfinityModel().load("infinity_tiny.pth", "float32", "auto", "fp8_e4m3fn_fast")
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
