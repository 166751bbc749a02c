"""HTTP endpoint behind the schedule chart: GET /fastvar/schedule_chart?chart_for=...&preset=...&...

Registered only inside ComfyUI; the JSON comes from chart.schedule_chart.
"""

from __future__ import annotations

from ..fastvar_core.errors import FastVARError

from .chart import schedule_chart
from .generation import TAIL_SLIDERS, FastVARPruning

try:  # pragma: no cover - only inside ComfyUI
    from aiohttp import web
    from server import PromptServer

    _routes = PromptServer.instance.routes
except (ImportError, AttributeError):
    _routes = None


def chart_from_query(query) -> dict:
    """Build the chart for the Pruning node's widget values given as query parameters."""
    try:
        sliders = {f"last_{k}_drop": int(query.get(f"last_{k}_drop", 0)) for k in range(1, TAIL_SLIDERS + 1)}
        values = (query.get("preset", "paper"), float(query.get("speed_target", 2.0)),
                  int(query.get("cache_from_end", 5)), int(query.get("first_layer", -1)), int(query.get("last_layer", -1)))
    except (TypeError, ValueError) as exc:
        return {"error": f"bad chart request: {exc}"}
    try:
        request = FastVARPruning.make_request(*values, **sliders)
    except FastVARError as exc:
        return {"error": str(exc)}
    return schedule_chart(query.get("chart_for", "Infinity-2B 1024px"), request)


if _routes is not None:  # pragma: no cover

    @_routes.get("/fastvar/schedule_chart")
    async def _schedule_chart(request):
        return web.json_response(chart_from_query(request.rel_url.query))
