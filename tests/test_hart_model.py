"""HART transformer pieces: config detection, loader errors, RoPE / diffusion formulas, FastVAR wiring.

Expected values come from the notes (docs/hart.md) and the tiny official-format checkpoint
(parity/hart/checkpoint, config.json + build_info.json), computed by hand here, not by the code under test.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import PARITY, StopSampling
from safetensors.torch import load_file, save_file

from fastvar_core import families
from fastvar_core.errors import CheckpointError, ConfigError, IncompatibleModelsError
from fastvar_core.families import get_family
from fastvar_core.hart import (
    HARTTextConditioning,
    check_text_width,
    check_vae_matches,
    detect_hart_config,
    load_hart_model,
    load_hart_vae,
    sample_hart,
)
from fastvar_core.hart.diffusion import RespacedSchedule, timestep_features
from fastvar_core.hart.model import Block, KVCache, RMSNorm, apply_rope, image_positions, rope_context, rope_image
from fastvar_core.pruning import PruningConfig, PruningRun, make_preset
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import hart_schedule

CKPT = PARITY / "hart" / "checkpoint"
LLM = CKPT / "llm"
INFINITY_PTH = PARITY / "infinity" / "checkpoints" / "infinity_tiny.pth"


@pytest.fixture(scope="module")
def config_json() -> dict:
    return json.loads((LLM / "config.json").read_text())


@pytest.fixture(scope="module")
def state() -> dict:
    return load_file(str(LLM / "model.safetensors"))


@pytest.fixture(scope="module")
def model():
    return load_hart_model(CKPT)  # the release folder: llm/ is found inside


@pytest.fixture(scope="module")
def vae():
    return load_hart_vae(CKPT / "tokenizer")


@pytest.fixture(scope="module")
def cond() -> HARTTextConditioning:
    p = load_file(str(PARITY / "hart" / "prompts.safetensors"))
    return HARTTextConditioning(p["context_tensor"][:1], p["context_mask"][:1], p["context_position_ids"][:1])


# ---------------------------------------------------------------------------------------------
# Config detection


def test_config_matches_config_json_and_weights(model, config_json):
    cfg = model.config
    for name in ("embed_dim", "depth", "num_heads", "context_token", "context_dim", "diff_width", "diff_depth",
                 "attn_l2_norm", "use_context_norm", "use_timestep_embed", "norm_eps"):
        assert getattr(cfg, name) == config_json[name], name
    assert cfg.patch_nums == tuple(config_json["patch_nums"])
    assert cfg.attn_l2_norm is True and cfg.use_context_norm is True  # the tiny set's flags (README)
    # from the weights (manifest: head.weight [4096, 128], word_embed.weight [128, 32], ffn [512, 128])
    assert (cfg.vocab_size, cfg.vae_channels, cfg.ffn_hidden, cfg.head_dim) == (4096, 32, 512, 32)
    assert cfg.total_tokens == 9451
    text = cfg.describe()
    assert "depth 4" in text and "width 128" in text and "14 scales" in text and "l2" in text


def test_ffn_width_of_the_release():
    from fastvar_core.hart.config import llama_ffn_hidden

    assert llama_ffn_hidden(1536, 4.0) == 4096  # docs/hart.md §2.1


@pytest.mark.parametrize(
    "change, words",
    [
        ({"attn_type": "gpt2"}, ["attn_type", "llama"]),
        ({"disable_aln": False}, ["disable_aln"]),
        ({"embed_dim": 256, "num_heads": 8}, ["head.weight", "[4096, 128]", "[4096, 256]"]),
        ({"depth": 5}, ["4 blocks", "depth=5"]),
        ({"attn_l2_norm": False}, ["scale_mul_1H11", "attn_l2_norm=false"]),
        ({"use_context_norm": False}, ["context_norm.weight"]),
        ({"diff_depth": 3}, ["diff_depth=3"]),
        ({"model_type": "hart_autoencoder_with_disc"}, ["VAE", "llm"]),
        ({"num_heads": 5}, ["num_heads=5"]),
    ],
)
def test_config_inconsistent_with_weights_is_refused(config_json, state, change, words):
    with pytest.raises(CheckpointError) as err:
        detect_hart_config({**config_json, **change}, state, "'x/llm/model.safetensors'")
    msg = str(err.value)
    assert "x/llm/model.safetensors" in msg
    for w in words:
        assert w in msg


# ---------------------------------------------------------------------------------------------
# Loader


def test_ema_is_default_and_model_weights_on_request(model):
    ema = torch.load(LLM / "ema_model.bin", weights_only=True)
    regular = load_file(str(LLM / "model.safetensors"))
    key = "blocks.1.attn.qkv_proj.weight"
    assert not torch.equal(ema[key], regular[key])  # build_info: ema_noise 0.05
    assert torch.equal(model.state_dict()[key], ema[key])
    plain = load_hart_model(LLM, use_ema=False)
    assert torch.equal(plain.state_dict()[key], regular[key])
    assert "lvl_1L" not in model.state_dict() and "attn_bias_for_masking" not in model.state_dict()


def test_weight_file_inside_llm_folder_loads():
    m = load_hart_model(LLM / "model.safetensors")
    assert torch.equal(m.head.bias, load_file(str(LLM / "model.safetensors"))["head.bias"])


def test_infinity_checkpoint_is_refused_with_its_name():
    with pytest.raises(CheckpointError, match="infinity_tiny.pth") as err:
        load_hart_model(INFINITY_PTH)
    assert "Infinity" in str(err.value)


def test_tokenizer_folder_is_refused():
    with pytest.raises(CheckpointError, match="tokenizer") as err:
        load_hart_model(CKPT / "tokenizer")
    assert "VAE" in str(err.value) and "llm" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no config.json") as err:
        load_hart_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "weights.bin" in str(err.value)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hart_model(tmp_path / "nope")


def _llm_copy(tmp_path, state: dict) -> object:
    folder = tmp_path / "llm"
    folder.mkdir()
    shutil.copy(LLM / "config.json", folder / "config.json")
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_missing_key_is_named(tmp_path, state):
    broken = {k: v for k, v in state.items() if k != "blocks.2.ffn.up_proj.weight"}
    folder = _llm_copy(tmp_path, broken)
    with pytest.raises(CheckpointError, match=r"missing tensors?: .*blocks\.2\.ffn\.up_proj\.weight") as err:
        load_hart_model(folder, use_ema=False)
    assert str(folder / "model.safetensors") in str(err.value)


def test_unexpected_key_is_named(tmp_path, state):
    folder = _llm_copy(tmp_path, {**state, "pos_1LC": torch.zeros(1, 3, 128)})
    with pytest.raises(CheckpointError, match="unexpected tensors?: .*pos_1LC"):
        load_hart_model(folder)


def test_training_buffers_are_dropped(tmp_path, state):
    # the release also holds the causal training mask (here a small stand-in) and lvl_1L
    folder = _llm_copy(tmp_path, {**state, "attn_bias_for_masking": torch.zeros(1, 1, 4, 4)})
    m = load_hart_model(folder)
    assert torch.equal(m.word_embed.weight, state["word_embed.weight"])


def test_folder_without_weights_is_refused(tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    shutil.copy(LLM / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no transformer weights"):
        load_hart_model(tmp_path)  # release-folder form


def test_vae_and_text_compatibility(model, vae, cond):
    check_vae_matches(model, vae)
    check_text_width(model, cond)
    other_vae = SimpleNamespace(config=SimpleNamespace(vocab_size=16384, z_channels=32))
    with pytest.raises(IncompatibleModelsError, match="vocab_size=16384"):
        check_vae_matches(model, other_vae)
    t5_like = SimpleNamespace(context=torch.zeros(1, 300, 2048), mask=torch.ones(1, 300, dtype=torch.bool),
                              position_ids=torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(IncompatibleModelsError, match=r"\(B, 300, 1536\)"):
        check_text_width(model, t5_like)


def test_arch_spec(model):
    spec = get_family("hart").arch_spec(model.config)
    assert (spec.depth, spec.width, spec.ffn_hidden, spec.ffn_matrices) == (4, 128, 512, 3)
    assert (spec.prefix_tokens, spec.head_outputs, spec.token_channels) == (300, 4096, 32)
    # diffusion head: 8 steps of a 2-block, width-128 MLP per token, plus the condition projection
    w, c = 128, 32
    per_eval = 2 * c * w + 2 * 10 * w * w + 4 * w * w + 4 * w * c
    assert spec.last_scale_flops_per_token == 8 * per_eval + 2 * 128 * w


# ---------------------------------------------------------------------------------------------
# Formulas (docs/hart.md §2.5, §2.6, §2.7, §3.5)


def test_rmsnorm_by_hand():
    norm = RMSNorm(4, eps=1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]])
    rms = math.sqrt((9 + 16) / 4 + 1e-6)
    expected = torch.tensor([[3 / rms, -8 / rms, 0.0, 0.0]])
    torch.testing.assert_close(norm(x), expected)


def test_context_rope_by_hand():
    hd = 8
    cos, sin = rope_context(torch.tensor([[0, 3]]), hd)
    assert cos.shape == (1, 2, hd)
    freqs = [10000 ** (-2 * j / hd) for j in range(hd // 2)]  # 1, 0.1, 0.01, 0.001
    angles = [3 * f for f in freqs] * 2  # dim d uses w_(d mod hd/2)
    torch.testing.assert_close(cos[0, 1], torch.tensor([math.cos(a) for a in angles]))
    torch.testing.assert_close(sin[0, 1], torch.tensor([math.sin(a) for a in angles]))
    torch.testing.assert_close(cos[0, 0], torch.ones(hd))


def test_image_positions_by_hand():
    # pn = 3 on the 64 grid: (i, j) * 64 / 3, shifted by the last text position of each row (0 for uncond)
    pos = image_positions((3, 3), (64, 64), torch.tensor([22, 0]))
    assert pos.shape == (2, 9, 2)
    torch.testing.assert_close(pos[0, 5], torch.tensor([64 / 3 + 22, 128 / 3 + 22]))  # row 1, col 2
    torch.testing.assert_close(pos[1, 7], torch.tensor([128 / 3, 64 / 3]))  # row 2, col 1
    torch.testing.assert_close(pos[1, 0], torch.tensor([0.0, 0.0]))


def test_image_positions_non_square_by_hand():
    # a 2 x 4 map on a (45, 91) last map: rows at i * 45 / 2, columns at j * 91 / 4
    pos = image_positions((2, 4), (45, 91), torch.tensor([3]))
    assert pos.shape == (1, 8, 2)
    torch.testing.assert_close(pos[0, 6], torch.tensor([22.5 + 3, 2 * 91 / 4 + 3]))  # row 1, col 2
    torch.testing.assert_close(pos[0, 3], torch.tensor([3.0, 3 * 91 / 4 + 3]))  # row 0, col 3


def test_image_rope_layout_and_rotation_by_hand():
    hd = 8
    a, b = 5.0, 2.0
    cos, sin = rope_image(torch.tensor([[[a, b]]]), hd)
    u = [1.0, 10000 ** (-4 / hd)]  # k = 0, 4 -> 10000^(-k/hd)
    table = [a * u[0], a * u[1], a * u[0], a * u[1], b * u[0], b * u[1], b * u[0], b * u[1]]
    torch.testing.assert_close(cos[0, 0], torch.tensor([math.cos(t) for t in table]))
    torch.testing.assert_close(sin[0, 0], torch.tensor([math.sin(t) for t in table]))
    # rotate-half over the whole head: dim 0 (row angle a*u0) pairs with dim 4 (column angle b*u0)
    q = torch.arange(1.0, hd + 1).view(1, 1, 1, hd)
    out = apply_rope(q, cos, sin)[0, 0, 0]
    torch.testing.assert_close(out[0], torch.tensor(1 * math.cos(a) - 5 * math.sin(a)))
    torch.testing.assert_close(out[4], torch.tensor(5 * math.cos(b) + 1 * math.sin(b)))
    torch.testing.assert_close(out[3], torch.tensor(4 * math.cos(a * u[1]) - 8 * math.sin(a * u[1])))


def test_timestep_features_cos_first():
    f = timestep_features(torch.tensor([0, 1]))
    assert f.shape == (2, 256)
    torch.testing.assert_close(f[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    torch.testing.assert_close(f[1, [0, 1, 128]], torch.tensor([math.cos(1), math.cos(math.exp(-math.log(10000) / 128)),
                                                              math.sin(1)]))


def test_diffusion_schedule_matches_fact_sheet():
    s = RespacedSchedule.cosine("8")
    assert s.timesteps == (0, 143, 285, 428, 571, 714, 856, 999)
    beta = [4.128e-5, 0.05488, 0.14875, 0.24955, 0.36607, 0.51757, 0.73544, 0.99999995]
    abar = [0.99996, 0.94508, 0.80451, 0.60374, 0.38273, 0.18464, 0.048849, 2.43e-9]
    torch.testing.assert_close(s.betas, torch.tensor(beta, dtype=torch.float64), rtol=2e-4, atol=0)
    # docs/hart.md §3.5 gives 3 digits
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("guidance, first_rows", [(3.0, "half"), (1.0, "all")])
def test_diffusion_rng_consumption_and_reproducibility(model, guidance, first_rows):
    """One initial draw (N rows guided, 2N unguided), then eight (2N, Cvae) draws (docs/hart.md §3.5, §3.7)."""
    n2, c = 8, model.config.vae_channels
    cond = torch.randn(n2, model.config.embed_dim, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(5)
    out = model.diffloss.sample(cond, guidance, g)
    assert out.shape == (n2 // 2, c)
    ref = torch.Generator().manual_seed(5)
    torch.randn(n2 // 2 if first_rows == "half" else n2, c, generator=ref)
    for _ in range(8):
        torch.randn(n2, c, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    again = model.diffloss.sample(cond, guidance, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    assert out.abs().max() <= 0.6 + 1e-6  # x0 is clipped to [-1, 1] at the last step, then * vae_scale


# ---------------------------------------------------------------------------------------------
# FastVAR wiring


def test_hart_paper_preset_on_the_1024_schedule():
    sched = hart_schedule()
    cfg = make_preset(get_family("hart").presets, "paper", sched.num_scales, 24)
    assert cfg.drop_ratios == {12: 0.5, 13: 0.75} and cfg.cache_scale == 11 and cfg.layers == (0, 24)
    assert sched.scales[11] == (36, 36)
    assert cfg.kept_tokens(12, 48 * 48) == 1152 and cfg.kept_tokens(13, 64 * 64) == 1024  # docs/fastvar.md §4.3
    cfg.validate(sched.num_scales, 24, can_skip=False, min_cache_scale=1)


@pytest.mark.parametrize(
    "cfg, words",
    [
        (PruningConfig(drop_ratios={0: 0.5}, cache_scale=0, layers=(0, 4)), "cache_scale"),
        (PruningConfig(drop_ratios={3: 0.5}, cache_scale=0, layers=(0, 4)), "scales before 1 hold no token map"),
        (PruningConfig(drop_ratios={12: 1.0}, cache_scale=11, layers=(0, 4)), "skip"),
    ],
)
def test_hart_pruning_rules(model, cfg, words):
    with pytest.raises(ConfigError, match=words):
        families.resolve_pruning("hart", cfg, hart_schedule(), model.config)


def test_kv_cache_holds_only_kept_tokens(model, cond):
    """Under pruning only the tokens that went through append K/V; a last scale stores nothing and releases."""
    depth, pns = model.config.depth, model.config.patch_nums
    # prune scale 2 (3x3: keep 9 - floor(4.5) = 5) in layers 1 and 2 only, restoring from scale 1
    config = PruningConfig(drop_ratios={2: 0.5}, cache_scale=1, layers=(1, 3))
    run = PruningRun(config, hart_schedule(pns).scales, depth, sublayers=Block.SUBLAYERS, record=True)
    cache = KVCache(depth)
    hd, gen = model.config.head_dim, torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ctx = model.embed_context(torch.cat([cond.context, torch.zeros_like(cond.context)]))
        pos = torch.cat([cond.position_ids, torch.zeros_like(cond.position_ids)])
        levels = model.level_embedding(3)

        def step(si: int, store: bool) -> torch.Tensor:
            run.begin_scale(si)
            cache.store = store
            if si == 0:
                return model.forward_blocks(ctx + levels[0], *rope_context(pos, hd), cache, run)
            x = torch.randn(2, pns[si] ** 2, model.config.embed_dim, generator=gen) + levels[si]
            return model.forward_blocks(x, *rope_image(image_positions((pns[si], pns[si]), (pns[-1], pns[-1]), pos[:, -1]), hd), cache, run)

        assert step(0, True).shape[1] == 300
        assert step(1, True).shape[1] == 4
        assert [k.shape[2] for k in cache.k] == [304] * depth
        assert step(2, True).shape[1] == 9  # every position is restored after pruning
        assert [k.shape[2] for k in cache.k] == [313, 309, 309, 313]  # layers 1, 2 appended the 5 kept tokens
        assert run.kept[(2, 1, "attn")].shape == (2, 5) and (2, 0, "attn") not in run.kept
        assert step(2, False).shape[1] == 9  # as a last scale: attends to the cache, stores nothing ...
    assert cache.k == [None] * depth  # ... and every layer released its buffer after its attention
    run.close()


def test_interrupt_releases_and_preview(model, vae, cond):
    seen = []

    def callback(step, total, preview):
        img = preview()
        seen.append((step, total, tuple(img.shape), float(img.min()), float(img.max())))
        if step == 2:
            raise StopSampling("stop")

    with pytest.raises(StopSampling):
        sample_hart(model, cond, hart_schedule(model.config.patch_nums), vae=vae, callback=callback)
    assert [s[:3] for s in seen] == [(1, 14, (1, 64, 64, 3)), (2, 14, (1, 64, 64, 3))]
    assert all(0.0 <= lo <= hi <= 1.0 for *_, lo, hi in seen)


def test_sampler_rejects_bad_teacher_tokens(model, vae, cond):
    with pytest.raises(ConfigError, match=r"hooks.teacher\[1\] has shape \(1, 10\), but scale 1 produces 4 tokens"):
        sample_hart(model, cond, hart_schedule(model.config.patch_nums), vae=vae,
                    hooks=SamplingHooks(teacher={1: torch.zeros(1, 10).long()}))


def test_sampler_needs_the_vae_and_refuses_a_negative(model, vae, cond):
    sched = hart_schedule(model.config.patch_nums)
    with pytest.raises(ConfigError, match="HART samples with its VAE's codebook"):
        sample_hart(model, cond, sched)
    with pytest.raises(ConfigError, match="HART has no negative prompt"):
        sample_hart(model, cond, sched, vae=vae, negative=cond)


def test_teacher_forcing_skips_the_draw_and_the_smoothing(model, vae, cond):
    """A forced scale produces the teacher's codes without drawing; the other scales still draw."""
    sched = hart_schedule((1, 2, 3, 4))
    free = sample_hart(model, cond, sched, vae=vae, seed=4)
    forced = (free.tokens[2] + 1) % vae.quantize.embedding.weight.shape[0]  # (1, 9), surely not the free draw
    draws = []
    hooks = SamplingHooks(teacher={2: forced}, on_draw=lambda si, *_: draws.append(si))
    run = sample_hart(model, cond, sched, vae=vae, seed=4, hooks=hooks)
    assert torch.equal(run.tokens[2], forced) and draws == [0, 1, 3]
    assert torch.equal(run.tokens[1], free.tokens[1])
    # smoothing consumes the generator; a forced scale does not, so scale 3 draws from another state
    assert not torch.equal(run.latent, free.latent)


