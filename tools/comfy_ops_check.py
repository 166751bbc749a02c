"""Manual check: the tiny models built with ComfyUI's own layers (comfy.ops), not part of the test suite.

Run it with the Python of a ComfyUI install, from its folder (it needs ``comfy`` importable):

    cd /path/to/ComfyUI && python /path/to/ComfyUI-FastVAR/tools/comfy_ops_check.py [--cpu]

For ``manual_cast`` and ``fp8_ops`` (each with ``comfy.ops.cast_bias_weight`` as the namespace hook,
docs/architecture.md §5), it loads the tiny Infinity and HART transformers and VAEs from ../shared,
stores the layers' weights in float8_e4m3fn (or keeps them float32), replays the float32 model's
tokens and prints the relative L2 error of the logits, latents and images. Float32 storage should
match the default models to float rounding. fp8 storage should stay within a few percent, and up
to about 20% for the VAE images.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path.cwd())]  # the pack, then ComfyUI (the working folder)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ops  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastvar_core.hart import HARTTextConditioning, load_hart_model, load_hart_vae, sample_hart  # noqa: E402
from fastvar_core.infinity import load_infinity_model, sample_infinity  # noqa: E402
from fastvar_core.infinity.vae import load_infinity_vae  # noqa: E402
from fastvar_core.schedules import ScaleSchedule, hart_schedule, infinity_schedule  # noqa: E402

PARITY = ROOT.parent / "shared" / "parity"
INF = PARITY / "infinity" / "checkpoints"
INF_CASE = PARITY / "infinity" / "cases" / "sample_0.06M_1x1_b1_cfg4_tau0.5_negprompt__infinity"
HART = PARITY / "hart" / "checkpoint"


def namespace(base):
    return type(f"FastVAR_{base.__name__}", (base,), {"cast_bias_weight": staticmethod(comfy.ops.cast_bias_weight)})


def store(model, dtype):
    """Keep every comfy layer's parameters in ``dtype`` (what ComfyUI's weight dtype does)."""
    for m in model.modules():
        if hasattr(m, "comfy_cast_weights"):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
    return model


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    torch.set_num_threads(2)
    inputs = load_file(str(INF_CASE / "inputs.safetensors"))
    cond = SimpleNamespace(kv_compact=inputs["text.kv_compact"], lens=inputs["text.lens"].tolist())
    full = infinity_schedule(1.0, "0.06M")
    sched = ScaleSchedule("infinity", full.scales[:7], full.rope_grid, 1.0, "0.06M")
    ref = sample_infinity(load_infinity_model(INF / "infinity_tiny.pth"), cond, sched, cfg=3.0, seed=5,
                          return_logits=True)
    ref_logits = torch.cat([ref.extras[k].flatten() for k in sorted(ref.extras)])
    ref_img = load_infinity_vae(INF / "infinity_vae_d32_tiny.pth").decode(ref.latent)

    p = load_file(str(PARITY / "hart" / "prompts.safetensors"))
    hcond = HARTTextConditioning(p["context_tensor"][:1], p["context_mask"][:1], p["context_position_ids"][:1])
    hsched = hart_schedule((1, 2, 3, 4, 6, 8))
    hvae = load_hart_vae(HART / "tokenizer")
    hmodel = load_hart_model(HART)
    drawn = sample_hart(hmodel, hvae, hcond, hsched, seed=2)
    teacher = torch.cat([drawn.tokens[s] for s in sorted(drawn.tokens)], 1)
    href = sample_hart(hmodel, hvae, hcond, hsched, seed=2, return_logits=True, teacher_tokens=teacher)
    href_img = hvae.decode(href.latent)

    for base in (comfy.ops.manual_cast, comfy.ops.fp8_ops):
        ops = namespace(base)
        for storage in (torch.float32, torch.float8_e4m3fn):
            model = store(load_infinity_model(INF / "infinity_tiny.pth", operations=ops), storage)
            out = sample_infinity(model, cond, sched, cfg=3.0, seed=5, return_logits=True, teacher_bits=ref.tokens)
            logits = torch.cat([out.extras[k].flatten() for k in sorted(out.extras)])
            vae = store(load_infinity_vae(INF / "infinity_vae_d32_tiny.pth", operations=ops), storage)
            img = vae.decode(ref.latent)
            print(f"{base.__name__:12s} {str(storage):22s} Infinity logits {rel(logits, ref_logits):.2e}  "
                  f"VAE image {rel(img, ref_img):.2e}")
            hm = store(load_hart_model(HART, operations=ops), storage)
            hv = store(load_hart_vae(HART / "tokenizer", operations=ops), storage)
            hout = sample_hart(hm, hv, hcond, hsched, seed=2, return_logits=True, teacher_tokens=teacher)
            lse = rel(hout.extras["logits_lse"], href.extras["logits_lse"])
            print(f"{base.__name__:12s} {str(storage):22s} HART logit lse {lse:.2e}  "
                  f"latent {rel(hout.latent, href.latent):.2e}  VAE image {rel(hv.decode(href.latent), href_img):.2e}")


if __name__ == "__main__":
    main()
