"""Loader dropdowns over a models folder laid out like the real releases (issue #15 item 12)."""

from __future__ import annotations

import pytest
from pack import load_pack

PACK = load_pack()
LOADERS = PACK.nodes.loaders
compat = PACK.nodes.compat


def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _hf_folder(folder, model_type, shards=2):
    _touch(folder / "config.json", f'{{"model_type": "{model_type}"}}')
    _touch(folder / "model.safetensors.index.json", "{}")
    for i in range(1, shards + 1):
        _touch(folder / f"model-{i:05d}-of-{shards:05d}.safetensors")
    _touch(folder / "tokenizer.json", "{}")
    _touch(folder / "tokenizer_config.json", "{}")


@pytest.fixture
def models(tmp_path):
    """models/ as the release downloads leave it, plus the loose pieces artists copy around."""
    _touch(tmp_path / "infinity" / "infinity_2b_reg.pth")
    _hf_folder(tmp_path / "infinity" / "infinity_8b_weights", "unused", shards=7)
    (tmp_path / "infinity" / "infinity_8b_weights" / "config.json").unlink()
    _hf_folder(tmp_path / "infinity" / "flan-t5-xl", "t5")
    _touch(tmp_path / "vae" / "infinity_vae_d32reg.pth")
    _touch(tmp_path / "vae" / "infinity_vae_d56_f8_14_patchify.pth")
    # T5 encoder shards copied flat into text_encoders, and a bare tokenizer folder holding a weight file.
    _touch(tmp_path / "text_encoders" / "model-00001-of-00002.safetensors")
    _touch(tmp_path / "text_encoders" / "t5_xl_encoder.safetensors")
    _touch(tmp_path / "diffusion_models" / "t5-tokenizer" / "spiece.model")
    _touch(tmp_path / "diffusion_models" / "t5-tokenizer" / "pytorch_model.bin")
    hart = tmp_path / "hart" / "hart-0.7b-1024px"
    _touch(hart / "llm" / "config.json", '{"model_type": "hart_transformer_t2i"}')
    _touch(hart / "llm" / "ema_model.bin")
    _touch(hart / "tokenizer" / "config.json", '{"model_type": "hart_autoencoder_with_disc"}')
    _touch(hart / "tokenizer" / "model.safetensors")
    _hf_folder(tmp_path / "hart" / "Qwen2-VL-1.5B-Instruct", "qwen2_vl")
    compat.set_model_dirs({name: [tmp_path / name] for name in
                           ("infinity", "diffusion_models", "vae", "hart", "text_encoders")})
    yield tmp_path
    compat.set_model_dirs({})


def _choices(cls, name):
    return cls.INPUT_TYPES()["required"][name][0]


def test_infinity_models_are_the_two_releases_only(models):
    assert _choices(LOADERS.LoadInfinityModel, "model_name") == ["infinity_2b_reg.pth", "infinity_8b_weights"]
    assert _choices(LOADERS.LoadInfinityVAE, "vae_name") == [
        "infinity_vae_d32reg.pth", "infinity_vae_d56_f8_14_patchify.pth"]


def test_t5_lists_no_shards_and_no_tokenizer_folders(models):
    assert _choices(LOADERS.LoadT5TextEncoder, "text_encoder") == ["flan-t5-xl", "t5_xl_encoder.safetensors"]
    assert _choices(LOADERS.LoadT5TextEncoder, "tokenizer") == ["same folder", "flan-t5-xl"]


def test_hart_release_is_listed_once(models):
    assert _choices(LOADERS.LoadHARTModel, "model_folder") == ["hart-0.7b-1024px"]
    assert _choices(LOADERS.LoadHARTVAE, "vae_folder") == ["hart-0.7b-1024px"]
    assert _choices(LOADERS.LoadQwen2TextEncoder, "text_encoder") == ["Qwen2-VL-1.5B-Instruct"]

