"""Data for the schedule chart drawn on the FastVAR Pruning node (pure: no ComfyUI, no weights)."""

from __future__ import annotations

from types import SimpleNamespace

from ..fastvar_core.cost import estimate
from ..fastvar_core.errors import ConfigError
from ..fastvar_core.families import family_names, get_family, resolve_pruning

# label -> (family name, released model config, schedule factory), from every registered family.
CHART_MODELS = {
    label: (name, config, make_schedule)
    for name in family_names()
    for label, (config, make_schedule) in get_family(name).chart_models().items()
}
# What the chart's number is, shown with it: the cost model's FLOP ratio, not a measured time.
SPEEDUP_WORDING = "{:.1f}x fewer transformer FLOPs (cost-model prediction)"


def schedule_chart(chart_for: str, request) -> dict:
    """The chart of a released model at its square size (a label of :data:`CHART_MODELS`)."""
    if chart_for not in CHART_MODELS:
        return {"error": f"unknown chart model {chart_for!r}; allowed: {list(CHART_MODELS)}"}
    family, model_config, make_schedule = CHART_MODELS[chart_for]
    return plan_chart(chart_for, family, model_config, make_schedule(), request)


def plan_chart(title: str, family, model_config, schedule, request) -> dict:
    """Bars per scale (tokens forwarded vs total), skipped steps, the cache scale and the predicted FLOP ratio
    of ``request`` on a model of ``model_config`` running ``schedule``.

    The plan and the cost model's shape come through the same functions as a run's
    (``families.resolve_pruning``, ``Family.arch_spec``). Returns ``{"error": message}`` instead of
    raising when the settings are impossible for this model and size.
    """
    try:
        config = resolve_pruning(family, request, schedule, model_config)
    except ConfigError as exc:
        return {"error": str(exc)}
    fam = get_family(family)
    arch = fam.arch_spec(model_config)
    base = estimate(arch, list(schedule.scales))
    pruned = estimate(arch, list(schedule.scales), config)
    scales = []
    for b, p in zip(base.scales, pruned.scales):
        forwarded = sum(p.forwarded) / arch.depth if not p.skipped else 0
        tokens = arch.prefix_tokens if p.scale == 0 and arch.prefix_tokens else p.tokens  # HART: text context
        scales.append({
            "scale": p.scale, "h": p.hw[0], "w": p.hw[1], "tokens": tokens, "forwarded": forwarded,
            "skipped": p.skipped, "cache": p.scale == config.cache_scale,
            "flops_share": b.total_flops / base.total_flops,
        })
    n = schedule.num_scales
    speedup = base.total_flops / pruned.total_flops
    h, w = schedule.image_size
    return {
        "model": title, "family": fam.label, "width": w, "height": h, "config": config.to_dict(), "scales": scales,
        "speedup": speedup, "speedup_text": SPEEDUP_WORDING.format(speedup), "note": config.note,
        "kv_saving": 1 - pruned.kv_cache_bytes / base.kv_cache_bytes,
        # What the plan does per scale counted from the end, in the Pruning node's widget units.
        "uses": {"drop_from_end": {n - s: round(r * 100) for s, r in config.drop_ratios.items()},
                 "cache_from_end": None if config.cache_scale is None else n - config.cache_scale},
    }


def connected_model(config) -> SimpleNamespace:
    """A stand-in for a loaded transformer of ``config``: what ``Family.schedule_for_*`` read (its config)."""
    return SimpleNamespace(config=config)
