"""HART / FastVAR-on-HART parity against the official reference outputs (parity/hart/README.md).

One test per case of /work/shared/parity/hart/cases/ and of every HART-layout set listed in the
environment variable FASTVAR_PARITY_CASES (colon-separated folders laid out like parity/hart:
checkpoint/llm + checkpoint/tokenizer beside cases/<name>/case.json). Infinity-layout sets are left
to the Infinity parity tests. Every quantity the case stores is compared with the README's tolerance;
a failure lists every mismatch with case, scale and quantity. Set FASTVAR_PARITY_FULL=1 to also
decode and compare the image of every case (see _decode_case).

Attention kernel: the upstream cases were made with PyTorch SDPA (the official slow path), the
FastVAR cases with the FastVAR copy's explicit matmul-softmax attention (docs/fastvar.md §5.2). Each case runs
with the matching backend, which removes kernel rounding from the comparison.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PARITY
from parity_rule import (
    SAMPLED_COND_STATS_ATOL,
    SAMPLED_DIFF_MEAN,
    SAMPLED_DIFF_P999,
    SAMPLED_FINAL_MEAN,
    SAMPLED_FINAL_P999,
    SAMPLED_FINAL_STATS_ATOL,
    SAMPLED_IMAGE_POOL_ATOL,
    SAMPLED_LATENT_ATOL,
    SAMPLED_LOGIT_ATOL,
    TOLERATED,
    ReferenceDraws,
    Selections,
    by_side,
)
from safetensors.torch import load_file

from fastvar_core import attention as attention_mod
from fastvar_core.hart import HARTTextConditioning, load_hart_model, load_hart_vae, sample_hart
from fastvar_core.pruning import PruningConfig
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import hart_schedule

pytestmark = pytest.mark.slow  # every model case samples 1024 px (about 10-20 s each on 2 CPU cores)

SHARED_SET = PARITY / "hart"
FULL = os.environ.get("FASTVAR_PARITY_FULL", "") not in ("", "0")  # also decode every case's image

# README "Tolerances"
LOGITS_ATOL = 1e-4
LATENT_ATOL = 1e-5  # next_inputs, f_hat_pre_last, f_hat_stats of scales 0..S-2
DIFF_MEAN_ABS = 1e-5  # diff_out, f_hat_final: mean |diff| ...
DIFF_P999 = 1e-3  # ... and 99.9th percentile; never the max
IMAGE_POOL_ATOL = 1e-3
IMAGE_CROP_ATOL = 1e-4
# Not in the README table: stats of the final latent follow f_hat_final (max |diff| can reach 8e-3 on
# single elements, which moves the max-abs entry); the diffusion conditioning is a hidden state like the logits.
FINAL_STATS_ATOL = 1e-3
COND_STATS_ATOL = 1e-4


def _set_roots() -> list[Path]:
    roots = [SHARED_SET]
    for part in os.environ.get("FASTVAR_PARITY_CASES", "").split(":"):
        if part.strip():
            roots.append(Path(part.strip()).expanduser().resolve())
    return roots


def _case_params() -> list:
    params = []
    for root in _set_roots():
        label = "hart" if root == SHARED_SET else root.name
        cases = sorted((root / "cases").glob("*/case.json")) if (root / "cases").is_dir() else []
        if not (root / "checkpoint" / "llm" / "config.json").is_file():  # HART layout: checkpoint/llm + tokenizer
            skip = pytest.mark.skip(reason=f"{root} is not a HART-layout set (the Infinity parity tests handle it)")
            params.append(pytest.param(root, id=f"{label}:not-hart", marks=skip))
            continue
        for case_json in cases:
            params.append(pytest.param(case_json.parent, id=f"{label}:{case_json.parent.name}"))
        if not cases:
            params.append(pytest.param(root, id=f"{label}:no-cases", marks=pytest.mark.skip(reason=f"{root} has no cases/")))
    return params


@dataclass
class SetFiles:
    models: dict
    vae: object
    prompts: dict


_sets: dict[Path, SetFiles] = {}


@pytest.fixture(scope="module")
def loaded():
    """Models per set and weight kind, loaded once for the module."""
    yield _sets
    _sets.clear()


def _set_for(root: Path) -> SetFiles:
    if root not in _sets:
        ckpt = root / "checkpoint"
        _sets[root] = SetFiles({}, load_hart_vae(ckpt / "tokenizer"), load_file(str(root / "prompts.safetensors")))
    return _sets[root]


def _model(files: SetFiles, root: Path, weights: str):
    if weights not in files.models:
        files.models[weights] = load_hart_model(root / "checkpoint" / "llm", use_ema=weights == "ema")
    return files.models[weights]


@pytest.fixture
def attention_backend():
    """Set the default attention backend for one test, restore it afterwards."""
    before = attention_mod.default_backend()
    yield attention_mod.set_default_backend
    attention_mod.set_default_backend(before)


def _pruning_from_case(case: dict, patch_nums: tuple[int, ...], depth: int) -> PruningConfig | None:
    """The case's FastVAR block as an explicit PruningConfig (sides -> scale indices)."""
    if case.get("pruning", "none") != "fastvar":
        return None
    fv = case["fastvar"]
    index = {pn: si for si, pn in enumerate(patch_nums)}
    ratios = {index[int(side)]: float(r) for side, r in fv["prune_ratio_by_scale"].items()}
    layers = fv.get("pruned_layers", "all")
    if isinstance(layers, str):
        assert layers.startswith("all"), f"case {case['name']}: cannot read pruned_layers {layers!r}"
        layers = (0, depth)
    return PruningConfig(drop_ratios=ratios, cache_scale=index[int(fv["cache_scale"])], layers=tuple(layers), name="case")


