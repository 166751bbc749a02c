"""Safe checkpoint reading: no code runs from a file, every bad file gets one clear error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastvar_core.checkpoint import (
    convert_to_safetensors,
    load_file,
    load_sharded_folder,
    load_state_dict,
    prefer_safetensors,
)
from fastvar_core.errors import CheckpointError


class _Payload:
    """Unpickling this creates a file: proof that the loader never executes pickled code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_creates_nothing(tmp_path, fmt):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _Payload(str(target))}, evil,
               _use_new_zipfile_serialization=(fmt == "zip"))
    with pytest.raises(CheckpointError) as info:
        load_file(evil)
    assert not target.exists()
    message = str(info.value)
    assert str(evil) in message and "arbitrary Python pickle" in message and "fastvar_core convert" in message


def test_plain_pickle_without_torch_is_refused(tmp_path):
    target = tmp_path / "pwned2"
    path = tmp_path / "raw.bin"
    path.write_bytes(pickle.dumps(_Payload(str(target))))
    with pytest.raises(CheckpointError):
        load_file(path)
    assert not target.exists()


def test_empty_missing_directory_truncated(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(CheckpointError, match="is empty \\(0 bytes\\)"):
        load_file(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder, but a single weight file"):
        load_file(tmp_path)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated or corrupt"):
        load_file(cut)
    pth = tmp_path / "good.pth"
    torch.save({"a": torch.randn(64, 64)}, pth)
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or corrupt"):
        load_file(cut_pth)


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, but a dict of tensors"):
        load_file(path)


def test_convert_round_trip_and_preference(tmp_path):
    src = tmp_path / "model.pth"
    tensors = {"vae": {"a": torch.randn(3, 4), "b": torch.arange(5)}, "step": 7}
    torch.save(tensors, src)
    assert prefer_safetensors(src) == src
    n = convert_to_safetensors(src, tmp_path / "model.safetensors")
    assert n == 2
    assert prefer_safetensors(src) == tmp_path / "model.safetensors"
    back = load_state_dict(src)  # reads the safetensors twin
    assert set(back) == {"vae.a", "vae.b"}
    assert torch.equal(back["vae.a"], tensors["vae"]["a"]) and back["vae.b"].dtype == torch.int64


def test_sharded_folder(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_sharded_folder(tmp_path)
    assert set(state) == {"a", "b"}
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists 1 tensors that no shard holds, e.g. 'c'"):
        load_sharded_folder(tmp_path)



def test_strict_key_check_names_missing_and_unexpected_tensors():
    from fastvar_core.checkpoint import check_state_keys

    check_state_keys({"a": 1, "b": 2}, ["b", "a"], "never raised")
    with pytest.raises(CheckpointError) as err:
        check_state_keys([f"k{i}" for i in range(7)], ["k0", "extra"], "'m.pth' does not match X", name=str.upper)
    assert str(err.value) == ("'m.pth' does not match X: 6 missing tensors: 'K1', 'K2', 'K3', 'K4' (+2 more); "
                              "1 unexpected tensor: 'EXTRA'.")


def test_read_shapes_gives_names_and_shapes_without_data(tmp_path):
    from fastvar_core.checkpoint import flatten_tensors, read_shapes

    tensors = {"decoder.conv_in.conv.weight": torch.ones(8, 4, 3, 3), "vae.scale": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "v.safetensors"))
    torch.save({"vae": tensors}, tmp_path / "v2.pth")
    for name, prefix in (("v.safetensors", ""), ("v2.pth", "vae.")):
        shapes = flatten_tensors(read_shapes(tmp_path / name))
        assert {k: (tuple(v.shape), v.device.type) for k, v in shapes.items()} == {
            f"{prefix}decoder.conv_in.conv.weight": ((8, 4, 3, 3), "meta"), f"{prefix}vae.scale": ((2,), "meta")}
