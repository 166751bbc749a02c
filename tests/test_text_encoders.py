"""Text encoders against the tiny flan-t5-xl / Qwen2 stand-ins and their reference values.

Reference: /work/shared/models/tiny_text_encoders_reference.json (models/README.md §5): float32 on
the CPU, atol 1e-4; float16 / bfloat16 runs within about 2e-2 / 1e-1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch
from conftest import MODELS
from safetensors.torch import load_file, save_file

from fastvar_core.errors import CheckpointError, ConfigError
from fastvar_core.hart.text import (
    HART_SYSTEM_PROMPT,
    HARTTextConditioning,
    QwenTextEncoder,
    load_qwen_encoder,
)
from fastvar_core.infinity.text import (
    InfinityTextConditioning,
    T5TextEncoder,
    load_t5_encoder,
    t5_config_from_state_dict,
)

T5_DIR = MODELS / "tiny-flan-t5-xl"
T5_FILE = MODELS / "tiny-flan-t5-xl-encoder.safetensors"
QWEN_DIR = MODELS / "tiny-qwen2-vl-1.5b-instruct"
ATOL = 1e-4

REF = json.loads((MODELS / "tiny_text_encoders_reference.json").read_text())
PROMPT = REF["prompt"]
T5_REF = REF["tiny-flan-t5-xl"]
QWEN_REF = REF["tiny-qwen2-vl-1.5b-instruct"]


def _close(actual: torch.Tensor, expected: list[float], atol: float = ATOL) -> None:
    torch.testing.assert_close(actual.float().cpu(), torch.tensor(expected), atol=atol, rtol=0)


def _copy_folder(src, dst, skip=(), link_weights=True):
    """Copy a model folder to dst, leaving out `skip`; weight files are symlinked (they are not edited)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in skip:
            continue
        if link_weights and f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def t5_folder() -> T5TextEncoder:
    return load_t5_encoder(T5_DIR)


@pytest.fixture(scope="module")
def t5_file() -> T5TextEncoder:
    return load_t5_encoder(T5_FILE, tokenizer_path=T5_DIR)


@pytest.fixture(scope="module")
def qwen() -> QwenTextEncoder:
    return load_qwen_encoder(QWEN_DIR)


def test_reference_files_unchanged():
    for rel, digest in REF["sha256"].items():
        assert hashlib.sha256((MODELS / rel).read_bytes()).hexdigest() == digest, rel


# ------------------------------------------------------------------------------------------------
# Infinity: flan-t5-xl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny-flan-t5-xl", "tiny-flan-t5-xl-encoder.safetensors"])
def test_t5_tokenizer_reference(which, t5_folder, t5_file):
    enc = t5_folder if which == "tiny-flan-t5-xl" else t5_file
    tok = enc.tokenizer
    assert len(tok) == T5_REF["len_tokenizer"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 499 and tok.convert_tokens_to_ids("<extra_id_99>") == 400
    ids, mask = enc.tokenize([PROMPT])
    n = len(T5_REF["prompt_input_ids"])
    assert ids.shape == mask.shape == (1, 512)
    assert ids[0, :n].tolist() == T5_REF["prompt_input_ids"]
    assert tok.convert_ids_to_tokens(ids[0, :n].tolist()) == T5_REF["prompt_tokens"]
    assert ids[0, n:].eq(0).all() and int(mask.sum()) == n


@pytest.mark.parametrize("which", ["tiny-flan-t5-xl", "tiny-flan-t5-xl-encoder.safetensors"])
def test_t5_features_reference(which, t5_folder, t5_file):
    enc = t5_folder if which == "tiny-flan-t5-xl" else t5_file
    assert enc.width == T5_REF["last_hidden_state_shape"][2] == 2048
    cond = enc.encode([PROMPT])
    n = T5_REF["last_hidden_state_shape"][1]
    assert cond.kv_compact.shape == (n, 2048) and cond.kv_compact.dtype == torch.float32
    assert cond.lens == [n] and cond.max_seqlen == n and cond.cu_seqlens.tolist() == [0, n]
    assert cond.cu_seqlens.dtype == torch.int32
    _close(cond.kv_compact[0, :5], T5_REF["padded512_last_hidden_state_token0_first5"])
    _close(cond.kv_compact[0, :5], T5_REF["last_hidden_state_token0_first5"])
    _close(cond.kv_compact[n - 1, :5], T5_REF["last_hidden_state_eos_first5"])
    assert abs(cond.kv_compact.mean().item() - T5_REF["last_hidden_state_mean"]) < ATOL
    assert abs(cond.kv_compact.std().item() - T5_REF["last_hidden_state_std"]) < ATOL


def test_t5_single_file_equals_folder(t5_folder, t5_file):
    # models/README.md §2: the encoder-only file gives exactly the folder's last_hidden_state.
    prompts = [PROMPT, "a red car parked in the snow at night"]
    assert torch.equal(t5_folder.encode(prompts).kv_compact, t5_file.encode(prompts).kv_compact)
    # encoder_file_keys = 12 tensors; the embedding stays tied (one parameter for both names).
    model = t5_file.model
    assert len(list(model.parameters())) == T5_REF["encoder_file_keys"]
    assert model.encoder.embed_tokens.weight is model.shared.weight


def test_t5_single_file_without_config_detects_it(tmp_path, t5_folder):
    tok_dir = _copy_folder(T5_DIR, tmp_path / "tok", skip={"config.json", "generation_config.json",
                                                           "model.safetensors.index.json",
                                                           "model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"})
    enc = load_t5_encoder(T5_FILE, tokenizer_path=tok_dir)
    cfg = enc.model.config
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_layers, cfg.d_ff, cfg.vocab_size) == (2048, 64, 2, 1, 64, 512)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert torch.equal(enc.encode([PROMPT]).kv_compact, t5_folder.encode([PROMPT]).kv_compact)


