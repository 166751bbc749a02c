"""What fp8 weight storage does on the tiny parity models: token agreement with the default (float32) weights on
the same seed, and PSNR of the decoded image against the default one.

    python -m tools.fp8_effect

The transformer's linear weights are stored in fp8 with ``fastvar_core.ops.CastOps`` and ``store_weights``
(what Load Infinity/HART Model's ``weight_dtype`` does outside ComfyUI); the VAE stays float32.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from fastvar_core.hart import HARTTextConditioning, load_hart_model, load_hart_vae, sample_hart
from fastvar_core.infinity import load_infinity_model, sample_infinity
from fastvar_core.infinity.vae import load_infinity_vae
from fastvar_core.ops import CastOps, store_weights
from fastvar_core.schedules import hart_schedule, infinity_schedule

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"
INF = PARITY / "infinity" / "checkpoints"
INF_CASE = PARITY / "infinity" / "cases" / "sample_0.06M_1x1_b1_cfg4_tau0.5_negprompt__infinity"
HART = PARITY / "hart" / "checkpoint"
STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


def agreement(a: dict, b: dict) -> float:
    """Share of equal tokens over every scale."""
    same = sum((a[s] == b[s]).sum().item() for s in a)
    return same / sum(a[s].numel() for s in a)


def runs():
    inputs = load_file(str(INF_CASE / "inputs.safetensors"))
    cond = SimpleNamespace(kv_compact=inputs["text.kv_compact"], lens=inputs["text.lens"].tolist())
    schedule = infinity_schedule(1.0, "0.06M")
    vae = load_infinity_vae(INF / "infinity_vae_d32_tiny.pth")

    def infinity(ops, storage):
        model = load_infinity_model(INF / "infinity_tiny.pth", operations=ops)
        if storage is not None:
            store_weights(model, storage, ops)
        result = sample_infinity(model, cond, schedule, cfg=3.0, seed=5)
        return result.tokens, vae.to_image(result.latent)

    p = load_file(str(PARITY / "hart" / "prompts.safetensors"))
    hcond = HARTTextConditioning(p["context_tensor"][:1], p["context_mask"][:1], p["context_position_ids"][:1])
    hschedule = hart_schedule((1, 2, 3, 4, 6, 8))
    hvae = load_hart_vae(HART / "tokenizer")

    def hart(ops, storage):
        model = load_hart_model(HART, operations=ops)
        if storage is not None:
            store_weights(model, storage, ops)
        result = sample_hart(model, hcond, hschedule, vae=hvae, seed=2)
        return result.tokens, hvae.to_image(result.latent)

    return {"Infinity": infinity, "HART": hart}


def main() -> None:
    torch.set_num_threads(2)
    for family, run in runs().items():
        ref_tokens, ref_image = run(None, None)
        for name, storage in STORAGE.items():
            tokens, image = run(CastOps, storage)
            print(f"{family} {name}: tokens agree {100 * agreement(ref_tokens, tokens):.1f} %, "
                  f"image PSNR {psnr(ref_image, image):.1f} dB vs float32 weights")


if __name__ == "__main__":
    main()
