"""Scale schedules: which token-map sizes a next-scale-prediction model generates, in order.

Infinity uses a dynamic-resolution table of aspect-ratio templates and pixel budgets
(docs/infinity.md §4.1); HART uses one square list of patch numbers from its config.
A schedule knows its final latent size and, through the VAE stride, its image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

VAE_STRIDE = 16

# Full 13-scale "1M" schedules, (h, w) per scale, for the templates whose h/w >= 1 (docs/infinity.md §4.1).
# The inverse templates (h/w < 1) are the transposes.
_TALL_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.0: tuple((s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)),
    1.25: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
           (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.5: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
          (48, 32), (63, 42), (78, 52)),
    1.75: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
           (56, 32), (70, 40), (84, 48)),
    2.0: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
          (60, 30), (74, 37), (90, 45)),
    2.5: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
          (65, 26), (80, 32), (100, 40)),
    3.0: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
          (72, 24), (90, 30), (111, 37)),
}


def _inverse_key(ratio: float) -> float:
    # The official table truncates the inverse key (1/1.5 -> 0.666, 1/1.75 -> 0.571).
    return int(1000 / ratio) / 1000


def _build_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    table: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, scales in _TALL_TEMPLATES.items():
        table[ratio] = scales
        if ratio != 1.0:
            table[_inverse_key(ratio)] = tuple((w, h) for h, w in scales)
    return table


INFINITY_TEMPLATES = _build_templates()
# Official tie-breaking order of the templates (docs/infinity.md §4.1).
INFINITY_TEMPLATE_ORDER = (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333)
# Number of leading scales of the 13-scale table that make each official pixel budget.
INFINITY_BUDGETS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
# The 2K extension appends scales after the 1M table until the long side reaches this many tokens.
TWO_K_LONG_SIDE = 128


@dataclass(frozen=True)
class ScaleSchedule:
    """An ordered list of token-map sizes, plus what the model needs to place them.

    ``rope_grid`` is the (h, w) grid that 2D positions are normalised to (Infinity: the last scale of
    the template's largest schedule; HART: its last patch number).
    """

    family: str
    scales: tuple[tuple[int, int], ...]
    rope_grid: tuple[int, int]
    template: float | None = None
    budget: str | None = None
    vae_stride: int = VAE_STRIDE

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def final_size(self) -> tuple[int, int]:
        """(h, w) of the last token map."""
        return self.scales[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the decoded image."""
        h, w = self.final_size
        return h * self.vae_stride, w * self.vae_stride

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_scale)

    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the concatenated token sequence (no padding between scales)."""
        out, acc = [], 0
        for n in self.tokens_per_scale:
            out.append(acc)
            acc += n
        return tuple(out)

    def describe(self) -> str:
        h, w = self.image_size
        name = f"{self.family} {self.budget or ''} h/w={self.template}" if self.template else self.family
        return f"{name}: {self.num_scales} scales, {w}x{h} px, last token map {self.final_size[1]}x{self.final_size[0]}"


def _two_k_tail(last: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Two scales appended to a 1M schedule: geometric steps up to a 128-token long side (2048 px).

    Two steps keep the per-step growth (about x1.4) close to the training schedules' late steps
    (x1.25-x1.33); two is also the most that Infinity's 15-row level embedding allows after 13 scales.
    """
    h, w = last
    factor = TWO_K_LONG_SIDE / max(h, w)
    mid = math.sqrt(factor)
    return ((round(h * mid), round(w * mid)), (round(h * factor), round(w * factor)))


def infinity_schedule(template: float = 1.0, budget: str = "1M") -> ScaleSchedule:
    """Infinity's schedule for an aspect template (h/w key of the official table) and pixel budget.

    ``budget`` is one of 0.06M, 0.25M, 0.60M, 1M or 2K (zero-shot: the 1M schedule plus two scales).
    """
    if template not in INFINITY_TEMPLATES:
        raise ConfigError(
            f"aspect template {template!r} is not in Infinity's table; allowed: {list(INFINITY_TEMPLATE_ORDER)}"
        )
    full = INFINITY_TEMPLATES[template]
    if budget == "2K":
        scales = full + _two_k_tail(full[-1])
    elif budget in INFINITY_BUDGETS:
        scales = full[: INFINITY_BUDGETS[budget]]
    else:
        raise ConfigError(f"pixel budget {budget!r} is unknown; allowed: {[*INFINITY_BUDGETS, '2K']}")
    # RoPE positions are normalised to the largest schedule of the template (official mode 2); the
    # 2K schedule extends that grid to its own last scale.
    rope_grid = scales[-1] if budget == "2K" else full[-1]
    return ScaleSchedule("infinity", scales, rope_grid, template, budget)


