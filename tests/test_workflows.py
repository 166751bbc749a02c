"""Shipped workflows: valid against the node classes, laid out readably, and executed headlessly on the tiny
checkpoints."""

from __future__ import annotations

import itertools
import json
import re
import sys

import pytest
import torch
from pack import ROOT, load_pack

PACK = load_pack()
MAPPINGS = PACK.NODE_CLASS_MAPPINGS
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CORE_SINKS = {"SaveImage", "PreviewImage"}
VIRTUAL = {"Note", "Reroute"}  # frontend-only nodes: not in the prompt
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
    if node["type"] in ("PreviewImage", "Reroute"):
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
        assert node["type"] in MAPPINGS or node["type"] in CORE_SINKS | VIRTUAL, f"missing node type {node['type']}"
        if node["type"] == "Note":
            continue
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
        assert out["type"] == kind and inp["type"] in (kind, "*"), f"link {link_id}: {out['type']} -> {inp['type']}"
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


# Geometry as the ComfyUI frontend (1.27) draws it: a node's pos is the top-left of its body, the title bar
# (30 px) sits above it (Reroute nodes have none); slots are 20 px rows, the n-th socket (widget inputs are
# drawn on their widget row, not counted) centred at y + (n + 0.7) * 20, 10 px in from the edge; a link is a
# cubic spline leaving right and entering left with control points a quarter of the distance out; a group's
# title bar is 24 px x 1.4 tall. On load the frontend enlarges a node to its computed size: 20 px per socket
# row, 20 + 4 px per widget, 50 + 4 per multiline text box, 8 + 6 px of margins.
TITLE, SLOT, ROW, TEXT_BOX, GROUP_TITLE = 30, 20, 24, 54, 34
CHART = int(re.search(r"CHART_HEIGHT = (\d+)", (ROOT / "web" / "fastvar_schedule.js").read_text())[1]) + 6 + 4
GROUPS = {"Load", "Prompt", "FastVAR", "Output"}


def _min_body_height(node: dict) -> float:
    """Height the frontend gives the node's body, counted from its class's sockets and widget rows."""
    if node["type"] == "Reroute":
        return 26
    if node["type"] == "Note":
        return SLOT + TEXT_BOX + 8 + 6
    if node["type"] in CORE_SINKS:
        return SLOT + (ROW + 8 if node["type"] == "SaveImage" else 0) + 6
    cls = MAPPINGS[node["type"]]
    sockets = [n for n, spec in _inputs(cls).items() if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)]
    rows = max(len(sockets), len(cls.RETURN_TYPES), 1)
    widgets = CHART if node["type"] == "FastVAR_Pruning" else 0
    for spec in _inputs(cls).values():
        if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
            widgets += TEXT_BOX if spec[1].get("multiline") else ROW
            widgets += ROW if spec[1].get("control_after_generate") else 0
    return rows * SLOT + widgets + 8 + 6