# ---------------------------------------------------------------------------------------------
# Zero-shot aspect ratios and 2K (schedules.hart_schedule)


def test_non_square_schedule_samples_prunes_and_decodes(model, vae, cond):
    sched = hart_schedule((1, 2, 3, 4, 6, 8), template=0.5)  # (1,1) (2,3) (2,4) (3,6) (5,8) (6,11)
    assert sched.scales[1:] == ((2, 3), (2, 4), (3, 6), (5, 8), (6, 11))
    config = PruningConfig(drop_ratios={4: 0.5, 5: 0.75}, cache_scale=3, layers=(0, model.config.depth), name="t")
    base = sample_hart(model, cond, sched, vae=vae, seed=2)
    pruned = sample_hart(model, cond, sched, vae=vae, seed=2, pruning=config, hooks=SamplingHooks(record_kept=True))
    assert base.kept == {}  # kept indices are recorded only when asked for
    for result in (base, pruned):
        assert result.latent.shape == (1, model.config.vae_channels, 6, 11)
        assert [tuple(t.shape) for t in result.tokens.values()] == [(1, h * w) for h, w in sched.scales]
        assert torch.isfinite(result.latent).all()
    kept = pruned.kept[(5, 0, "attn")]  # (rows, kept): 66 tokens, 75 % pruned -> 17 kept per CFG row
    assert kept.shape == (2, 66 - int(66 * 0.75)) and int(kept.max()) < 66
    # the scales before the first pruned one are untouched by pruning
    assert all(torch.equal(base.tokens[si], pruned.tokens[si]) for si in range(4))
    image = vae.to_image(pruned.latent)
    assert image.shape == (1, 96, 176, 3) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


