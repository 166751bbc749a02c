"""Data for the schedule chart drawn on the FastVAR Pruning node (pure: no ComfyUI, no weights)."""

from __future__ import annotations

from ..fastvar_core.cost import estimate
from ..fastvar_core.errors import ConfigError
from ..fastvar_core.families import family_names, get_family, resolve_pruning

# label -> (family name, released model config, schedule factory), from every registered family.
CHART_MODELS = {
    label: (name, config, make_schedule)
    for name in family_names()
    for label, (config, make_schedule) in get_family(name).chart_models().items()
}


def schedule_chart(chart_for: str, request) -> dict:
    """Bars per scale (tokens forwarded vs total), skipped steps, the cache scale and the predicted speedup.

    The plan and the cost model's shape come from the released config through the same functions as a
    run's (``families.resolve_pruning``, ``Family.arch_spec``). Returns ``{"error": message}`` instead of
    raising when the settings are impossible for this model and size.
    """
    if chart_for not in CHART_MODELS:
        return {"error": f"unknown chart model {chart_for!r}; allowed: {list(CHART_MODELS)}"}
    family, model_config, make_schedule = CHART_MODELS[chart_for]
    schedule = make_schedule()
    try:
        config = resolve_pruning(family, request, schedule, model_config)
    except ConfigError as exc:
        return {"error": str(exc)}
    arch = get_family(family).arch_spec(model_config)
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
    return {
        "model": chart_for, "config": config.to_dict(), "scales": scales,
        "speedup": base.total_flops / pruned.total_flops,
        "kv_saving": 1 - pruned.kv_cache_bytes / base.kv_cache_bytes,
    }