def test_t5_config_detection_matches_config_json():
    from transformers import T5Config

    ref = T5Config.from_pretrained(str(T5_DIR), local_files_only=True)
    got = t5_config_from_state_dict(load_file(str(T5_FILE)))
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn", "is_gated_act",
                 "layer_norm_epsilon"):
        assert getattr(got, name) == getattr(ref, name), name


def test_t5_unsharded_folder(tmp_path, t5_folder):
    # models/README.md §5: an unsharded copy (one model.safetensors) loads identically.
    shards = {}
    for f in sorted(T5_DIR.glob("model-*.safetensors")):
        shards.update(load_file(str(f)))
    dst = _copy_folder(T5_DIR, tmp_path / "unsharded", skip={"model.safetensors.index.json",
                                                             "model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"})
    save_file(shards, str(dst / "model.safetensors"), metadata={"format": "pt"})
    enc = load_t5_encoder(dst)
    assert torch.equal(enc.encode([PROMPT]).kv_compact, t5_folder.encode([PROMPT]).kv_compact)


def test_t5_batch_compaction(t5_folder):
    from transformers import AutoTokenizer

    prompts = [PROMPT, "", "a small wooden house beside a quiet lake, morning fog"]
    raw = AutoTokenizer.from_pretrained(str(T5_DIR), local_files_only=True, legacy=True)
    expected_lens = [len(raw(p).input_ids) for p in prompts]  # EOS included; "" -> just </s>
    cond = t5_folder.encode(prompts)
    assert cond.batch_size == 3 and cond.prompts == prompts
    assert cond.lens == expected_lens and expected_lens[1] == 1
    assert cond.cu_seqlens.tolist() == [0, expected_lens[0], sum(expected_lens[:2]), sum(expected_lens)]
    assert cond.kv_compact.shape == (sum(cond.lens), 2048) and cond.max_seqlen == max(expected_lens)
    # Batching does not change a prompt's features (padded positions are masked inside T5).
    _close(cond.kv_compact[0, :5], T5_REF["last_hidden_state_token0_first5"])
    alone = t5_folder.encode([prompts[2]]).kv_compact
    torch.testing.assert_close(cond.kv_compact[cond.lens[0] + 1:], alone, atol=1e-5, rtol=0)