def test_schedules_longer_than_the_checkpoint(model, config_json):
    # the release's continuous level embedding extends to 2K's 16 scales; a table-based one cannot
    assert model.level_embedding(16).shape == (16, model.config.embed_dim)
    from dataclasses import replace

    from fastvar_core.hart.model import HARTTransformer

    table = HARTTransformer(replace(model.config, use_timestep_embed=False))
    with pytest.raises(ConfigError, match="level embedding for 14 scales, the schedule needs 16"):
        table.level_embedding(16)


@pytest.mark.parametrize("more_smooth", [True, False])
@pytest.mark.parametrize("cfg_cutoff", [None, 4])
def test_head_and_diffusion_in_chunks_match_one_piece(model, vae, more_smooth, cfg_cutoff, monkeypatch):
    """The head (logits, draw, smoothing) and the diffusion head split into chunks of a few tokens give the
    tokens and latent of one piece: the random numbers are drawn in the same order (batch of two, guided and
    past a CFG cut-off, with and without smoothing)."""
    import fastvar_core.hart.diffusion as diffusion
    import fastvar_core.hart.sampler as sampler

    p = load_file(str(PARITY / "hart" / "prompts.safetensors"))
    cond2 = HARTTextConditioning(p["context_tensor"][:1].repeat(2, 1, 1), p["context_mask"][:1].repeat(2, 1),
                                 p["context_position_ids"][:1].repeat(2, 1))
    sched = hart_schedule((1, 2, 3, 4, 6))
    pruning = PruningConfig(name="cut", cfg_cutoff=cfg_cutoff)

    # flatter logits than the random-weight model's, so that draws and smoothing depend on the random numbers
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda *args: logits(*args) * 1e-2)

    def run(hooks=None):
        return sample_hart(model, cond2, sched, vae=vae, seed=7, pruning=pruning, more_smooth=more_smooth, hooks=hooks)

    monkeypatch.setattr(diffusion, "DIFFUSION_CHUNK_ROWS", 1 << 20)
    # a logits observer sees whole scales, so the head runs in one piece (the parity tests' path)
    whole = run(SamplingHooks(on_logits=lambda si, guided: None))
    monkeypatch.setattr(sampler, "HEAD_CHUNK_VALUES", 5 * 2 * model.config.vocab_size)  # 5 tokens a chunk
    monkeypatch.setattr(diffusion, "DIFFUSION_CHUNK_ROWS", 7)
    widest = []  # tokens per logits call
    chunked_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda x, *args: widest.append(x.shape[1]) or chunked_logits(x, *args))
    chunked = run(SamplingHooks(pruning_seconds={}))  # timing hooks (the bench's) do not need whole scales
    assert max(widest[1:]) <= 10 < 6 * 6  # 5 tokens a chunk guided, 10 unguided; scale 0 is one piece by design
    for si in range(sched.num_scales):
        assert torch.equal(chunked.tokens[si], whole.tokens[si]), si
    assert not torch.equal(whole.tokens[4][0], whole.tokens[4][1])  # the two rows draw differently
    # GEMMs of another row count round differently and the Gumbel smoothing (tau ~ 0.005) amplifies that:
    # the parity rule's tolerance for sampled latents of these sizes (tests/parity_rule.py)
    torch.testing.assert_close(chunked.latent, whole.latent, rtol=0, atol=2e-4)
