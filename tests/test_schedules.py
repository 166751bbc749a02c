"""Scale schedules against the official table (docs/infinity.md §4.1, docs/hart.md §2.1)."""

from __future__ import annotations

import pytest

from fastvar_core.errors import ConfigError
from fastvar_core.schedules import (
    INFINITY_TEMPLATE_ORDER,
    hart_schedule,
    hart_schedule_for_size,
    infinity_schedule,
    infinity_schedule_for_size,
    nearest_template,
)

# (template, image H x W at 1M, total tokens at 0.06M / 0.25M / 0.60M / 1M) copied from docs/infinity.md §4.1.
OFFICIAL = [
    (1.0, (1024, 1024), (521, 2521, 6425, 10521)),
    (1.25, (1120, 896), (614, 2814, 6854, 10774)),
    (0.8, (896, 1120), (614, 2814, 6854, 10774)),
    (1.333, (1152, 864), (665, 2657, 7085, 10973)),
    (0.75, (864, 1152), (665, 2657, 7085, 10973)),
    (1.5, (1248, 832), (533, 2759, 6941, 10997)),
    (0.666, (832, 1248), (533, 2759, 6941, 10997)),
    (1.75, (1344, 768), (472, 2628, 7220, 11252)),
    (0.571, (768, 1344), (472, 2628, 7220, 11252)),
    (2.0, (1440, 720), (451, 2681, 7219, 11269)),
    (0.5, (720, 1440), (451, 2681, 7219, 11269)),
    (2.5, (1600, 640), (555, 2555, 6805, 10805)),
    (0.4, (640, 1600), (555, 2555, 6805, 10805)),
    (3.0, (1776, 592), (509, 2588, 7016, 11123)),
    (0.333, (592, 1776), (509, 2588, 7016, 11123)),
]


@pytest.mark.parametrize("template, image_1m, totals", OFFICIAL, ids=[str(t[0]) for t in OFFICIAL])
def test_infinity_table(template, image_1m, totals):
    for budget, total in zip(("0.06M", "0.25M", "0.60M", "1M"), totals):
        sched = infinity_schedule(template, budget)
        assert sched.total_tokens == total, budget
        assert sched.scales[0] == (1, 1)
    full = infinity_schedule(template, "1M")
    assert full.num_scales == 13
    assert full.image_size == image_1m
    # RoPE positions are normalised to the template's 1M last scale whatever the budget.
    assert infinity_schedule(template, "0.25M").rope_grid == full.final_size


def test_template_order_is_official():
    assert len(INFINITY_TEMPLATE_ORDER) == 15
    assert INFINITY_TEMPLATE_ORDER[:4] == (1.0, 1.25, 0.8, 1.333)


@pytest.mark.parametrize(
    "size, template",
    [((1024, 1024), 1.0), ((1440, 720), 0.5), ((720, 1440), 2.0), ((1000, 1500), 1.5), ((1920, 1080), 0.571),
     ((1000, 1125), 1.0)],  # h/w 1.125: equidistant to 1.0 and 1.25 -> first in official order
)
def test_nearest_template(size, template):
    assert nearest_template(*size) == template


def test_snap_to_budget():
    assert infinity_schedule_for_size(1024, 1024).budget == "1M"
    assert infinity_schedule_for_size(512, 512).budget == "0.25M"
    assert infinity_schedule_for_size(250, 260).image_size == (256, 256)
    assert infinity_schedule_for_size(2048, 2048).budget == "2K"


def test_two_k_extension():
    sched = infinity_schedule(1.0, "2K")
    assert sched.num_scales == 15  # Infinity's level embedding has 15 rows
    assert sched.scales[:13] == infinity_schedule(1.0, "1M").scales
    assert sched.scales[13:] == ((91, 91), (128, 128))
    assert sched.image_size == (2048, 2048)
    assert sched.rope_grid == (128, 128)
    wide = infinity_schedule(0.5, "2K")
    assert max(wide.image_size) == 2048 and wide.final_size == (64, 128)