def test_t5_truncation_warns(t5_folder):
    from transformers import AutoTokenizer

    long_prompt = " ".join(["a photo of a cat"] * 150)
    raw = AutoTokenizer.from_pretrained(str(T5_DIR), local_files_only=True, legacy=True)
    n_full = len(raw(long_prompt, verbose=False).input_ids)
    assert n_full > 512
    with pytest.warns(UserWarning, match=rf"prompt 1 .* last {n_full - 512} tokens were dropped"):
        cond = t5_folder.encode([PROMPT, long_prompt])
    assert cond.lens == [7, 512] and cond.max_seqlen == 512 and cond.kv_compact.shape == (519, 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = t5_folder.tokenize([long_prompt])
    assert ids[0, -1].item() == 1 and mask.all()  # truncation keeps </s> last
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5_folder.encode([PROMPT])  # no warning below the limit


def test_t5_nan_names_prompt():
    enc = load_t5_encoder(T5_FILE, tokenizer_path=T5_DIR)
    cat_id = T5_REF["prompt_input_ids"][5]  # '▁cat'
    with torch.no_grad():
        enc.model.shared.weight[cat_id] = float("nan")
    enc.encode(["a photo"])  # no '▁cat': finite
    with pytest.raises(ConfigError, match=r"prompt 1 .*NaN or Inf"):
        enc.encode(["a photo", PROMPT])


def test_infinity_conditioning_validation_and_ops():
    kv = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    cond = InfinityTextConditioning(kv, [2, 3], torch.tensor([0, 2, 5], dtype=torch.int32), 3, ["a", "b"])
    rep = cond.repeat(2)
    assert rep.prompts == ["a", "a", "b", "b"] and rep.lens == [2, 2, 3, 3]
    assert rep.cu_seqlens.tolist() == [0, 2, 4, 7, 10] and rep.cu_seqlens.dtype == torch.int32
    assert torch.equal(rep.kv_compact, torch.cat([kv[:2], kv[:2], kv[2:], kv[2:]]))
    sel = cond.select([1])
    assert sel.lens == [3] and sel.max_seqlen == 3 and torch.equal(sel.kv_compact, kv[2:])
    both = InfinityTextConditioning.cat([sel, cond])
    assert both.lens == [3, 2, 3] and both.prompts == ["b", "a", "b"] and both.kv_compact.shape == (8, 4)
    moved = cond.to("cpu")
    assert torch.equal(moved.kv_compact, kv) and moved.lens == cond.lens
    bad = kv.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ConfigError, match=r"prompt 1 \('b'\)"):
        InfinityTextConditioning(bad, [2, 3], torch.tensor([0, 2, 5], dtype=torch.int32), 3, ["a", "b"])
    with pytest.raises(ConfigError, match="sum\\(lens\\)"):
        InfinityTextConditioning(kv, [2, 2], torch.tensor([0, 2, 4], dtype=torch.int32), 2)
    with pytest.raises(ConfigError, match="cu_seqlens"):
        InfinityTextConditioning(kv, [2, 3], torch.tensor([0, 2, 5]), 3)


