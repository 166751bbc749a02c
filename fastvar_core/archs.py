"""Shapes of the released models, for the cost model, the schedule chart and the benchmark."""

from __future__ import annotations

from .cost import ArchSpec


def hart_diffusion_flops(width: int, diff_width: int, diff_depth: int, token_channels: int, steps: int) -> float:
    """FLOPs per token of HART's residual diffusion head over all its sampling steps.

    Per step: input and condition projections, time embedding MLP, ``diff_depth`` res-blocks
    (two W x W linears + a 3W x W AdaLN linear), the final AdaLN (2W x W) and output (2Cvae x W) linears.
    """
    w = diff_width
    per_step = (token_channels * w + width * w + 256 * w + w * w
                + diff_depth * (2 * w * w + 3 * w * w) + 2 * w * w + 2 * token_channels * w)
    return 2.0 * steps * per_step


INFINITY_2B = ArchSpec(depth=32, width=2048, ffn_hidden=8192, text_tokens=32, head_outputs=64, token_channels=32)
INFINITY_8B = ArchSpec(depth=40, width=3584, ffn_hidden=14336, text_tokens=32, head_outputs=112, token_channels=56)
HART_0_7B = ArchSpec(
    depth=24, width=1536, ffn_hidden=4096, ffn_matrices=3, prefix_tokens=300, head_outputs=4096, token_channels=32,
    last_scale_flops_per_token=hart_diffusion_flops(1536, 1024, 6, 32, 8),
)