def nearest_template(width: int, height: int) -> float:
    """The template whose h/w is closest to height/width (first in official order on ties)."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"width and height must be positive, got width={width}, height={height}")
    ratio = height / width
    return min(INFINITY_TEMPLATE_ORDER, key=lambda t: abs(t - ratio))


# Snapping may change the requested aspect ratio by at most this factor (1:3 .. 3:1 plus 25 %).
MAX_ASPECT_SNAP = 1.25


def snap_template(width: int, height: int) -> float:
    """The aspect template (h/w) a requested size snaps to; a ratio no template comes close to is refused."""
    template = nearest_template(width, height)
    ratio = height / width
    if max(ratio / template, template / ratio) > MAX_ASPECT_SNAP:
        raise ConfigError(
            f"aspect ratio {width}x{height} (height/width {ratio:.3g}) is outside the aspect templates, which "
            f"range from height/width 0.333 (3:1) to 3.0 (1:3); the nearest, {template}, would change the shape "
            f"by more than {MAX_ASPECT_SNAP - 1:.0%}"
        )
    return template


def _closest_budget(make, budgets, width: int, height: int) -> str:
    """The budget whose image has the pixel count closest to width x height on a log scale."""
    want = math.log(width * height)
    return min(budgets, key=lambda b: abs(math.log(math.prod(make(b).image_size)) - want))


def infinity_schedule_for_size(width: int, height: int, budget: str | None = None) -> ScaleSchedule:
    """Snap a requested image size to the nearest official template and pixel budget.

    The template is chosen by aspect ratio; the budget (if not given) by the closest pixel count on a
    log scale among the official budgets and 2K. A ratio no template comes close to is refused.
    """
    template = snap_template(width, height)
    if budget is None:
        budget = _closest_budget(lambda b: infinity_schedule(template, b), [*INFINITY_BUDGETS, "2K"], width, height)
    return infinity_schedule(template, budget)


HART_PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


HART_BUDGETS = ("1M", "2K")  # the trained size class of the checkpoint's patch numbers, and zero-shot 2K
# HART has no smaller size class: a request with under 1/this of the 1M class's pixels is refused, not enlarged.
HART_MAX_AREA_SNAP = 2.0


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def hart_schedule(patch_nums: tuple[int, ...] = HART_PATCH_NUMS_1024, template: float = 1.0,
                  budget: str = "1M") -> ScaleSchedule:
    """HART's schedule from its config's patch numbers, for an aspect template (h/w) and pixel budget.

    1M with template 1.0 is the trained square schedule (pn x pn per scale). Other templates are
    zero-shot: the last map (H, W) keeps about pn_last^2 tokens at the template's ratio and every scale
    scales its pn by H/pn_last and W/pn_last (the first stays 1x1: HART predicts it from the last text
    position). 2K appends the same two-step tail as Infinity's (long side 128 tokens, 2048 px).
    Positions are normalised to the last map, HART's rule (docs/hart.md §2.5), so 2K extends the grid.
    """
    if not patch_nums or any(not isinstance(p, int) or p <= 0 for p in patch_nums) or patch_nums[0] != 1:
        raise ConfigError(f"patch_nums must be positive integers starting at 1, got {patch_nums!r}")
    if template not in INFINITY_TEMPLATES:
        raise ConfigError(f"aspect template {template!r} is unknown; allowed: {list(INFINITY_TEMPLATE_ORDER)}")
    if budget not in HART_BUDGETS:
        raise ConfigError(
            f"pixel budget {budget!r} is not available for HART, whose checkpoint is trained for one size class "
            f"({patch_nums[-1] * VAE_STRIDE} px); allowed: {list(HART_BUDGETS)} (2K is zero-shot)"
        )
    last = patch_nums[-1]
    if template == 1.0:
        final = (last, last)
    else:
        final = (_round_half_up(last * math.sqrt(template)), _round_half_up(last / math.sqrt(template)))
    scales = ((1, 1),) + tuple(
        (max(1, _round_half_up(p * final[0] / last)), max(1, _round_half_up(p * final[1] / last)))
        for p in patch_nums[1:]
    )
    if budget == "2K":
        scales += _two_k_tail(scales[-1])
    return ScaleSchedule("hart", scales, scales[-1], template, budget)


def hart_schedule_for_size(width: int, height: int, budget: str | None = None,
                           patch_nums: tuple[int, ...] = HART_PATCH_NUMS_1024) -> ScaleSchedule:
    """Snap a requested size to an aspect template and to HART's 1M (trained) or 2K (zero-shot) class."""
    template = snap_template(width, height)
    if budget is None:
        trained = hart_schedule(patch_nums, template, "1M")
        if width * height < math.prod(trained.image_size) / HART_MAX_AREA_SNAP:
            h, w = trained.image_size
            raise ConfigError(
                f"HART makes images of its trained size class ({w}x{h} at this aspect ratio) or zero-shot 2K; "
                f"{width}x{height} is smaller than either by over {HART_MAX_AREA_SNAP:g}x in pixels: ask for about "
                f"{w}x{h}, or use Infinity for small images"
            )
        budget = _closest_budget(lambda b: hart_schedule(patch_nums, template, b), HART_BUDGETS, width, height)
    return hart_schedule(patch_nums, template, budget)
