"""Cost model against hand-computed token and FLOP counts."""

from __future__ import annotations

import pytest

from fastvar_core.cost import ArchSpec, estimate, predicted_speedup
from fastvar_core.families import get_family
from fastvar_core.pruning import PruningConfig, make_preset
from fastvar_core.schedules import infinity_schedule

# depth 2, width C=4, FFN F=8 (2 matrices), 64 logits, 32 input channels; scales 1x1 then 2x2.
TINY = ArchSpec(depth=2, width=4, ffn_hidden=8)
SCALES = [(1, 1), (2, 2)]
PRUNE = PruningConfig(drop_ratios={1: 0.5}, cache_scale=0, layers=(1, 2))


def test_baseline_by_hand():
    # per layer and token k, with T keys so far: attention 8kC^2 + 4kTC, FFN 2*2*k*C*F; head 2*L*C*64 + 2*L*32*C
    # scale 0 (k=1, T=1): attn 144, ffn 128 per layer; head 768
    # scale 1 (k=4, T=5): attn 832, ffn 512 per layer; head 3072
    report = estimate(TINY, SCALES)
    assert report.scales[0].flops == {"attention": 288, "cross_attention": 0, "ffn": 256, "head": 768}
    assert report.scales[1].flops == {"attention": 1664, "cross_attention": 0, "ffn": 1024, "head": 3072}
    assert report.total_flops == 7072
    assert report.kv_cache_bytes == 2 * (5 + 5) * 4 * 4


def test_pruned_by_hand():
    # scale 1, layer 1 keeps 2 of 4 tokens and its keys are 1 + 2: attn 8*2*16 + 4*2*3*4 = 352, ffn 256
    report = estimate(TINY, SCALES, PRUNE)
    assert report.scales[1].forwarded == [4, 2]
    assert report.scales[1].flops["attention"] == 832 + 352
    assert report.scales[1].flops["ffn"] == 512 + 256
    assert report.total_flops == 6336
    assert report.kv_cache_bytes == 2 * (5 + 3) * 4 * 4
    assert predicted_speedup(TINY, SCALES, PRUNE) == pytest.approx(7072 / 6336)


def test_skipped_scale_costs_nothing():
    report = estimate(TINY, SCALES, PruningConfig(drop_ratios={1: 1.0}))
    assert report.scales[1].skipped and report.scales[1].total_flops == 0
    assert report.total_flops == 288 + 256 + 768


def test_cross_attention_and_text_projection():
    arch = ArchSpec(depth=1, width=4, ffn_hidden=8, text_tokens=3)
    report = estimate(arch, [(1, 1)])
    # q/out projections 4kC^2 = 64, scores+mix 4*k*3*C = 48, text K/V once 4*3*C^2 = 192
    assert report.scales[0].flops["cross_attention"] == 64 + 48 + 192


def test_infinity_2b_paper_ideal_is_near_the_published_analysis():
    # Issue #7 quotes an analytic ideal of 4.15x for Infinity-2B at 1024 px; the exact accounting there is
    # not known, so only the neighbourhood is checked.
    sched = infinity_schedule(1.0, "1M")
    arch = ArchSpec(depth=32, width=2048, ffn_hidden=8192, text_tokens=32)
    cfg = make_preset(get_family("infinity").presets, "paper", sched.num_scales, 32)
    assert 3.9 < predicted_speedup(arch, list(sched.scales), cfg) < 4.5