def _rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the node as drawn, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - (0 if node["type"] == "Reroute" else TITLE), x + w, y + h


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _overlap(a, b, margin=0.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _link_points(nodes: dict, link: list, samples: int = 80) -> list[tuple[float, float]]:
    _, src, src_slot, dst, dst_slot, _ = link
    source, target = nodes[src], nodes[dst]
    a = (source["pos"][0] + source["size"][0] + 1 - SLOT / 2, source["pos"][1] + (src_slot + 0.7) * SLOT)
    sockets = [i for i in target["inputs"] if "widget" not in i]
    row = sockets.index(target["inputs"][dst_slot])
    b = (target["pos"][0] + SLOT / 2, target["pos"][1] + (row + 0.7) * SLOT)
    d = 0.25 * ((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
    c1, c2 = (a[0] + d, a[1]), (b[0] - d, b[1])
    points = []
    for k in range(samples + 1):
        t = k / samples
        u = 1 - t
        points.append(tuple(u**3 * p0 + 3 * u * u * t * p1 + 3 * u * t * t * p2 + t**3 * p3
                            for p0, p1, p2, p3 in zip(a, c1, c2, b)))
    return points


def _segments_cross(p, q, r, s) -> bool:
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return orient(p, q, r) * orient(p, q, s) < 0 and orient(r, s, p) * orient(r, s, q) < 0


def _crosses(line_a, line_b) -> bool:
    return any(_segments_cross(p, q, r, s) for p, q in zip(line_a, line_a[1:]) for r, s in zip(line_b, line_b[1:])
               if _overlap((min(p[0], q[0]), min(p[1], q[1]), max(p[0], q[0]), max(p[1], q[1])),
                           (min(r[0], s[0]), min(r[1], s[1]), max(r[0], s[0]), max(r[1], s[1]))))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_are_tall_enough_and_do_not_overlap(path):
    nodes = json.loads(path.read_text())["nodes"]
    for node in nodes:
        assert node["size"][1] >= _min_body_height(node), (
            f"{path.name}: {node['type']} is {node['size'][1]} px tall, its rows need {_min_body_height(node)}")
        title = node.get("title") or PACK.NODE_DISPLAY_NAME_MAPPINGS.get(node["type"], node["type"])
        if node["type"] != "Reroute":  # title text at 14 px x 0.6 per character plus 30 + 10 px of padding
            assert node["size"][0] >= max(40 + 8.4 * len(title), 210), f"{path.name}: {title} is too narrow"
    for a, b in itertools.combinations(nodes, 2):
        assert not _overlap(_rect(a), _rect(b), margin=10), f"{path.name}: {a['type']} overlaps {b['type']}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_groups_hold_every_node_and_a_note_explains_it(path):
    workflow = json.loads(path.read_text())
    groups = {g["title"]: (g["bounding"][0], g["bounding"][1] + GROUP_TITLE, g["bounding"][0] + g["bounding"][2],
                           g["bounding"][1] + g["bounding"][3]) for g in workflow["groups"]}
    assert set(groups) == GROUPS and len(workflow["groups"]) == len(GROUPS)
    for a, b in itertools.combinations(workflow["groups"], 2):
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounding"], b["bounding"]
        assert not _overlap((ax, ay, ax + aw, ay + ah), (bx, by, bx + bw, by + bh)), f"{a['title']} / {b['title']}"
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        holders = [title for title, box in groups.items() if _inside(_rect(node), box)]
        assert len(holders) == 1, f"{path.name}: {node['type']} is inside {holders or 'no group'}"
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"]) == 1
    text = notes[0]["widgets_values"][0].lower()
    if "baseline" in path.name:
        assert "compare" in text and "image" in text and "time" in text
    else:
        assert "chart" in text and "token map" in text
    # the note is outside the groups
    assert not any(_overlap(_rect(notes[0]), box) for box in groups.values())


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_links_flow_right_around_nodes_without_crossing(path):
    """Every link runs left to right, under no node, and crosses no other link, except links into a Reroute:
    those carry the shared model, prompt and VAE down to the baseline row of the comparison, and a prompt node
    that feeds two samplers always crosses one of its own links there (positive and negative leave it in one
    order and reach the two samplers in the other)."""
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    lines = {}
    for link in workflow["links"]:
        link_id, src, _, dst, _, kind = link
        assert _rect(nodes[src])[2] <= _rect(nodes[dst])[0], f"{path.name}: {kind} link runs right to left"
        lines[link_id] = _link_points(nodes, link)
        for node in nodes.values():
            if node["id"] in (src, dst):
                continue
            box = _rect(node)
            under = [p for p in lines[link_id] if box[0] - 4 <= p[0] <= box[2] + 4 and box[1] - 4 <= p[1] <= box[3] + 4]
            assert not under, f"{path.name}: {kind} link {src}->{dst} runs under {node['type']} at {under[0]}"
    links = {link[0]: link for link in workflow["links"]}
    for a, b in itertools.combinations(links, 2):
        if links[a][1:3] == links[b][1:3]:  # one output fanning out
            continue
        if "Reroute" in (nodes[links[a][3]]["type"], nodes[links[b][3]]["type"]):
            continue
        assert not _crosses(lines[a], lines[b]), (
            f"{path.name}: links {links[a][1]}->{links[a][3]} and {links[b][1]}->{links[b][3]} cross")


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
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] != "Note"}
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
            elif node["type"] == "Reroute":
                outputs[node_id] = (kwargs[""],)
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
