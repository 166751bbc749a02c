"""Measure the float noise floor of the sampled HART parity cases (docs/parity.md, "Noise floor").

Each sampled case runs twice on this machine, teacher-forced on the reference draws, once with the
SDPA attention kernel and once with the explicit math kernel: two correct float32 runs that differ
only in reduction order, like the same code on two CPUs. The per-scale differences between the two
runs (and of each run against the stored reference) are the floor the sampled-case tolerances in
tests/parity_rule.py are derived from.

    make parity-floor ARGS="--json out.json"   (or: .venv/bin/python tools/parity_floor.py [CASE_SET_DIR])
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_hart_parity as hp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastvar_core import attention as attention_mod  # noqa: E402


def _per_scale(a: torch.Tensor, b: torch.Tensor, offsets, pns) -> list[float]:
    d = (a.double() - b.double()).abs()
    return [d[:, offsets[si]: offsets[si] + pn * pn].max().item() for si, pn in enumerate(pns)]


def _final(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.double() - b.double()).abs().flatten()
    return {"mean": d.mean().item(), "p999": d.quantile(0.999).item(), "max": d.max().item()}


def measure(case_dir: Path) -> dict:
    case = json.loads((case_dir / "case.json").read_text())
    files = hp._set_for(case_dir.parent.parent)
    exp = load_file(str(case_dir / "expected.safetensors"))
    runs = {}
    before = attention_mod.default_backend()
    try:
        for kernel in ("sdpa", "math"):
            def force(_name, kernel=kernel):
                attention_mod.set_default_backend(kernel)
            ex, latent, draws, _, pns, offsets = hp._run_model_case(case_dir, case, files, case_dir.parent.parent, force)
            runs[kernel] = (ex, latent, len(draws.ties) + len(draws.failures))
    finally:
        attention_mod.set_default_backend(before)
    (a, la, ma), (b, lb, mb) = runs["sdpa"], runs["math"]
    row = {"case": case["name"], "mismatched_draws": {"sdpa": ma, "math": mb}, "pns": pns}
    for name in ("logits_lse", "logits_max"):
        row[name] = {"kernels": _per_scale(a[name], b[name], offsets, pns),
                     "sdpa_vs_ref": _per_scale(a[name], exp[name], offsets, pns),
                     "math_vs_ref": _per_scale(b[name], exp[name], offsets, pns)}
    row["f_hat_stats"] = {
        "kernels": (a["f_hat_stats"] - b["f_hat_stats"]).abs().amax(dim=(0, 2)).tolist(),
        "sdpa_vs_ref": (a["f_hat_stats"] - exp["f_hat_stats"]).abs().amax(dim=(0, 2)).tolist(),
    }
    row["diff_out"] = {"kernels": _final(a["diff_out"], b["diff_out"]), "sdpa_vs_ref": _final(a["diff_out"], exp["diff_out"])}
    row["f_hat_final"] = {"kernels": _final(la, lb), "sdpa_vs_ref": _final(la, exp["f_hat_final"])}
    row["diff_cond_stats"] = {"kernels": (a["diff_cond_stats"] - b["diff_cond_stats"]).abs().max().item()}
    if "image_pool16" in exp:
        ia, ib = (torch.nn.functional.avg_pool2d(hp._decode01(files.vae, lat), 16) for lat in (la, lb))
        row["image_pool16"] = {"kernels": (ia - ib).abs().max().item(),
                               "sdpa_vs_ref": (ia - exp["image_pool16"]).abs().max().item(),
                               "math_vs_ref": (ib - exp["image_pool16"]).abs().max().item()}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set_dir", nargs="?", default=str(hp.SHARED_SET))
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--cases", default="sample_*", help="case-name pattern (default: every sampled case)")
    args = parser.parse_args()
    rows = []
    for case_json in sorted(Path(args.set_dir).glob(f"cases/{args.cases}/case.json")):
        row = measure(case_json.parent)
        rows.append(row)
        print(f"{row['case']}: mismatched draws {row['mismatched_draws']}")
        for name in ("logits_lse", "logits_max"):
            print(f"  {name:10s} kernels " + " ".join(f"{v:.1e}" for v in row[name]["kernels"]))
            print(f"  {name:10s} vs ref  " + " ".join(f"{v:.1e}" for v in row[name]["sdpa_vs_ref"]))
        print("  f_hat_stats kernels " + " ".join(f"{v:.1e}" for v in row["f_hat_stats"]["kernels"]))
        print("  f_hat_stats vs ref  " + " ".join(f"{v:.1e}" for v in row["f_hat_stats"]["sdpa_vs_ref"]))
        for name in ("diff_out", "f_hat_final"):
            k, r = row[name]["kernels"], row[name]["sdpa_vs_ref"]
            print(f"  {name}: kernels mean {k['mean']:.1e} p999 {k['p999']:.1e} max {k['max']:.1e}; "
                  f"vs ref mean {r['mean']:.1e} p999 {r['p999']:.1e} max {r['max']:.1e}")
        print(f"  diff_cond_stats kernels {row['diff_cond_stats']['kernels']:.1e}", flush=True)
        if "image_pool16" in row:
            print("  image_pool16 " + " ".join(f"{k} {v:.1e}" for k, v in row["image_pool16"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