def test_bad_requests():
    with pytest.raises(ConfigError, match="width and height must be positive"):
        infinity_schedule_for_size(0, 512)
    with pytest.raises(ConfigError, match="aspect template 1.1 is not in Infinity's table"):
        infinity_schedule(1.1, "1M")
    with pytest.raises(ConfigError, match="pixel budget '4K' is unknown"):
        infinity_schedule(1.0, "4K")


def test_hart_schedule():
    sched = hart_schedule()
    assert sched.total_tokens == 9451  # docs/hart.md §2.1
    assert sched.image_size == (1024, 1024)
    assert sched.offsets()[13] == 5355  # parity/hart README flat layout


# HART: the trained square schedule, zero-shot aspect ratios and 2K (README "Resolutions")


def test_hart_trained_schedule_is_the_square_patch_list():
    sched = hart_schedule()
    assert sched.scales == tuple((p, p) for p in (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))
    assert sched.rope_grid == (64, 64)


@pytest.mark.parametrize("template", INFINITY_TEMPLATE_ORDER)
def test_hart_aspect_schedules_keep_the_token_count_and_ratio(template):
    sched = hart_schedule(template=template)
    h, w = sched.final_size
    assert sched.scales[0] == (1, 1)  # HART predicts the first token from the last text position
    assert sched.num_scales == 14
    assert abs((h / w) / template - 1) < 0.04  # the requested shape
    assert abs(h * w / 4096 - 1) < 0.03  # about the trained 64 x 64 tokens
    for (h0, w0), (h1, w1) in zip(sched.scales, sched.scales[1:]):
        assert h0 <= h1 and w0 <= w1  # maps only grow
    assert sched.rope_grid == sched.final_size


def test_hart_half_height_schedule_by_hand():
    # 1:2 (h/w 0.5): H = 64 * sqrt(0.5) = 45.25 -> 45, W = 64 / sqrt(0.5) = 90.51 -> 91; pn 12 -> (8.4, 17.1)
    sched = hart_schedule(template=0.5)
    assert sched.final_size == (45, 91)
    assert sched.image_size == (720, 1456)
    assert sched.scales[7] == (8, 17)


def test_hart_2k_schedule():
    sched = hart_schedule(budget="2K")
    assert sched.scales[:14] == hart_schedule().scales
    assert sched.scales[14:] == ((91, 91), (128, 128))  # two steps of sqrt(2), as Infinity's 2K tail
    assert sched.image_size == (2048, 2048)
    assert sched.rope_grid == (128, 128)  # positions follow HART's rule: scaled to the last map
    wide = hart_schedule(template=0.5, budget="2K")
    assert max(wide.final_size) == 128 and wide.final_size[0] == round(45 * 128 / 91)


def test_hart_size_snapping():
    assert hart_schedule_for_size(1024, 1024).scales == hart_schedule().scales
    assert hart_schedule_for_size(1440, 720).template == 0.5
    assert hart_schedule_for_size(2048, 2048).budget == "2K"
    assert hart_schedule_for_size(1024, 1024, "2K").final_size == (128, 128)
    with pytest.raises(ConfigError, match=r"HART makes images of its trained size class \(1024x1024 at this aspect "
                                          r"ratio\) or zero-shot 2K; 512x512 is smaller than either by over 2x"):
        hart_schedule_for_size(512, 512)
    with pytest.raises(ConfigError, match="aspect ratio 4096x64 .* is outside the aspect templates"):
        hart_schedule_for_size(4096, 64)
    with pytest.raises(ConfigError, match=r"pixel budget '0.60M' is not available for HART.* allowed: \['1M', '2K'\]"):
        hart_schedule((1, 2, 4), budget="0.60M")
    with pytest.raises(ConfigError, match="patch_nums must be positive integers starting at 1"):
        hart_schedule((2, 4))
