"""HTTP endpoints behind the pack's frontend (registered only inside ComfyUI):

- GET /fastvar/schedule_chart?preset=...&...: the Pruning node's chart (:func:`chart_from_query`);
- GET /fastvar/ui_facts: what each loader node's family offers and which Pruning widgets each preset ignores
  (:func:`ui_facts`), so the frontend greys what is ignored without knowing any family or preset by name;
- GET /fastvar/sampler_size?...: the image size the sampler's size widgets give (:func:`size_from_query`).
"""

from __future__ import annotations

import functools

from ..fastvar_core.errors import FastVARError
from ..fastvar_core.families import get_family
from ..fastvar_core.pruning_request import MODES

from . import NODE_CLASS_MAPPINGS, compat
from .chart import CHART_MODELS, connected_model, plan_chart, schedule_chart
from .generation import BUDGETS, CHART_CONNECTED, TAIL_SLIDERS, FastVARPruning, ignored_widgets, pick_schedule

try:  # pragma: no cover - only inside ComfyUI
    from aiohttp import web
    from server import PromptServer

    _routes = PromptServer.instance.routes
except (ImportError, AttributeError):
    _routes = None


def ui_facts() -> dict:
    """``loaders``: node id -> the facts of its family the frontend needs (every node that loads one family's
    part): its label, whether the sampler's tau and the negative prompt apply, and the pixel_budget choices
    it takes. ``pruning_ignored``: preset -> the Pruning widgets it does not read."""
    loaders = {}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        if getattr(cls, "FAMILY", None) is None:
            continue
        fam = get_family(cls.FAMILY)
        budgets = [label for label, b in BUDGETS.items() if b is None or not fam.pixel_budgets or b in fam.pixel_budgets]
        loaders[node_id] = {"label": fam.label, "has_tau": fam.has_tau, "negative_prompt": fam.negative_prompt,
                            "pixel_budgets": budgets}
    return {"loaders": loaders, "pruning_ignored": {mode: list(ignored_widgets(mode)) for mode in MODES}}


def _connected(query) -> tuple[str, object, object] | None:
    """(family name, model config, schedule) of the sampler the query describes; None when none is connected."""
    cls = NODE_CLASS_MAPPINGS.get(query.get("loader", ""))
    if getattr(cls, "FAMILY", None) is None:
        return None
    fam = get_family(cls.FAMILY)
    config = None
    if query.get("model"):
        try:
            path = compat.resolve(cls.DIRS, query["model"])
            config = _detect(fam.name, str(path), path.stat().st_mtime)
        except (FastVARError, OSError):
            config = None  # the chart falls back to the family's first released model
    if config is None:
        config = next(iter(fam.released_configs().values()))
    model = type("Connected", (), {"family": fam.name, "module": connected_model(config)})
    schedule = pick_schedule(model, int(query.get("width", 1024)), int(query.get("height", 1024)),
                             query.get("aspect_ratio", "from width/height"), query.get("pixel_budget", "auto"))
    return fam.name, config, schedule


@functools.lru_cache(maxsize=16)
def _detect(family: str, path: str, mtime: float):
    """The detected config of a model file, once per file version (the chart refreshes on every widget change)."""
    return get_family(family).detect_config(path)


def _config_name(family: str, config) -> str:
    names = [n for n, c in get_family(family).released_configs().items() if c == config]
    return names[0] if names else get_family(family).label


def chart_from_query(query) -> dict:
    """Build the chart for the Pruning node's widget values given as query parameters.

    ``chart_for`` is a released model's label, or "the connected sampler" (the default) with the sampler's
    ``loader`` (node id of its model's loader), ``model`` (that loader's file or folder) and size widgets.
    """
    try:
        sliders = {f"last_{k}_drop": int(query.get(f"last_{k}_drop", 0)) for k in range(1, TAIL_SLIDERS + 1)}
        preset = query.get("preset", "paper")
        values = (preset, float(query.get("speed_target", 2.0)),
                  int(query.get("cache_from_end", 5)), int(query.get("first_layer", -1)), int(query.get("last_layer", -1)))
    except (TypeError, ValueError) as exc:
        return {"error": f"bad chart request: {exc}"}
    try:
        request = FastVARPruning.make_request(*values, **sliders)
        chart_for = query.get("chart_for", CHART_CONNECTED)
        if chart_for == CHART_CONNECTED:
            connected = _connected(query)
            if connected is None:
                data = schedule_chart(next(iter(CHART_MODELS)), request)
                data["model"] += " (no sampler connected)"
            else:
                family, config, schedule = connected
                h, w = schedule.image_size
                data = plan_chart(f"{_config_name(family, config)} {w}x{h}", family, config, schedule, request)
        else:
            data = schedule_chart(chart_for, request)
    except FastVARError as exc:
        return {"error": str(exc)}
    except (KeyError, TypeError, ValueError) as exc:
        return {"error": f"bad chart request: {exc}"}
    data["ignored"] = list(ignored_widgets(preset))
    data["ignored_labels"] = ignored_labels(preset, data.get("uses"))
    return data


def ignored_labels(preset: str, uses: dict | None) -> dict[str, str]:
    """widget name -> what the greyed widget shows in place of its own value: what ``preset`` uses instead
    (``uses`` is the chart's per-scale plan; None when the chart could not be made)."""
    labels = {}
    for name in ignored_widgets(preset):
        tail = name.startswith("last_") and name.endswith("_drop")
        if preset == "off":
            text = "off prunes nothing"
        elif uses is None:
            text = f"ignored by {preset}"
        elif tail:
            ratio = uses["drop_from_end"].get(int(name.split("_")[1]), 0)
            text = f"{preset} skips this scale" if ratio >= 100 else f"{preset} uses {ratio} %"
        elif name == "cache_from_end":
            text = f"{preset}: no cache" if uses["cache_from_end"] is None else f"{preset} uses {uses['cache_from_end']}"
        elif name == "speed_target":
            text = "custom uses the sliders" if preset == "custom" else f"{preset} uses its own ratios"
        else:
            text = f"ignored by {preset}"
        labels[name] = f"{name}: {text}"
    return labels


def size_from_query(query) -> dict:
    """{"width", "height"} of the image the sampler's size widgets give for the connected ``loader``."""
    try:
        connected = _connected(query)
    except (FastVARError, KeyError, TypeError, ValueError) as exc:
        return {"error": str(exc)}
    if connected is None:
        return {"error": "no model loader connected"}
    h, w = connected[2].image_size
    return {"width": w, "height": h}


if _routes is not None:  # pragma: no cover

    @_routes.get("/fastvar/schedule_chart")
    async def _schedule_chart(request):
        return web.json_response(chart_from_query(request.rel_url.query))

    @_routes.get("/fastvar/ui_facts")
    async def _ui_facts(request):
        return web.json_response(ui_facts())

    @_routes.get("/fastvar/sampler_size")
    async def _sampler_size(request):
        return web.json_response(size_from_query(request.rel_url.query))
