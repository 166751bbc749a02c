"""Writes the shipped UI-format workflows (workflows/*.json) from one description per graph.

Run after changing a node's inputs: `python tools/build_workflows.py`. Widget values are laid out in
INPUT_TYPES order (required, then optional), with the seed's control value after it, which is how
the frontend saves them; tests/test_workflows.py checks every file against the node classes.
"""

from __future__ import annotations

import importlib.util
import json
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


class Graph:
    def __init__(self, mappings):
        self.mappings = mappings
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None, size=(320, 180)):
        widgets = widgets or {}
        node_id = len(self.nodes) + 1
        entry = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                 "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [],
                 "properties": {"Node name for S&R": node_type}, "widgets_values": []}
        if title:
            entry["title"] = title
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
        self.nodes.append(entry)
        return node_id

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
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [20, 20]}}, "version": 0.4, "models": models}


HF_INFINITY = "https://huggingface.co/FoundationVision/Infinity/resolve/main/"
PROMPT = "a red fox sitting in fresh snow at sunrise, soft golden light, highly detailed fur, 35mm photo"


def infinity_graph(mappings, *, model, vae, width, height, budget, preset, tau=0.5, compare=False, prefix="FastVAR"):
    g = Graph(mappings)
    m = g.add("FastVAR_LoadInfinityModel", (20, 40), {"model_name": model}, size=(330, 110))
    v = g.add("FastVAR_LoadInfinityVAE", (20, 190), {"vae_name": vae}, size=(330, 60))
    t = g.add("FastVAR_LoadT5TextEncoder", (20, 290), {"text_encoder": "flan-t5-xl"}, size=(330, 110))
    e = g.add("FastVAR_TextEncode", (380, 40), {"prompt": PROMPT}, size=(360, 220))
    g.link(t, "text_encoder", e, "text_encoder")
    runs = [("off", "baseline", 720), (preset, "FastVAR", 40)] if compare else [(preset, prefix, 40)]
    for mode, label, y in runs:
        s = g.add("FastVAR_Sampler", (1160, y), {"width": width, "height": height, "pixel_budget": budget, "cfg": 3.0,
                                                "tau": tau, "seed": 42}, title=f"FastVAR Sampler ({label})", size=(340, 420))
        if mode != "off":
            p = g.add("FastVAR_Pruning", (780, y), {"preset": mode, "chart_for": "Infinity-2B 2K" if budget.startswith("2K") else "Infinity-2B 1024px"}, size=(350, 520))
            g.link(p, "pruning", s, "pruning")
        g.link(m, "model", s, "model")
        g.link(e, "positive", s, "positive")
        g.link(e, "negative", s, "negative")
        d = g.add("FastVAR_Decode", (1530, y), {}, size=(260, 80))
        g.link(v, "vae", d, "vae")
        g.link(s, "latent", d, "latent")
        out = g.add("SaveImage", (1820, y), {"filename_prefix": f"{prefix}_{label}" if compare else prefix}, size=(400, 440))
        g.link(d, "image", out, "images")
        if mode != "off" and not compare:
            tm = g.add("FastVAR_TokenMap", (1530, y + 480), {}, size=(260, 130))
            g.link(s, "latent", tm, "latent")
            pv = g.add("PreviewImage", (1820, y + 480), {}, size=(400, 300))
            g.link(tm, "token_maps", pv, "images")
    return g


def hart_graph(mappings):
    g = Graph(mappings)
    m = g.add("FastVAR_LoadHARTModel", (20, 40), {"model_folder": "hart-0.7b-1024px"}, size=(330, 110))
    v = g.add("FastVAR_LoadHARTVAE", (20, 190), {"vae_folder": "hart-0.7b-1024px"}, size=(330, 60))
    t = g.add("FastVAR_LoadQwen2TextEncoder", (20, 290), {"text_encoder": "Qwen2-VL-1.5B-Instruct"}, size=(330, 90))
    e = g.add("FastVAR_TextEncode", (380, 40), {"prompt": PROMPT}, size=(360, 220))
    g.link(t, "text_encoder", e, "text_encoder")
    p = g.add("FastVAR_Pruning", (780, 40), {"preset": "paper", "chart_for": "HART-0.7B 1024px"}, size=(350, 520))
    s = g.add("FastVAR_Sampler", (1160, 40), {"width": 1024, "height": 1024, "cfg": 4.5, "top_p": 0.0, "seed": 42},
              size=(340, 420))
    g.link(m, "model", s, "model")
    g.link(e, "positive", s, "positive")
    g.link(p, "pruning", s, "pruning")
    d = g.add("FastVAR_Decode", (1530, 40), {}, size=(260, 80))
    g.link(v, "vae", d, "vae")
    g.link(s, "latent", d, "latent")
    out = g.add("SaveImage", (1820, 40), {"filename_prefix": "FastVAR_HART"}, size=(400, 440))
    g.link(d, "image", out, "images")
    tm = g.add("FastVAR_TokenMap", (1530, 520), {}, size=(260, 130))
    g.link(s, "latent", tm, "latent")
    pv = g.add("PreviewImage", (1820, 520), {}, size=(400, 300))
    g.link(tm, "token_maps", pv, "images")
    return g


def model_list(*entries):
    return [{"name": name, "url": url, "directory": directory} for name, url, directory in entries]


INF_2B = ("infinity_2b_reg.pth", HF_INFINITY + "infinity_2b_reg.pth", "infinity")
VAE_32 = ("infinity_vae_d32reg.pth", HF_INFINITY + "infinity_vae_d32reg.pth", "vae")
VAE_56 = ("infinity_vae_d56_f8_14_patchify.pth", HF_INFINITY + "infinity_vae_d56_f8_14_patchify.pth", "vae")


def build() -> dict[str, dict]:
    mappings = load_pack().NODE_CLASS_MAPPINGS
    return {
        "infinity_2b_1024_fastvar.json": infinity_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=1024, height=1024,
            budget="auto", preset="paper", prefix="Infinity2B").to_json(model_list(INF_2B, VAE_32)),
        "infinity_2b_2k_fastvar.json": infinity_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=2048, height=2048,
            budget="2K (zero-shot)", preset="2k", prefix="Infinity2B_2K").to_json(model_list(INF_2B, VAE_32)),
        "infinity_8b_1024_fastvar.json": infinity_graph(
            mappings, model="infinity_8b_weights", vae="infinity_vae_d56_f8_14_patchify.pth", width=1024, height=1024,
            budget="auto", preset="paper", tau=1.0, prefix="Infinity8B").to_json(model_list(VAE_56)),
        "hart_1024_fastvar.json": hart_graph(mappings).to_json([]),
        "infinity_2b_baseline_vs_fastvar.json": infinity_graph(
            mappings, model="infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth", width=1024, height=1024,
            budget="auto", preset="paper", compare=True, prefix="Compare").to_json(model_list(INF_2B, VAE_32)),
    }


if __name__ == "__main__":
    for name, workflow in build().items():
        (ROOT / "workflows" / name).write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", name)