def test_t5_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_t5_encoder(tmp_path / "nowhere")
    no_tok = _copy_folder(T5_DIR, tmp_path / "no_tok", skip={"tokenizer.json", "spiece.model"})
    with pytest.raises(CheckpointError, match=r"no T5 tokenizer file: expected 'tokenizer.json'"):
        load_t5_encoder(no_tok)
    with pytest.raises(CheckpointError, match=r"'qwen2' model .*not a T5 encoder"):
        load_t5_encoder(QWEN_DIR)
    with pytest.raises(CheckpointError, match="not a T5 encoder: expected keys"):
        load_t5_encoder(QWEN_DIR / "model-00001-of-00002.safetensors", tokenizer_path=T5_DIR)
    with pytest.raises(CheckpointError, match="no tokenizer beside it: choose as its tokenizer the folder holding"):
        load_t5_encoder(T5_FILE)
    with pytest.raises(CheckpointError, match="'qwen2' model"):  # config.json taken from the tokenizer folder
        load_t5_encoder(T5_FILE, tokenizer_path=QWEN_DIR)
    no_weights = _copy_folder(T5_DIR, tmp_path / "no_weights", skip={"model.safetensors.index.json",
                                                                     "model-00001-of-00002.safetensors",
                                                                     "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="holds no T5 weights"):
        load_t5_encoder(no_weights)


def test_t5_incomplete_or_wrong_weights(tmp_path):
    sd = load_file(str(T5_FILE))
    partial = {k: v for k, v in sd.items() if k != "encoder.final_layer_norm.weight"}
    folder = _copy_folder(T5_DIR, tmp_path / "partial", skip={"model.safetensors.index.json",
                                                              "model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"})
    save_file(partial, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 T5 encoder tensors .*final_layer_norm"):
        load_t5_encoder(folder)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing .*encoder.final_layer_norm.weight"):
        load_t5_encoder(tmp_path / "partial.safetensors", tokenizer_path=T5_DIR)
    wrong = dict(sd, **{"encoder.final_layer_norm.weight": torch.ones(100)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"'encoder.final_layer_norm.weight' has shape \(100,\)"):
        load_t5_encoder(tmp_path / "wrong.safetensors", tokenizer_path=T5_DIR)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        load_t5_encoder(tmp_path / "broken.safetensors", tokenizer_path=T5_DIR)


def test_t5_half_precision():
    enc = load_t5_encoder(T5_FILE, tokenizer_path=T5_DIR, dtype=torch.float16)
    assert enc.dtype == torch.float16
    cond = enc.encode([PROMPT])
    assert cond.kv_compact.dtype == torch.float32
    _close(cond.kv_compact[0, :5], T5_REF["last_hidden_state_token0_first5"], atol=2e-2)


# ------------------------------------------------------------------------------------------------
# HART: Qwen2
# ------------------------------------------------------------------------------------------------


def test_qwen_tokenizer_reference(qwen):
    tok = qwen.tokenizer
    assert len(tok) == QWEN_REF["len_tokenizer"] and tok.bos_token is None
    assert tok.pad_token_id == 1000 and tok.eos_token_id == 1002 and tok.padding_side == "right"
    for text, i in QWEN_REF["special_token_ids"].items():
        assert tok.convert_tokens_to_ids(text) == i
    ids = qwen.tokenize([PROMPT])
    n = len(QWEN_REF["prompt_input_ids"])
    assert ids.shape == (1, 300)
    assert ids[0, :n].tolist() == QWEN_REF["prompt_input_ids"]
    assert tok.convert_ids_to_tokens(ids[0, :n].tolist()) == QWEN_REF["prompt_tokens"]
    assert ids[0, n:].eq(1000).all()
    assert tok(QWEN_REF["system_prompt"]).input_ids == QWEN_REF["system_prompt_input_ids"]


def test_qwen_features_reference_no_system_prompt(qwen):
    assert qwen.width == 1536
    cond = qwen.encode([PROMPT], use_system_prompt=False)
    assert cond.context.shape == (1, 300, 1536) and cond.context.dtype == torch.float32
    n = len(QWEN_REF["prompt_input_ids"])
    assert cond.mask.dtype == torch.bool and int(cond.mask.sum()) == n and cond.mask[0, :n].all()
    assert cond.position_ids.dtype == torch.int64
    assert cond.position_ids[0].tolist() == list(range(n)) + [n - 1] * (300 - n)
    _close(cond.context[0, 0, :5], QWEN_REF["padded300_hidden_states_last_token0_first5"])
    _close(cond.context[0, n - 1, :5], QWEN_REF["padded300_hidden_states_last_token4_first5"])
    # The unpadded statistics: padding is masked, so the real rows equal the unpadded run.
    assert abs(cond.context[0, :n].mean().item() - QWEN_REF["unpadded_hidden_states_last_mean"]) < ATOL
    assert abs(cond.context[0, :n].std().item() - QWEN_REF["unpadded_hidden_states_last_std"]) < ATOL


def test_qwen_features_reference_with_system_prompt(qwen):
    cond = qwen.encode([PROMPT], system_prompt=QWEN_REF["system_prompt"])
    n = len(QWEN_REF["prompt_input_ids"])
    assert cond.context.shape == (1, 300, 1536)
    assert cond.position_ids[0, :n].tolist() == list(range(n))  # positions ignore the system prefix
    _close(cond.context[0, 0, :5], QWEN_REF["with_system_prompt_token0_first5"])
    _close(cond.context[0, n - 1, :5], QWEN_REF["with_system_prompt_token4_first5"])


def test_hart_system_prompt_default(qwen):
    # docs/hart.md §3.2 step 4: 705 characters, ending in "User Prompt:" and one newline.
    assert len(HART_SYSTEM_PROMPT) == 705
    assert HART_SYSTEM_PROMPT.startswith('Given a user prompt, generate an "Enhanced prompt"')
    assert HART_SYSTEM_PROMPT.endswith('"Enhanced Prompt:".\n\nUser Prompt:\n')
    cond = qwen.encode([PROMPT, "two birds"])
    # Upstream's steps done by hand on the same transformers model: the system prompt tokenized alone
    # with the 300 limit (350 tokens with the tiny BPE, so truncated to 300), each prompt padded to 300.
    tok = qwen.tokenizer
    sys_ids = tok([HART_SYSTEM_PROMPT], max_length=300, padding="longest", truncation=True,
                  return_tensors="pt").input_ids
    assert sys_ids.shape == (1, 300)
    ids = torch.stack([tok(p, max_length=300, padding="max_length", truncation=True,
                           return_tensors="pt").input_ids[0] for p in [PROMPT, "two birds"]])
    mask = ids != tok.pad_token_id
    with torch.no_grad():
        ref = qwen.model(torch.cat([sys_ids.repeat(2, 1), ids], 1),
                         attention_mask=torch.cat([torch.ones(2, 300, dtype=torch.bool), mask], 1),
                         output_hidden_states=True).hidden_states[-1][:, 300:].float()
    torch.testing.assert_close(cond.context, ref, atol=1e-5, rtol=0)
    assert torch.equal(cond.mask, mask) and torch.equal(cond.position_ids, mask.cumsum(1) - 1)


def test_qwen_batch_independent(qwen):
    a = qwen.encode([PROMPT], use_system_prompt=False)
    b = qwen.encode(["a busy street", PROMPT], use_system_prompt=False)
    assert b.batch_size == 2 and b.prompts == ["a busy street", PROMPT]
    torch.testing.assert_close(b.context[1], a.context[0], atol=1e-5, rtol=0)
    assert torch.equal(b.mask[1], a.mask[0]) and torch.equal(b.position_ids[1], a.position_ids[0])
    rep = b.repeat(2)
    assert rep.prompts == ["a busy street", "a busy street", PROMPT, PROMPT]
    assert torch.equal(rep.context[3], b.context[1]) and torch.equal(b.select([1]).mask, a.mask)


def test_qwen_truncation_warns(qwen):
    long_prompt = " ".join(["a photo of a cat"] * 80)
    n_full = len(qwen.tokenizer(long_prompt, verbose=False).input_ids)
    assert n_full > 300
    with pytest.warns(UserWarning, match=rf"prompt 0 .* last {n_full - 300} tokens were dropped"):
        cond = qwen.encode([long_prompt], use_system_prompt=False)
    assert cond.mask.all() and cond.position_ids[0].tolist() == list(range(300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwen.tokenize([PROMPT])


def test_hart_conditioning_nan_names_prompt():
    ctx = torch.zeros(3, 4, 2)
    ctx[2, 1, 0] = float("nan")
    mask = torch.ones(3, 4, dtype=torch.bool)
    pos = torch.arange(4).expand(3, 4).clone()
    with pytest.raises(ConfigError, match=r"prompt 2 \('c'\)"):
        HARTTextConditioning(ctx, mask, pos, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="position_ids must be int64"):
        HARTTextConditioning(torch.zeros(3, 4, 2), mask, pos.int(), ["a", "b", "c"])
    ok = HARTTextConditioning(torch.zeros(3, 4, 2), mask, pos, ["a", "b", "c"]).to("cpu")
    assert ok.batch_size == 3


def test_qwen_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_qwen_encoder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file"):
        load_qwen_encoder(QWEN_DIR / "config.json")
    with pytest.raises(CheckpointError, match=r"'t5' model .*not Qwen2"):
        load_qwen_encoder(T5_DIR)
    no_tok = _copy_folder(QWEN_DIR, tmp_path / "no_tok", skip={"tokenizer.json", "vocab.json", "merges.txt"})
    with pytest.raises(CheckpointError, match=r"no Qwen2 tokenizer file: expected 'tokenizer.json'"):
        load_qwen_encoder(no_tok)
    no_weights = _copy_folder(QWEN_DIR, tmp_path / "no_weights", skip={"model.safetensors.index.json",
                                                                       "model-00001-of-00002.safetensors",
                                                                       "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_qwen_encoder(no_weights)
    sd = {}
    for f in sorted(QWEN_DIR.glob("model-*.safetensors")):
        sd.update(load_file(str(f)))
    del sd["model.norm.weight"]
    partial = _copy_folder(QWEN_DIR, tmp_path / "partial", skip={"model.safetensors.index.json",
                                                                 "model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"})
    save_file(sd, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 Qwen2 tensors .*norm.weight"):
        load_qwen_encoder(partial)


def test_qwen_bfloat16():
    enc = load_qwen_encoder(QWEN_DIR, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    cond = enc.encode([PROMPT], use_system_prompt=False)
    assert cond.context.dtype == torch.float32
    _close(cond.context[0, 0, :5], QWEN_REF["padded300_hidden_states_last_token0_first5"], atol=1e-1)


@pytest.mark.parametrize("name", ["t5_folder", "qwen"])
def test_encode_random_runs_the_columns_encode_runs(name, request):
    """The bench times encode_random in place of encode: the model must see as many token columns."""
    encoder = request.getfixturevalue(name)
    seen = []
    hook = encoder.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                   with_kwargs=True)
    try:
        prompt = "a red fox sitting in fresh snow at sunrise"
        n = len(encoder.tokenizer([prompt]).input_ids[0])
        encoder.encode([prompt, prompt])
        hidden = encoder.encode_random(2, n, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen[0] == seen[1] == (2, encoder.token_columns(n))
    assert hidden.shape == (2, encoder.token_columns(n), encoder.width)
