"""Writes the shipped UI-format workflows (workflows/*.json) from one description per graph.

Run after changing a node's inputs: `python tools/build_workflows.py`. Widget values are laid out in
INPUT_TYPES order (required, then optional), with the seed's control value after it, which is how
the frontend saves them; tests/test_workflows.py checks every file against the node classes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def load_pack():
    spec = importlib.util.spec_from_file_location("fastvar_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastvar_pack"] = module
    spec.loader.exec_module(module)
    return module


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


# Node geometry as the ComfyUI frontend (1.27) computes it (LGraphNode.computeSize): a node's `pos` is the
# top-left corner of its body; the title bar (TITLE px) sits above it. The frontend enlarges a loaded node to
# at least this size, so a smaller stored size makes the node spill onto its neighbour.
TITLE, SLOT, WIDGET, MULTILINE = 30, 20, 24, 54  # a widget row is 20 px + 4 px spacing; a multiline box 50 + 4
# The schedule chart: web/fastvar_schedule.js's CHART_HEIGHT + 6, + 4 spacing.
CHART_HEIGHT = int(re.search(r"CHART_HEIGHT = (\d+)", (ROOT / "web" / "fastvar_schedule.js").read_text())[1])
DOM_EXTRA = {"FastVAR_Pruning": CHART_HEIGHT + 6 + 4}
RUN_INFO = 320  # room under the sampler's widgets for the per-scale preview and run info shown during and after a run
GAP = 100  # between columns: 20 px of group padding on each side and room for the links to bend
GROUP_COLORS = {"Load": "#3f789e", "Prompt": "#8A8", "FastVAR": "#b06634", "Output": "#88A"}


def min_height(mappings, node_type: str) -> int:
    """Body height the frontend gives a node of this type (without the title bar)."""
    if node_type == "Note":
        return SLOT + MULTILINE + 8 + 6
    if node_type not in mappings:  # SaveImage (filename widget) / PreviewImage
        return SLOT + (WIDGET + 8 if node_type == "SaveImage" else 0) + 6
    cls = mappings[node_type]
    types = cls.INPUT_TYPES()
    inputs = {**types.get("required", {}), **types.get("optional", {})}
    sockets = [spec for spec in inputs.values() if not is_widget(spec)]
    rows = max(len(sockets), len(cls.RETURN_TYPES), 1)
    widgets = 0
    for spec in inputs.values():
        if is_widget(spec):
            options = spec[1] if len(spec) > 1 else {}
            widgets += MULTILINE if spec[0] == "STRING" and options.get("multiline") else WIDGET
            widgets += WIDGET if options.get("control_after_generate") else 0
    widgets += DOM_EXTRA.get(node_type, 0)
    return rows * SLOT + (widgets + 8 if widgets else 0) + 6


class Graph:
    def __init__(self, mappings):
        self.mappings = mappings
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _entry(self, node_type, pos, size, title=None):
        node_id = len(self.nodes) + 1
        entry = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                 "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [],
                 "properties": {"Node name for S&R": node_type}, "widgets_values": []}
        if title:
            entry["title"] = title
        self.nodes.append(entry)
        return entry

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None, width=330,
            extra_height=0):
        """Add a node at `pos` (top-left of its body), as tall as the frontend will draw it."""
        widgets = widgets or {}
        entry = self._entry(node_type, pos, (width, min_height(self.mappings, node_type) + extra_height), title)
        if node_type in self.mappings:
            cls = self.mappings[node_type]
            types = cls.INPUT_TYPES()
            inputs = {**types.get("required", {}), **types.get("optional", {})}
            unknown = set(widgets) - {k for k, v in inputs.items() if is_widget(v)}
            if unknown:
                raise KeyError(f"{node_type}: no widget named {sorted(unknown)}")
            for name, spec in inputs.items():
                if is_widget(spec):
                    default = spec[1].get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
                    entry["widgets_values"].append(widgets.get(name, default))
                    entry["inputs"].append({"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                                            "widget": {"name": name}, "link": None})
                    if spec[1].get("control_after_generate"):
                        entry["widgets_values"].append("fixed")
                else:
                    entry["inputs"].append({"name": name, "type": spec[0], "link": None})
            for slot, (kind, name) in enumerate(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))):
                entry["outputs"].append({"name": name, "type": kind, "links": [], "slot_index": slot})
        else:  # core nodes used at the end of the graphs
            entry["inputs"].append({"name": "images", "type": "IMAGE", "link": None})
            if node_type == "SaveImage":
                entry["widgets_values"] = [widgets.get("filename_prefix", "FastVAR")]
                entry["inputs"].append({"name": "filename_prefix", "type": "STRING",
                                        "widget": {"name": "filename_prefix"}, "link": None})
        return entry["id"]

    def note(self, pos, text: str, width: int, height: int) -> None:
        """A Note node (the frontend's yellow sticky note) with the workflow's read-me."""
        entry = self._entry("Note", pos, (width, max(height, min_height(self.mappings, "Note"))), title="Read me")
        entry["properties"] = {"text": ""}
        entry["widgets_values"] = [text]
        entry["color"], entry["bgcolor"] = "#432", "#653"

    def reroute(self, pos, src: int, out_name: str) -> int:
        """A frontend Reroute node carrying output `out_name` of node `src`; returns its id."""
        source = self.nodes[src - 1]
        kind = next(o["type"] for o in source["outputs"] if o["name"] == out_name)
        entry = self._entry("Reroute", pos, (75, 26))
        entry["properties"] = {"showOutputText": False, "horizontal": False}
        entry["inputs"].append({"name": "", "type": "*", "link": None})
        entry["outputs"].append({"name": "", "type": kind, "links": [], "slot_index": 0})
        self.link(src, out_name, entry["id"], "")
        return entry["id"]

    def bottom(self, node_id: int) -> float:
        node = self.nodes[node_id - 1]
        return node["pos"][1] + node["size"][1]

    def right(self, node_id: int) -> float:
        node = self.nodes[node_id - 1]
        return node["pos"][0] + node["size"][0]

    def group(self, title: str, members: list[int]) -> None:
        """A group around `members`; all groups start at y = 0 so their title bars line up."""
        nodes = [self.nodes[i - 1] for i in members]
        left = min(n["pos"][0] for n in nodes) - 20
        right = max(n["pos"][0] + n["size"][0] for n in nodes) + 20
        low = max(n["pos"][1] + n["size"][1] for n in nodes) + 20
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, 0, right - left, low],
                            "color": GROUP_COLORS[title], "font_size": 24, "flags": {}})

    def link(self, src: int, out_name: str, dst: int, in_name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == out_name)
        tslot = next(i for i, x in enumerate(target["inputs"]) if x["name"] == in_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][slot]["type"]
        self.links.append([link_id, src, slot, dst, tslot, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][tslot]["link"] = link_id

    def to_json(self, models: list[dict]) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [20, 20]}}, "version": 0.4, "models": models}


HF_INFINITY = "https://huggingface.co/FoundationVision/Infinity/resolve/main/"
PROMPT = "a red fox sitting in fresh snow at sunrise, soft golden light, highly detailed fur, 35mm photo"

NOTE_SINGLE = (
    "{what}\n\n"
    "Load: model, VAE and text encoder files. Prompt: your text. FastVAR: the Pruning node's chart shows, per scale, "
    "how many tokens the sampler keeps (and its predicted speedup); the Sampler draws the image and shows what it "
    "ran and how long it took. Output: the image, and a Token Map of which tokens were kept (bright) or pruned.")
NOTE_COMPARE = (
    "Baseline vs FastVAR: the same prompt, seed and size run twice. The top row prunes tokens with FastVAR, the "
    "bottom row runs the full model (baseline).\n\n"
    "Compare the two saved images (they should look nearly the same) and the run info under each sampler: the "
    "time of each run gives the real speedup on your machine.")

# Column layout, left to right: Load | Prompt | FastVAR (Pruning, Sampler) | Output (Decode, images).
# Links run in horizontal lanes: the VAE lane on top (y 94), the model lane below it (y 214), then the prompt;
# a node in a column sits below every lane that passes over it, so no link runs under a node.
W_LOAD, W_PROMPT, W_PRUNE, W_SAMPLER, W_DECODE, W_IMAGE = 330, 380, 360, 340, 260, 400
IMAGE_H = 440  # room for the saved image


def columns(gaps):
    widths = [W_LOAD, W_PROMPT, W_PRUNE, W_SAMPLER, W_DECODE, W_IMAGE]
    xs = [0]
    for width, gap in zip(widths, gaps):
        xs.append(xs[-1] + width + gap)
    return xs


def _loaders(g, family, *, model, vae, text_encoder):
    """Load column: VAE (top lane), model (second lane), text encoder (feeds the prompt only)."""
    v = g.add(family["vae"], (0, 80), {family["vae_widget"]: vae})
    m = g.add(family["model"], (0, 200), {family["model_widget"]: model})
    t = g.add(family["text_encoder"], (0, g.bottom(m) + 50), {"text_encoder": text_encoder})
    return v, m, t


INFINITY = {"vae": "FastVAR_LoadInfinityVAE", "vae_widget": "vae_name", "model": "FastVAR_LoadInfinityModel",
            "model_widget": "model_name", "text_encoder": "FastVAR_LoadT5TextEncoder"}
HART = {"vae": "FastVAR_LoadHARTVAE", "vae_widget": "vae_folder", "model": "FastVAR_LoadHARTModel",
        "model_widget": "model_folder", "text_encoder": "FastVAR_LoadQwen2TextEncoder"}


def single_graph(mappings, family, *, model, vae, text_encoder, sampler: dict, pruning: dict, negative: bool,
                 prefix: str, what: str):
    """One run: loaders -> prompt -> pruning + sampler -> decode + save, and the token map of the run."""
    g = Graph(mappings)
    x1, x2, x3, x4, x5, x6 = columns([GAP] * 5)
    g.note((0, -250), NOTE_SINGLE.format(what=what), width=x3 - 60, height=200)
    v, m, t = _loaders(g, family, model=model, vae=vae, text_encoder=text_encoder)
    e = g.add("FastVAR_TextEncode", (x2, 280), {"prompt": PROMPT}, width=W_PROMPT)
    g.link(t, "text_encoder", e, "text_encoder")
    p = g.add("FastVAR_Pruning", (x3, 370), pruning, width=W_PRUNE)
    s = g.add("FastVAR_Sampler", (x4, 200), sampler, width=W_SAMPLER, extra_height=RUN_INFO)
    g.link(m, "model", s, "model")
    g.link(e, "positive", s, "positive")
    if negative:
        g.link(e, "negative", s, "negative")
    g.link(p, "pruning", s, "pruning")
    d = g.add("FastVAR_Decode", (x5, 80), {}, width=W_DECODE)
    g.link(v, "vae", d, "vae")
    g.link(s, "latent", d, "latent")
    out = g.add("SaveImage", (x6, 80), {"filename_prefix": prefix}, width=W_IMAGE,
                extra_height=IMAGE_H - min_height(mappings, "SaveImage"))
    g.link(d, "image", out, "images")
    row2 = g.bottom(out) + 50
    tm = g.add("FastVAR_TokenMap", (x5, row2), {}, width=W_DECODE)
    g.link(s, "latent", tm, "latent")
    pv = g.add("PreviewImage", (x6, row2), {}, width=W_IMAGE, extra_height=300 - min_height(mappings, "PreviewImage"))
    g.link(tm, "token_maps", pv, "images")
    g.group("Load", [v, m, t])
    g.group("Prompt", [e])
    g.group("FastVAR", [p, s])
    g.group("Output", [d, out, tm, pv])
    return g


def compare_graph(mappings, *, model, vae, width, height, preset):
    """Baseline (no pruning) and FastVAR from one model, prompt and VAE.

    The shared model, prompt and VAE reach the baseline row through Reroute nodes below the top row: a prompt
    node feeding two samplers always crosses one of its own links (positive and negative leave it in one order
    and reach the two samplers in another), so those few crossings happen in the gaps between groups, next to
    the reroutes, never under a node."""
    g = Graph(mappings)
    x1, x2, x3, x4, x5, x6 = columns([160, 160, GAP, GAP, GAP])
    g.note((0, -250), NOTE_COMPARE, width=x3 - 60, height=200)
    v, m, t = _loaders(g, INFINITY, model=model, vae=vae, text_encoder="flan-t5-xl")
    e = g.add("FastVAR_TextEncode", (x2, 280), {"prompt": PROMPT}, width=W_PROMPT)
    g.link(t, "text_encoder", e, "text_encoder")
    settings = {"width": width, "height": height, "cfg": 3.0, "tau": 0.5, "seed": 42}
    p = g.add("FastVAR_Pruning", (x3, 370), {"preset": preset}, width=W_PRUNE)
    fast = g.add("FastVAR_Sampler", (x4, 200), settings, title="FastVAR Sampler (FastVAR)", width=W_SAMPLER,
                 extra_height=RUN_INFO)
    g.link(m, "model", fast, "model")
    g.link(e, "positive", fast, "positive")
    g.link(e, "negative", fast, "negative")
    g.link(p, "pruning", fast, "pruning")
    d_fast = g.add("FastVAR_Decode", (x5, 80), {}, width=W_DECODE)
    g.link(v, "vae", d_fast, "vae")
    g.link(fast, "latent", d_fast, "latent")
    out_fast = g.add("SaveImage", (x6, 80), {"filename_prefix": "Compare_FastVAR"}, width=W_IMAGE,
                     extra_height=IMAGE_H - min_height(mappings, "SaveImage"))
    g.link(d_fast, "image", out_fast, "images")
    # Baseline row: the VAE lane just under the top row, the sampler under it.
    lane = max(g.bottom(p), g.bottom(fast), g.bottom(out_fast)) + 50
    base_y = lane + 60
    r_vae = g.reroute((g.right(m) + 40, lane - 14), v, "vae")
    r_model = g.reroute((g.right(m) + 40, base_y + 40), m, "model")
    r_pos = g.reroute((g.right(e) + 40, base_y + 100), e, "positive")
    r_neg = g.reroute((g.right(e) + 40, base_y + 140), e, "negative")
    base = g.add("FastVAR_Sampler", (x4, base_y), settings, title="FastVAR Sampler (baseline)", width=W_SAMPLER,
                 extra_height=RUN_INFO)
    g.link(r_model, "", base, "model")
    g.link(r_pos, "", base, "positive")
    g.link(r_neg, "", base, "negative")
    d_base = g.add("FastVAR_Decode", (x5, lane - 14), {}, width=W_DECODE)
    g.link(r_vae, "", d_base, "vae")
    g.link(base, "latent", d_base, "latent")
    out_base = g.add("SaveImage", (x6, lane - 14), {"filename_prefix": "Compare_baseline"}, width=W_IMAGE,
                     extra_height=IMAGE_H - min_height(mappings, "SaveImage"))
    g.link(d_base, "image", out_base, "images")
    g.group("Load", [v, m, t])
    g.group("Prompt", [e])
    g.group("FastVAR", [p, fast, base])
    g.group("Output", [d_fast, out_fast, d_base, out_base])
    return g


def model_list(*entries):
    return [{"name": name, "url": url, "directory": directory} for name, url, directory in entries]


INF_2B = ("infinity_2b_reg.pth", HF_INFINITY + "infinity_2b_reg.pth", "infinity")
VAE_32 = ("infinity_vae_d32reg.pth", HF_INFINITY + "infinity_vae_d32reg.pth", "vae")
VAE_56 = ("infinity_vae_d56_f8_14_patchify.pth", HF_INFINITY + "infinity_vae_d56_f8_14_patchify.pth", "vae")


def infinity_graph(mappings, *, model, vae, width, height, budget, preset, tau=0.5, prefix, what):
    return single_graph(mappings, INFINITY, model=model, vae=vae, text_encoder="flan-t5-xl",
                        sampler={"width": width, "height": height, "pixel_budget": budget, "cfg": 3.0, "tau": tau,
                                 "seed": 42},
                        pruning={"preset": preset}, negative=True, prefix=prefix, what=what)


def build() -> dict[str, dict]:
    mappings = load_pack().NODE_CLASS_MAPPINGS
    return {
        "infinity_2b_1024_fastvar.json": infinity_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=1024, height=1024,
            budget="auto", preset="paper", prefix="Infinity2B",
            what="Infinity-2B, 1024x1024, with FastVAR's paper setting.").to_json(model_list(INF_2B, VAE_32)),
        "infinity_2b_2k_fastvar.json": infinity_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=2048, height=2048,
            budget="2K (zero-shot)", preset="2k", prefix="Infinity2B_2K",
            what="Infinity-2B at 2048x2048 (zero-shot 2K), with FastVAR's 2K setting; decoding is tiled."
        ).to_json(model_list(INF_2B, VAE_32)),
        "infinity_8b_1024_fastvar.json": infinity_graph(
            mappings, model="infinity_8b_weights", vae="infinity_vae_d56_f8_14_patchify.pth", width=1024,
            height=1024, budget="auto", preset="paper", tau=1.0, prefix="Infinity8B",
            what="Infinity-8B, 1024x1024, with FastVAR's paper setting (the 8B model needs its own VAE)."
        ).to_json(model_list(VAE_56)),
        "hart_1024_fastvar.json": single_graph(
            mappings, HART, model="hart-0.7b-1024px", vae="hart-0.7b-1024px", text_encoder="Qwen2-VL-1.5B-Instruct",
            sampler={"width": 1024, "height": 1024, "cfg": 4.5, "top_p": 0.0, "seed": 42},
            pruning={"preset": "paper"}, negative=False, prefix="FastVAR_HART",
            what="HART-0.7B, 1024x1024, with FastVAR's paper setting.").to_json([]),
        "infinity_2b_baseline_vs_fastvar.json": compare_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=1024, height=1024,
            preset="paper").to_json(model_list(INF_2B, VAE_32)),
    }


if __name__ == "__main__":
    for name, workflow in build().items():
        (ROOT / "workflows" / name).write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", name)
