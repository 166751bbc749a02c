"""Miswired graphs fail before sampling, naming the inputs at fault (issue #15 item 5), on the tiny
official-format checkpoints laid out like ComfyUI's models folder (tools.tiny_models)."""

from __future__ import annotations

import sys

import pytest
from pack import load_pack

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
compat = PACK.nodes.compat
generation = PACK.nodes.generation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tools.tiny_models import main as tiny_models

    root = tmp_path_factory.mktemp("models")
    tiny_models([str(root)])
    compat.set_model_dirs({name: [root / name] for name in ("infinity", "vae", "hart", "text_encoders")})
    yield root
    compat.set_model_dirs({})


@pytest.fixture
def sampled(monkeypatch):
    """The sampler's runs (none must happen when the wiring is wrong)."""
    calls = []
    monkeypatch.setattr(generation.families, "sample", lambda *a, **k: calls.append(a) or pytest.fail("sampled"))
    return calls


def _encode(encoder_node, name):
    enc = NODES[encoder_node]().load(name, *(["same folder"] if "T5" in encoder_node else []), "float32")["result"][0]
    return NODES["FastVAR_TextEncode"]().encode(enc, "a red fox", "")[0]


def _sample(model, positive, prompt=None):
    return NODES["FastVAR_Sampler"]().sample(model, positive, 0, 1024, 1024, "from width/height", "auto", 3.0, 0.5,
                                             900, 0.97, 1, prompt=prompt, unique_id="3")


def _graph(vae_loader, vae_name):
    """API prompt: sampler 3 -> Decode 5 <- VAE loader 4."""
    return {"3": {"class_type": "FastVAR_Sampler", "inputs": {}},
            "4": {"class_type": vae_loader, "inputs": {"vae_folder" if "HART" in vae_loader else "vae_name": vae_name}},
            "5": {"class_type": "FastVAR_Decode", "inputs": {"vae": ["4", 0], "latent": ["3", 0], "tiling": "auto"}}}


@pytest.fixture(scope="module")
def infinity_2b(models):
    return NODES["FastVAR_LoadInfinityModel"]().load("infinity_2b_reg.pth", "float32", "auto")["result"][0]


def test_8b_vae_with_the_2b_model_fails_before_sampling(models, infinity_2b, sampled):
    t5 = _encode("FastVAR_LoadT5TextEncoder", "flan-t5-xl")
    with pytest.raises(Exception) as info:
        _sample(infinity_2b, t5, _graph("FastVAR_LoadInfinityVAE", "infinity_vae_d56_f8_14_patchify.pth"))
    text = str(info.value)
    assert type(info.value).__name__ == "IncompatibleModelsError"
    assert text.startswith("FastVAR Decode's VAE 'infinity_vae_d56_f8_14_patchify.pth': VAE and transformer do not "
                           "belong together")
    assert "needs a 32-bit VAE, but the VAE has 14-bit codes" in text
    assert sampled == []


def test_hart_vae_on_an_infinity_latent_fails_before_sampling(models, infinity_2b, sampled):
    t5 = _encode("FastVAR_LoadT5TextEncoder", "flan-t5-xl")
    with pytest.raises(Exception, match="FastVAR Decode \\(fed by this sampler\\): input 'latent' holds a latent made "
                                        "by Infinity, but 'vae' holds a VAE of HART"):
        _sample(infinity_2b, t5, _graph("FastVAR_LoadHARTVAE", "hart-0.7b-1024px"))
    assert sampled == []


def test_hart_model_with_the_t5_conditioning_names_the_inputs(models, sampled):
    hart = NODES["FastVAR_LoadHARTModel"]().load("hart-0.7b-1024px", "float32", "auto")["result"][0]
    t5 = _encode("FastVAR_LoadT5TextEncoder", "flan-t5-xl")
    with pytest.raises(Exception) as info:
        _sample(hart, t5)
    assert str(info.value).startswith(
        "FastVAR Sampler: input 'model' holds a model of HART, but 'positive' holds Infinity conditioning (from its text "
        "encoder, flan-t5-xl). Connect parts of one model family (each family's text encoder: Infinity: flan-t5-xl, "
        "HART: Qwen2-VL-1.5B-Instruct")
    assert sampled == []


def test_infinity_model_with_the_qwen_conditioning_names_the_inputs(models, infinity_2b, sampled):
    qwen = _encode("FastVAR_LoadQwen2TextEncoder", "Qwen2-VL-1.5B-Instruct")
    with pytest.raises(Exception, match="input 'model' holds a model of Infinity, but 'positive' holds HART conditioning "
                                        "\\(from its text encoder, Qwen2-VL-1.5B-Instruct\\)"):
        _sample(infinity_2b, qwen)
    assert sampled == []


def test_decode_checks_the_loaded_vae_against_the_model(models, infinity_2b, monkeypatch):
    """Decode repeats the check on the loaded objects (a VAE file name from another node is not seen before)."""
    t5 = _encode("FastVAR_LoadT5TextEncoder", "flan-t5-xl")
    out = _sample(infinity_2b, t5)["result"][0]
    vae_8b = NODES["FastVAR_LoadInfinityVAE"]().load("infinity_vae_d56_f8_14_patchify.pth")["result"][0]
    with pytest.raises(Exception, match="FastVAR Decode's input 'vae': VAE and transformer do not belong together.*"
                                        "needs a 32-bit VAE, but the VAE has 14-bit codes"):
        NODES["FastVAR_Decode"]().decode(vae_8b, out, "auto")


def test_sampler_info_and_log_say_a_speed_target_fell_short(models, infinity_2b, caplog):
    """Issue #15 item 6: the node says what an unreachable speed target reached and why."""
    request = NODES["FastVAR_Pruning"]().build("speed target", 20.0, 5, -1, -1, "Infinity-2B 1024px")[0]
    t5 = _encode("FastVAR_LoadT5TextEncoder", "flan-t5-xl")
    sampler = NODES["FastVAR_Sampler"]()
    with caplog.at_level("WARNING", logger="fastvar"):
        info = sampler.sample(infinity_2b, t5, 0, 1024, 1024, "from width/height", "auto", 3.0, 0.5, 900, 0.97, 1,
                              pruning=request, prompt={}, unique_id="3")["result"][1]
    note = info.splitlines()[-1]  # after the run line and the memory line
    assert note.startswith("speed target 20x is out of reach: reached ")
    assert "only the last 6 scales pruned (at most 90% of their tokens, up to 2 of them skipped)" in note
    assert note in caplog.text
