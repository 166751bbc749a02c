"""Infinity transformer: config detection, checkpoint loading rules and errors, RoPE positions,
FastVAR preset, model/VAE/text compatibility checks, bit sampling details.

Expected values come from the reference files (infinity_tiny.json, parity cases) and the notes
docs/infinity.md §2.4, §3.4, §4.2, §4.3 (loader rules, RoPE examples, patchify, top-p) and
docs/fastvar.md §4.1 (FastVAR preset).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import PARITY, StopSampling
from safetensors.torch import load_file, save_file

from fastvar_core.errors import CheckpointError, IncompatibleModelsError
from fastvar_core.families import get_family
from fastvar_core.infinity import (
    InfinityConfig,
    ScaleRope,
    axis_positions,
    check_text_width,
    check_vae_matches,
    load_infinity_model,
    sample_bits,
    sample_infinity,
    scale_positions,
)
from fastvar_core.infinity.sampler import unpatchify_bits
from fastvar_core.pruning import make_preset
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import ScaleSchedule, infinity_schedule

CKPT = PARITY / "infinity" / "checkpoints"
TINY = CKPT / "infinity_tiny.pth"
TINY_JSON = json.loads((CKPT / "infinity_tiny.json").read_text())
VAE = CKPT / "infinity_vae_d32_tiny.pth"
HART_LLM = PARITY / "hart" / "checkpoint" / "llm"
NEG_CASE = PARITY / "infinity" / "cases" / "sample_0.06M_1x1_b1_cfg4_tau0.5_negprompt__infinity"


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(TINY, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_model():
    return load_infinity_model(TINY)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------
# config detection


def test_config_detected_from_shapes_matches_reference_json(tiny_state):
    cfg = InfinityConfig.from_state_dict(tiny_state)
    kw, derived, fixed = TINY_JSON["model_kwargs"], TINY_JSON["derived"], TINY_JSON["fixed_kwargs_from_load_infinity"]
    assert cfg.depth == kw["depth"]
    assert cfg.embed_dim == kw["embed_dim"]
    assert cfg.num_heads == kw["num_heads"]
    assert cfg.block_chunks == kw["block_chunks"]
    assert cfg.blocks_per_chunk == derived["blocks_per_chunk"]
    assert cfg.head_dim == derived["head_dim"]
    assert cfg.ffn_hidden == derived["ffn_hidden"]
    assert cfg.pool_heads == derived["text_pool_num_heads"]
    assert cfg.text_channels == TINY_JSON["text_channels"]
    assert 2 * cfg.bits == derived["V_logits"]
    assert cfg.cfg_uncond_rows == fixed["text_maxlen"]
    assert cfg.lvl_embed_rows == TINY_JSON["tensors"]["lvl_embed.weight"][0][0]
    assert cfg.patchify == bool(fixed["apply_spatial_patchify"])
    assert cfg.name == "custom"
    text = cfg.describe()
    assert "depth 6" in text and "width 128" in text and "32 bits" in text


def test_config_names_and_patchify_of_released_shapes(tiny_state):
    """Shapes of the released 2B / 8B (docs/infinity.md §1.3, §2.2) give their names; d = 56 means patchify."""
    def fake(depth, C, H, d, chunks=8):
        state = {
            "word_embed.weight": torch.empty(C, d), "text_norm.weight": torch.empty(2048),
            "cfg_uncond": torch.empty(512, 2048), "text_proj_for_sos.ca.mat_q": torch.empty(1, 16, C // 16),
            "lvl_embed.weight": torch.empty(15, C), "head.weight": torch.empty(2 * d, C),
        }
        per = depth // chunks
        for c in range(chunks):
            for j in range(per):
                state[f"block_chunks.{c}.module.{j}.sa.scale_mul_1H11"] = torch.empty(1, H, 1, 1)
                state[f"block_chunks.{c}.module.{j}.ffn.fc1.weight"] = torch.empty(4 * C, C)
        return {k: v.to("meta") for k, v in state.items()}

    two_b = InfinityConfig.from_state_dict(fake(32, 2048, 16, 32))
    assert (two_b.name, two_b.patchify, two_b.vae_bits, two_b.head_dim) == ("Infinity-2B", False, 32, 128)
    eight_b = InfinityConfig.from_state_dict(fake(40, 3584, 28, 56))
    assert (eight_b.name, eight_b.patchify, eight_b.vae_bits, eight_b.head_dim) == ("Infinity-8B", True, 14, 128)
    assert eight_b.pool_head_dim == 224


# ----------------------------------------------------------------------------------------------
# loading: accepted variants


def test_loads_official_pth_strictly(tiny_model, tiny_state):
    sd = tiny_model.state_dict()
    per = TINY_JSON["derived"]["blocks_per_chunk"]
    for key, value in tiny_state.items():
        parts = key.split(".")
        if parts[0] == "block_chunks":
            key = f"blocks.{int(parts[1]) * per + int(parts[3])}." + ".".join(parts[4:])
        assert torch.equal(sd[key], value), key
    assert len(sd) == TINY_JSON["num_tensors"]


def test_accepts_container_plain_blocks_safetensors_shards_and_legacy(tmp_path, tiny_state, tiny_model):
    per = TINY_JSON["derived"]["blocks_per_chunk"]
    # training container
    torch.save({"trainer": {"gpt_fsdp": tiny_state}, "args": {"x": 1}}, tmp_path / "ar-ckpt.pth")
    assert _same_weights(load_infinity_model(tmp_path / "ar-ckpt.pth"), tiny_model)
    # plain blocks.{i}, (1,1,H,1) head scales, legacy buffers, no zero_k_bias buffers, safetensors
    plain = {}
    for key, value in tiny_state.items():
        parts = key.split(".")
        if parts[0] == "block_chunks":
            key = f"blocks.{int(parts[1]) * per + int(parts[3])}." + ".".join(parts[4:])
        if key.endswith("zero_k_bias"):
            continue
        if key.endswith("scale_mul_1H11"):
            value = value.reshape(1, 1, -1, 1)
        plain[key] = value.contiguous()
    plain["attn_bias_for_masking"] = torch.zeros(1, 1, 4, 4)
    plain["lvl_1L"] = torch.zeros(1, 4)
    save_file(plain, str(tmp_path / "plain.safetensors"))
    model = load_infinity_model(tmp_path / "plain.safetensors")
    assert model.config.block_chunks == 1
    assert _same_weights(model, tiny_model)
    # sharded folder with a Hugging Face index (the 8B layout)
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(tiny_state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: tiny_state[k].contiguous() for k in names}, str(folder / shard))
        weight_map.update({k: shard for k in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _same_weights(load_infinity_model(folder), tiny_model)


def test_cfg_uncond_row_rules(tmp_path, tiny_state):
    """docs/infinity.md §2.4: fewer rows are completed with the official init rows, more rows are truncated to 512."""
    Ct5 = TINY_JSON["text_channels"]
    short = dict(tiny_state, cfg_uncond=tiny_state["cfg_uncond"][:20].clone())
    torch.save(short, tmp_path / "short.pth")
    model = load_infinity_model(tmp_path / "short.pth")
    assert model.config.cfg_uncond_rows == 20
    init = torch.empty(512, Ct5)
    torch.nn.init.trunc_normal_(init, std=1.2, generator=torch.Generator().manual_seed(0))
    init = init / Ct5**0.5
    assert torch.equal(model.cfg_uncond[:20], tiny_state["cfg_uncond"][:20])
    assert torch.equal(model.cfg_uncond[20:], init[20:])
    long = dict(tiny_state, cfg_uncond=torch.cat([tiny_state["cfg_uncond"], torch.ones(8, Ct5)]))
    torch.save(long, tmp_path / "long.pth")
    assert torch.equal(load_infinity_model(tmp_path / "long.pth").cfg_uncond, tiny_state["cfg_uncond"])


def test_block_dtype_keeps_sensitive_parts_fp32():
    model = load_infinity_model(TINY, dtype=torch.bfloat16)
    blk = model.blocks[0]
    assert blk.sa.mat_qkv.weight.dtype == torch.bfloat16 and blk.ffn.fc2.weight.dtype == torch.bfloat16
    for p in (blk.ada_gss, blk.ca_norm.weight, blk.sa.scale_mul_1H11, model.head.weight, model.text_norm.weight,
              model.shared_ada_lin[1].weight, model.cfg_uncond):
        assert p.dtype == torch.float32


def test_dtype_at_load_is_the_float32_model_cast_afterwards(tmp_path, tiny_state, tiny_model):
    # The loader converts tensor by tensor into the stored dtype; it must equal casting the float32 model,
    # also for a file stored in bf16 (as the memory check writes the 2B) or fp16.
    import copy

    expected = copy.deepcopy(tiny_model).set_block_dtype(torch.bfloat16)
    assert _same_weights(load_infinity_model(TINY, dtype=torch.bfloat16), expected)
    for stored in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{stored}.pth"
        torch.save({k: v.to(stored) if v.is_floating_point() else v for k, v in tiny_state.items()}, path)
        full = load_infinity_model(path)
        assert full.blocks[0].sa.mat_qkv.weight.dtype == torch.float32
        assert torch.equal(full.head.weight, tiny_state["head.weight"].to(stored).float())
        assert _same_weights(load_infinity_model(path, dtype=torch.bfloat16), full.set_block_dtype(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# loading: refused files


def test_refuses_hart_checkpoint():
    with pytest.raises(CheckpointError, match="HART") as err:
        load_infinity_model(HART_LLM)
    assert str(HART_LLM) in str(err.value)
    with pytest.raises(CheckpointError, match="HART"):
        load_infinity_model(HART_LLM / "model.safetensors")


def test_refuses_vae_file():
    with pytest.raises(CheckpointError, match="VAE") as err:
        load_infinity_model(VAE)
    assert VAE.name in str(err.value)


def test_missing_key_is_named(tmp_path, tiny_state):
    broken = {k: v for k, v in tiny_state.items() if k != "block_chunks.1.module.2.ffn.fc2.bias"}
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"1 missing tensor: .*block_chunks\.1\.module\.2\.ffn\.fc2\.bias") as err:
        load_infinity_model(path)
    assert "missing.pth" in str(err.value)


def test_wrong_shape_and_unexpected_key_are_named(tmp_path, tiny_state):
    bad = dict(tiny_state)
    bad["block_chunks.0.module.1.ffn.fc1.bias"] = torch.zeros(511)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"block_chunks\.0\.module\.1\.ffn\.fc1\.bias.*\(511,\).*\(512,\)"):
        load_infinity_model(tmp_path / "shape.pth")
    extra = dict(tiny_state, **{"block_chunks.0.module.0.sa.extra_gate": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor: .*extra_gate"):
        load_infinity_model(tmp_path / "extra.pth")


def test_not_a_checkpoint(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pth")
    with pytest.raises(CheckpointError, match="not an Infinity transformer"):
        load_infinity_model(tmp_path / "foo.pth")


# ----------------------------------------------------------------------------------------------
# RoPE (docs/infinity.md §3.4)


@pytest.mark.parametrize("n,expected", [
    (2, [0, 32]),
    (6, [0, 11, 21, 32, 43, 53]),
    (32, list(range(0, 64, 2))),
    (64, list(range(64))),
])
def test_rope_positions_1x1(n, expected):
    assert axis_positions(n, 64).tolist() == expected


def test_rope_positions_48_on_64():
    pos = axis_positions(48, 64).tolist()
    assert pos[:7] == [0, 1, 3, 4, 5, 7, 8] and pos[-1] == 63


def test_rope_positions_ties_and_float32():
    # 0.5 template: scale (30, 60) on the 1M grid (45, 90): 1.5 -> 2 and 4.5 -> 4 (half to even)
    grid = infinity_schedule(0.5, "1M").final_size
    assert grid == (45, 90)
    rows = axis_positions(30, grid[0]).tolist()
    assert rows[1] == 2 and rows[3] == 4
    # 3.0 template, scale 54x18 on 111x37: row 27 -> 55.5 in float32 -> 56 (exact arithmetic: 55)
    grid3 = infinity_schedule(3.0, "1M").final_size
    assert grid3 == (111, 37)
    assert axis_positions(54, grid3[0])[27].item() == 56


def test_rope_table_layout_and_gather():
    hd = 64
    rope = ScaleRope.build((6, 6), (64, 64), hd)
    rows, cols = scale_positions((6, 6), (64, 64))
    token = 13  # row 2, col 1 -> positions (21, 11)
    assert (rows[token].item(), cols[token].item()) == (21, 11)
    inv = [10000 ** (-2 * j / (hd // 2)) for j in range(hd // 4)]
    want = [math.cos(21 * f) for f in inv] + [math.cos(11 * f) for f in inv]
    assert torch.allclose(rope.cos[token], torch.tensor(want), atol=1e-5)
    idx = torch.tensor([[13, 0, 35], [5, 13, 7]])
    cos, sin = rope.select(idx)
    assert cos.shape == (2, 1, 3, hd // 2)
    assert torch.equal(cos[1, 0, 1], rope.cos[13]) and torch.equal(sin[0, 0, 2], rope.sin[35])


# ----------------------------------------------------------------------------------------------
# FastVAR preset (docs/fastvar.md §4.1, §4.4)


def test_paper_preset_matches_official_selection_1x1_1M():
    cfg = make_preset(get_family("infinity").presets, "paper", infinity_schedule(1.0, "1M").num_scales, 32)
    assert cfg.drop_ratios == {9: 0.4, 10: 0.5, 11: 1.0, 12: 1.0}
    assert cfg.cache_scale == 8
    assert cfg.layers == (3, 28)
    assert cfg.kept_tokens(9, 32 * 32) == 615 and cfg.kept_tokens(10, 40 * 40) == 800


# ----------------------------------------------------------------------------------------------
# compatibility checks


def test_vae_and_text_compatibility(tiny_model):
    from fastvar_core.infinity.vae import load_infinity_vae

    check_vae_matches(tiny_model, load_infinity_vae(VAE))  # 32 bits, no patchify: fine
    for d_v, patch in ((16, 16), (14, 8)):
        fake = SimpleNamespace(config=SimpleNamespace(codebook_dim=d_v, patch_size=patch))
        with pytest.raises(IncompatibleModelsError, match=f"{d_v}-bit"):
            check_vae_matches(tiny_model, fake)
    patchify_vae = SimpleNamespace(config=SimpleNamespace(codebook_dim=8, patch_size=8))  # 4 x 8 = 32 bits
    with pytest.raises(IncompatibleModelsError, match="patchify=True"):
        check_vae_matches(tiny_model, patchify_vae)
    check_vae_matches(load_infinity_model(TINY, patchify=True), patchify_vae)

    check_text_width(tiny_model, SimpleNamespace(kv_compact=torch.zeros(3, 2048)))
    with pytest.raises(IncompatibleModelsError, match="1024 wide.*2048"):
        check_text_width(tiny_model, SimpleNamespace(kv_compact=torch.zeros(3, 1024)))


# ----------------------------------------------------------------------------------------------
# sampler details


def test_top_p_makes_confident_bits_deterministic():
    """docs/infinity.md §4.3: top-p 0.97 removes a class with probability <= 0.03; top-k 900 is a no-op for 2 classes."""
    p_small = torch.tensor([0.02, 0.029, 0.2, 0.5])
    logit1 = torch.log(p_small / (1 - p_small))  # logits (0, logit1): P(bit = 1) = p_small
    logits = torch.stack([torch.zeros(4), logit1], dim=-1).reshape(1, 1, 8)  # (B, L, 2d), d = 4
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_bits(logits, 900, 0.97, gen)[0, 0] for _ in range(100)])
    assert (draws[:, :2] == 0).all()  # probability <= 0.03: never drawn
    assert 0 < draws[:, 2].float().mean() < 0.5 and 0 < draws[:, 3].float().mean() < 1


def test_unpatchify_bit_order():
    """docs/infinity.md §4.2 step 10: bit k = 4c + 2a + b goes to VAE channel c at sub-pixel (2 row + a, 2 col + b)."""
    h, w, d_v = 2, 3, 5
    bits = torch.arange(h * w * 4 * d_v).view(1, h, w, 4 * d_v)
    out = unpatchify_bits(bits)
    assert out.shape == (1, 2 * h, 2 * w, d_v)
    for r, c, k in ((0, 0, 0), (1, 2, 7), (1, 1, 19)):
        ch, a, b = k // 4, (k % 4) // 2, k % 2
        assert out[0, 2 * r + a, 2 * c + b, ch] == bits[0, r, c, k]


def test_interrupt_releases_and_next_run_is_unaffected(tiny_model):
    inputs = load_file(str(NEG_CASE / "inputs.safetensors"))
    lens = inputs["text.lens"].tolist()
    cond = SimpleNamespace(kv_compact=inputs["text.kv_compact"], lens=lens)
    full = infinity_schedule(1.0, "0.06M")
    schedule = ScaleSchedule("infinity", full.scales[:5], full.rope_grid, 1.0, "0.06M")  # up to 8x8: fast
    reference = sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5)
    calls = []

    def stop(step, total, preview):
        calls.append((step, total))
        img = preview()
        assert img.shape == (1, 8, 8, 3) and 0 <= img.min() and img.max() <= 1
        if step == 3:
            raise StopSampling("stop")

    with pytest.raises(StopSampling):
        sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5, callback=stop)
    assert calls == [(1, 5), (2, 5), (3, 5)]
    again = sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5)
    assert torch.equal(again.latent, reference.latent)
    assert reference.latent.shape == (1, 32, 8, 8) and reference.executed_scales == list(range(5))


def test_hooks_observe_and_force_without_changing_the_free_run(tiny_model):
    """on_trace / on_logits see every executed scale; teacher bits replace the draw after it happened."""
    inputs = load_file(str(NEG_CASE / "inputs.safetensors"))
    cond = SimpleNamespace(kv_compact=inputs["text.kv_compact"], lens=inputs["text.lens"].tolist())
    full = infinity_schedule(1.0, "0.06M")
    schedule = ScaleSchedule("infinity", full.scales[:4], full.rope_grid, 1.0, "0.06M")
    free = sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5)
    traced, logit_scales = [], []
    hooks = SamplingHooks(on_trace=lambda name, t: traced.append((name, t.clone())),
                          on_logits=lambda si, logits: logit_scales.append(si))
    observed = sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5, hooks=hooks)
    assert torch.equal(observed.latent, free.latent) and logit_scales == [0, 1, 2, 3]
    assert [n for n, _ in traced] == ["latent", "next_input", "latent", "next_input", "latent", "next_input", "latent"]
    assert torch.equal(traced[-1][1].squeeze(2), free.latent)
    forced = 1 - free.tokens[1].long()  # every bit of scale 1 flipped
    teacher = sample_infinity(tiny_model, cond, schedule, cfg=3.0, seed=5, hooks=SamplingHooks(teacher={1: forced}))
    assert torch.equal(teacher.tokens[1].long(), forced)
    # scale 0 is untouched; the forced scale 1 changes everything after it
    assert torch.equal(teacher.tokens[0], free.tokens[0]) and not torch.equal(teacher.latent, free.latent)
