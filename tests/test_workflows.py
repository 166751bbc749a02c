"""Shipped workflows: valid against the node classes, and executed headlessly on the tiny checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from pack import ROOT, load_pack

PACK = load_pack()
MAPPINGS = PACK.NODE_CLASS_MAPPINGS
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CORE_SINKS = {"SaveImage", "PreviewImage"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Expected image size (height, width) of each workflow, from its sampler settings.
EXPECTED_SIZE = {
    "infinity_2b_1024_fastvar.json": (1024, 1024),
    "infinity_2b_2k_fastvar.json": (2048, 2048),
    "infinity_8b_1024_fastvar.json": (1024, 1024),
    "hart_1024_fastvar.json": (1024, 1024),
    "infinity_2b_baseline_vs_fastvar.json": (1024, 1024),
}


def _inputs(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _widget_values(node: dict) -> dict:
    """Map a UI node's positional widgets_values to input names (skipping control_after_generate)."""
    if node["type"] == "SaveImage":
        return {"filename_prefix": node["widgets_values"][0]}
    if node["type"] == "PreviewImage":
        return {}
    values = list(node["widgets_values"])
    out = {}
    for name, spec in _inputs(MAPPINGS[node["type"]]).items():
        if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
            out[name] = values.pop(0)
            if spec[1].get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
    assert not values, f"{node['type']}: {len(values)} widget values left over"
    return out


def test_every_shipped_workflow_is_listed():
    assert {w.name for w in WORKFLOWS} == set(EXPECTED_SIZE)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_nodes(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in MAPPINGS or node["type"] in CORE_SINKS, f"missing node type {node['type']}"
        values = _widget_values(node)
        if node["type"] in CORE_SINKS:
            continue
        for name, value in values.items():
            kind, options = _inputs(MAPPINGS[node["type"]])[name]
            if isinstance(kind, list):
                if kind:  # model combos are empty without model folders; checked when executed
                    assert value in kind, f"{path.name}: {node['type']}.{name} = {value!r} not in {kind}"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], f"{node['type']}.{name} = {value} out of range"
                assert isinstance(value, int if kind == "INT" else (int, float))
            elif kind == "STRING":
                assert isinstance(value, str)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind == inp["type"], f"link {link_id}: {out['type']} -> {inp['type']}"
        assert link_id in out["links"] and inp["link"] == link_id
        if nodes[src]["type"] in MAPPINGS:
            assert MAPPINGS[nodes[src]["type"]].RETURN_TYPES[src_slot] == kind
        if nodes[dst]["type"] in MAPPINGS:
            assert _inputs(MAPPINGS[nodes[dst]["type"]])[inp["name"]][0] == kind
    for node in nodes.values():  # every required socket is connected
        if node["type"] in MAPPINGS:
            required = MAPPINGS[node["type"]].INPUT_TYPES()["required"]
            for inp in node["inputs"]:
                if inp["name"] in required and "widget" not in inp:
                    assert inp["link"] is not None, f"{path.name}: {node['type']}.{inp['name']} is not connected"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, shared_dir):
    from tools.tiny_models import lay_out

    dest = tmp_path_factory.mktemp("models")
    lay_out(dest)
    compat = sys.modules[PACK.__name__ + ".nodes.compat"]
    compat.set_model_dirs({
        "infinity": [dest / "infinity"], "diffusion_models": [], "vae": [dest / "vae"], "hart": [dest / "hart"],
        "text_encoders": [dest / "text_encoders"],
    })
    yield dest
    compat.set_model_dirs({})


def execute(workflow: dict) -> dict[int, tuple]:
    """Run a UI workflow by calling the node functions in dependency order; return every node's outputs."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    outputs: dict[int, tuple] = {}
    pending = list(nodes)
    while pending:
        for node_id in list(pending):
            node = nodes[node_id]
            sources = [links[i["link"]] for i in node["inputs"] if i.get("link") is not None]
            if any(src[1] not in outputs for src in sources):
                continue
            kwargs = _widget_values(node)
            for inp in node["inputs"]:
                if inp.get("link") is not None:
                    _, src, slot, *_ = links[inp["link"]]
                    kwargs[inp["name"]] = outputs[src][slot]
            if node["type"] in CORE_SINKS:
                outputs[node_id] = (kwargs["images"],)
            else:
                cls = MAPPINGS[node["type"]]
                if hasattr(cls, "VALIDATE_INPUTS"):
                    assert cls.VALIDATE_INPUTS(**{k: v for k, v in kwargs.items() if not hasattr(v, "__dict__")}) is True
                for name, (kind, _) in _inputs(cls).items():
                    if isinstance(kind, list) and name in kwargs and not isinstance(kwargs[name], (int, float)):
                        assert kwargs[name] in kind, f"{node['type']}.{name} = {kwargs[name]!r} not in {kind}"
                result = getattr(cls(), cls.FUNCTION)(**kwargs)
                outputs[node_id] = result["result"] if isinstance(result, dict) else result
            pending.remove(node_id)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_on_tiny_checkpoints(path, tiny_models):
    workflow = json.loads(path.read_text())
    outputs = execute(workflow)
    saved = [outputs[n["id"]][0] for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert saved
    h, w = EXPECTED_SIZE[path.name]
    for image in saved:
        assert image.shape == (1, h, w, 3) and image.dtype == torch.float32
        assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    for node in workflow["nodes"]:
        if node["type"] == "FastVAR_TokenMap":
            maps, mask = outputs[node["id"]]
            assert maps.shape[1:] == (h, w, 3) and mask.shape[1:] == (h, w) and maps.shape[0] == mask.shape[0] >= 1
            assert 0 < mask.mean() < 1  # some tokens kept, some pruned
        if node["type"] == "FastVAR_Sampler":
            latent, info = outputs[node["id"]]
            assert f"{w}x{h}" in info