class Mismatches:
    def __init__(self, case: str):
        self.case, self.items = case, []

    def add(self, msg: str) -> None:
        self.items.append(f"{self.case}: {msg}")

    def check(self) -> None:
        if self.items:
            pytest.fail(f"{len(self.items)} mismatch(es):\n" + "\n".join(self.items), pytrace=False)


def _scale_of(pos: int, offsets: tuple[int, ...]) -> int:
    return max(i for i, o in enumerate(offsets) if o <= pos)


def _compare_per_scale(out: Mismatches, name: str, ours, ref, offsets, pns, atol) -> None:
    """Flat (B, N, ...) tensors: report the worst |diff| of each scale that exceeds ``atol(scale)``."""
    if ours.shape != ref.shape:
        out.add(f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
        return
    diff = (ours.double() - ref.double()).abs()
    for si in range(len(pns)):
        part = diff[:, offsets[si]: offsets[si] + pns[si] ** 2]
        if part.numel() and part.max() > atol(si):
            out.add(f"scale {si} ({pns[si]}x{pns[si]}): {name} max |diff| {part.max():.3g} > {atol(si)}")


def _compare_dense(out: Mismatches, name: str, ours, ref, atol: float) -> None:
    if ours.shape != ref.shape:
        out.add(f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
        return
    d = (ours.double() - ref.double()).abs().max().item()
    if d > atol:
        out.add(f"{name}: max |diff| {d:.3g} > {atol}")


def _compare_diffusion(out: Mismatches, name: str, ours, ref, mean_tol: float, p999_tol: float) -> None:
    if ours.shape != ref.shape:
        out.add(f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
        return
    d = (ours.double() - ref.double()).abs().flatten()
    mean, p999 = d.mean().item(), d.quantile(0.999).item()
    if mean > mean_tol or p999 > p999_tol:
        out.add(f"scale last: {name} mean |diff| {mean:.3g} (<= {mean_tol}), 99.9th pct {p999:.3g} (<= {p999_tol})")


def _decode01(vae, latent: torch.Tensor) -> torch.Tensor:
    """VAE decode to (B, 3, H, W) in [0, 1] (the official output before saving)."""
    return (vae.decode(latent) + 1) / 2


def _run_vae_case(case_dir: Path, case: dict, files: SetFiles, out: Mismatches) -> None:
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    exp = load_file(str(case_dir / "expected.safetensors"))
    img = _decode01(files.vae, inputs["f_hat"])
    if "image_pool16" in exp:
        _compare_dense(out, "image_pool16", F.avg_pool2d(img, 16), exp["image_pool16"], IMAGE_POOL_ATOL)
    if "image_crop" in exp:
        n = exp["image_crop"].shape[-1]
        _compare_dense(out, "image_crop", img[..., :n, :n], exp["image_crop"], IMAGE_CROP_ATOL)
    if "image_u8" in exp:
        ours = (img * 255).to(torch.uint8)  # the official scripts truncate
        d = (ours.int() - exp["image_u8"].int()).abs().max().item()
        if d > 1:
            out.add(f"image_u8: max |diff| {d} > 1")


@pytest.mark.parametrize("case_dir", _case_params())
def test_hart_parity(case_dir: Path, loaded, attention_backend):
    root = case_dir.parent.parent
    case = json.loads((case_dir / "case.json").read_text())
    out = Mismatches(case["name"])
    files = _set_for(root)
    if case["kind"] == "vae_decode":
        _run_vae_case(case_dir, case, files, out)
        out.check()
        return
    ex, latent, draws, selections, pns, offsets = _run_model_case(case_dir, case, files, root, attention_backend)
    exp = load_file(str(case_dir / "expected.safetensors"))
    _compare_model_case(out, case, exp, ex, latent, draws, selections, pns, offsets, files)
    out.check()


def _run_model_case(case_dir: Path, case: dict, files: SetFiles, root: Path, attention_backend):
    """Run one transformer case; a sampled case is teacher-forced on the reference draws (docs/parity.md)."""
    model = _model(files, root, case["weights"])
    pns = list(model.config.patch_nums)
    schedule = hart_schedule(tuple(pns))
    offsets = schedule.offsets()
    exp = load_file(str(case_dir / "expected.safetensors"))
    inputs = load_file(str(case_dir / "inputs.safetensors")) if (case_dir / "inputs.safetensors").is_file() else {}
    rows = case["prompt_rows"]
    pr = files.prompts
    cond = HARTTextConditioning(
        context=pr["context_tensor"][rows], mask=pr["context_mask"][rows], position_ids=pr["context_position_ids"][rows]
    )
    pruning = _pruning_from_case(case, tuple(pns), model.config.depth)
    attention_backend("math" if case.get("flavor") == "fastvar" else "sdpa")
    # README: the diffusion noise comes from the global RNG seeded with torch_global_seed right before the call
    diff_gen = torch.Generator().manual_seed(int(case["torch_global_seed"]))
    sel_positions = exp["logits_sel_positions"].tolist() if "logits_sel_positions" in exp else []
    teacher = inputs.get("teacher_tokens")  # (B, N) in the flat scale-major layout
    if teacher is not None:
        teacher = {si: teacher[:, offsets[si]: offsets[si] + pn * pn] for si, pn in enumerate(pns)}
    draws = None
    if teacher is None:
        def per_scale(name):
            return {si: exp[name][:, offsets[si]: offsets[si] + pn * pn] for si, pn in enumerate(pns)} if name in exp else {}

        draws = ReferenceDraws(case["name"], per_scale("tokens"), lambda si: by_side(SAMPLED_LOGIT_ATOL, pns[si]),
                               argmax_reference=per_scale("logits_argmax"))
    selections = Selections(_reference_kept(exp, pns))
    observed = Observed(offsets, sel_positions, teacher)
    hooks = SamplingHooks(on_select=selections, on_draw=draws, on_logits=observed.logits, on_trace=observed.trace,
                          teacher=teacher, diffusion_generator=diff_gen)
    res = sample_hart(
        model, cond, schedule, vae=files.vae,
        cfg=case["cfg"], top_k=None, top_p=case["top_p"], more_smooth=case["more_smooth"], seed=case["g_seed"],
        pruning=pruning, hooks=hooks,
    )
    return observed.quantities(), res.latent, draws, selections, pns, offsets


class Observed:
    """The run's quantities that a case compares, gathered by ``on_logits`` / ``on_trace`` (CPU copies).

    Guided logits (before top-k/top-p): per flat position their logsumexp, max and argmax, the full rows
    at ``sel_positions`` and, on a teacher-forced run, the value of the teacher's token. Trace: the
    next-scale inputs, the latent's (mean, std, max|x|) per row after every scale, the latent before the
    last scale, the diffusion residual and its conditioning's stats.
    """

    def __init__(self, offsets, sel_positions, teacher):
        self.offsets, self.sel_positions, self.teacher = offsets, sel_positions, teacher
        self.stats = {"lse": [], "max": [], "argmax": []}
        self.sel: dict[int, torch.Tensor] = {}
        self.at_teacher: list[torch.Tensor] = []
        self.traced: dict[str, list[torch.Tensor]] = {}

    def logits(self, si: int, logits: torch.Tensor) -> None:
        self.stats["lse"].append(logits.logsumexp(-1).cpu())
        top = logits.max(-1)
        self.stats["max"].append(top.values.cpu())
        self.stats["argmax"].append(top.indices.cpu())
        start, stop = self.offsets[si], self.offsets[si] + logits.shape[1]
        for p in self.sel_positions:
            if start <= p < stop:
                self.sel[p] = logits[:, p - start].float().cpu().clone()  # the sampler filters logits in place
        if self.teacher is not None:
            self.at_teacher.append(logits.gather(-1, self.teacher[si].to(logits.device).long()[..., None])[..., 0].cpu())

    def trace(self, name: str, tensor: torch.Tensor) -> None:
        if name == "latent":
            flat = tensor.float().flatten(1)
            tensor = torch.stack([flat.mean(1), flat.std(1), flat.abs().amax(1)], dim=1)
        elif name == "diffusion_cond":
            zf = tensor.float()
            tensor = torch.stack([zf.mean(), zf.std(), zf.abs().amax()])
        elif name == "diffusion_out":
            tensor = tensor.float()
        self.traced.setdefault(name, []).append(tensor.cpu())

    def quantities(self) -> dict[str, torch.Tensor]:
        out = {f"logits_{name}": torch.cat(parts, dim=1) for name, parts in self.stats.items()}
        if self.at_teacher:
            out["logits_teacher"] = torch.cat(self.at_teacher, dim=1)
        if self.sel_positions:
            out["logits_sel"] = torch.stack([self.sel[p] for p in self.sel_positions], dim=1)
        out["f_hat_stats"] = torch.stack(self.traced["latent"], dim=1)
        out["next_inputs"] = torch.cat(self.traced["next_input"], dim=1)
        out["f_hat_pre_last"] = self.traced["latent_before_last"][0]
        out["diff_out"] = self.traced["diffusion_out"][0]
        out["diff_cond_stats"] = self.traced["diffusion_cond"][0]
        return out


def _reference_kept(exp: dict, pns: list[int]) -> dict:
    """fastvar_keep_idx.s<side>.b<block>.<sub> -> {(scale, layer, sub): (rows, K)}."""
    index = {pn: si for si, pn in enumerate(pns)}
    kept = {}
    for key, value in exp.items():
        if key.startswith("fastvar_keep_idx."):
            _, side, block, sub = key.split(".")
            kept[(index[int(side[1:])], int(block[1:]), sub)] = value
    return kept


def _compare_model_case(out, case, exp, ex, latent, draws, selections, pns, offsets, files) -> None:
    sampled = draws is not None
    if sampled:
        for failure in draws.verdict():
            out.items.append(failure)
    last = len(pns) - 1

    def logit_atol(si):
        return by_side(SAMPLED_LOGIT_ATOL, pns[si]) if sampled else LOGITS_ATOL

    def latent_atol(si):
        if si == last:
            return SAMPLED_FINAL_STATS_ATOL if sampled else FINAL_STATS_ATOL
        return by_side(SAMPLED_LATENT_ATOL, pns[si]) if sampled else LATENT_ATOL

    for name in ("logits_lse", "logits_max", "logits_teacher"):
        if name in exp:
            _compare_per_scale(out, name, ex[name], exp[name], offsets, pns, logit_atol)
    sel_positions = exp["logits_sel_positions"].tolist() if "logits_sel_positions" in exp else []
    if "logits_sel" in exp:
        _compare_dense(out, "logits_sel", ex["logits_sel"], exp["logits_sel"], LOGITS_ATOL)
    if "logits_argmax" in exp and not sampled:  # sampled cases: judged draw by draw (ReferenceDraws)
        # equal apart from genuine near-ties, which only the stored full logits (logits_sel) can prove
        bad: dict[int, list[str]] = {}
        for b, p in (ex["logits_argmax"] != exp["logits_argmax"]).nonzero().tolist():
            ref_arg = exp["logits_argmax"][b, p].item()
            if p in sel_positions:
                row = ex["logits_sel"][b, sel_positions.index(p)]
                if (row.max() - row[ref_arg]).item() <= LOGITS_ATOL:
                    continue
            bad.setdefault(_scale_of(p, offsets), []).append(
                f"row {b} position {p}: got {ex['logits_argmax'][b, p].item()}, expected {ref_arg}")
        for si, items in bad.items():
            out.add(f"scale {si} ({pns[si]}x{pns[si]}): logits_argmax differs at {len(items)} positions, first {items[0]}")

    if "next_inputs" in exp:
        # flat layout without scale 0: shift the offsets by one position
        _compare_per_scale(out, "next_inputs", ex["next_inputs"], exp["next_inputs"],
                           tuple(o - 1 for o in offsets[1:]), pns[1:], lambda si: latent_atol(si + 1))
    if "f_hat_pre_last" in exp:
        _compare_dense(out, "f_hat_pre_last", ex["f_hat_pre_last"], exp["f_hat_pre_last"], latent_atol(last - 1))
    stats, ref_stats = ex["f_hat_stats"], exp["f_hat_stats"]
    for si in range(len(pns)):
        d = (stats[:, si] - ref_stats[:, si]).abs().max().item()
        if d > latent_atol(si):
            out.add(f"scale {si} ({pns[si]}x{pns[si]}): f_hat_stats (mean, std, max|x|) max |diff| {d:.3g} > "
                    f"{latent_atol(si)}")
    if sampled:
        _compare_diffusion(out, "diff_out", ex["diff_out"], exp["diff_out"], SAMPLED_DIFF_MEAN, SAMPLED_DIFF_P999)
        _compare_diffusion(out, "f_hat_final", latent, exp["f_hat_final"], SAMPLED_FINAL_MEAN, SAMPLED_FINAL_P999)
    else:
        _compare_diffusion(out, "diff_out", ex["diff_out"], exp["diff_out"], DIFF_MEAN_ABS, DIFF_P999)
        _compare_diffusion(out, "f_hat_final", latent, exp["f_hat_final"], DIFF_MEAN_ABS, DIFF_P999)
    _compare_dense(out, "diff_cond_z_stats", ex["diff_cond_stats"], exp["diff_cond_z_stats"],
                   SAMPLED_COND_STATS_ATOL if sampled else COND_STATS_ATOL)

    # FastVAR kept tokens: same set per CFG row, for every recorded block / sub-layer
    tolerated: list[str] = []
    keep_keys = [k for k in exp if k.startswith("fastvar_keep_idx.")]
    index = {pn: si for si, pn in enumerate(pns)}
    for key in keep_keys:
        _, side, block, sub = key.split(".")
        si, layer = index[int(side[1:])], int(block[1:])
        failures, swaps = selections.compare((si, layer, sub), exp[key], f"scale {si} ({side[1:]}x{side[1:]}): {key}")
        out.items.extend(f"{case['name']}: {f}" for f in failures)
        tolerated.extend(f"{case['name']}: {swap}" for swap in swaps)
    extra_kept = {k for k in selections.kept if f"fastvar_keep_idx.s{pns[k[0]]}.b{k[1]}.{k[2]}" not in exp}
    if keep_keys and extra_kept:
        out.add(f"pruned sub-layers not in the reference: {sorted(extra_kept)[:4]}")

    if "image_pool16" in exp and (FULL or _decode_case(case)):
        _compare_dense(out, "image_pool16", F.avg_pool2d(_decode01(files.vae, latent), 16), exp["image_pool16"],
                       SAMPLED_IMAGE_POOL_ATOL if sampled else IMAGE_POOL_ATOL)
    if not out.items:
        TOLERATED.extend(tolerated)


def _decode_case(case: dict) -> bool:
    """Decoding 1024 px images costs seconds each on a CPU; by default only the official-default samples
    (cfg 4.5, more_smooth, batch 1) check image_pool16 end to end. The VAE itself is checked on every
    vae_decode case, and f_hat_final (the decoder's input) on every case."""
    return case["kind"] == "sample" and case["more_smooth"] and case["cfg"] == 4.5 and case["batch_size"] == 1
