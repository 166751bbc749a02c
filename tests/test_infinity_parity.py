"""Core acceptance: Infinity / FastVAR-on-Infinity against the official reference outputs.

Parametrised over every case of /work/shared/parity/infinity/cases/ and of every extra case set named
in FASTVAR_PARITY_CASES (colon-separated set folders laid out like parity/infinity/ or parity/hart/).
Each case is run once through the public loaders and ``sample_infinity``, teacher-forced on the
reference's draws and kept-token sets, and judged by the rule of docs/parity.md (tests/parity_rule.py):

* ``logits.SS``: atol 1e-4 (cfg 1, tau 1) / 1e-3 (guided, tau 0.5), scaled for stronger settings;
* ``fastvar_kept_idx.SS.Ln.sub``: equal as sets per row, but for one near-tie swap per row (our pivotal
  scores of the two tokens within 1e-4 relative);
* ``idx_Bld.SS``: every bit drawn exactly, but for proven near-ties of the draw (at most 2 per case);
  ``summed_codes``: <= 1e-6;
* ``vae_decoded``: max <= 2e-3, mean <= 1e-4; ``image_uint8_bgr``: |d| <= 1 on <= 2 % of values.

``error_`` cases (the official code raises) run under our scale-index engine: the latent must be finite
and of the right shape, and every scale before the first pruned/skipped one must equal the unpruned run;
the recorded configuration where it is expressible, and the scale-index ``paper`` preset in every case; a
recorded configuration our engine cannot express (pruning without a cache scale) is refused clearly.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PARITY
from parity_rule import TOLERATED, ReferenceDraws, Selections
from safetensors.torch import load_file

from fastvar_core.errors import ConfigError
from fastvar_core.families import get_family
from fastvar_core.infinity import load_infinity_model, sample_infinity
from fastvar_core.infinity.vae import load_infinity_vae
from fastvar_core.pruning import PruningConfig, make_preset
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import ScaleSchedule, infinity_schedule

try:  # HART-layout sets are checked by the HART parity module's case runner and fixtures
    from test_hart_parity import attention_backend, loaded  # noqa: F401  (pytest fixtures)
    from test_hart_parity import test_hart_parity as _run_hart_case
except ImportError:
    _run_hart_case = None

DEFAULT_SET = PARITY / "infinity"


@dataclass
class TextCond:
    """Same fields as fastvar_core.infinity.text.InfinityTextConditioning."""

    kv_compact: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    prompts: list[str]


def _set_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("FASTVAR_PARITY_CASES", "").split(":") if p.strip()]
    return [DEFAULT_SET, *extra]


def _family(set_dir: Path) -> str:
    if (set_dir / "checkpoint" / "llm").is_dir():
        return "hart"
    for case_json in sorted(set_dir.glob("cases/*/case.json"))[:1]:
        case = json.loads(case_json.read_text())
        if case.get("variant") in ("infinity", "fastvar"):
            return "infinity"
        if "flavor" in case:
            return "hart"
    return "infinity"


def _tokens(case_dir: Path) -> int:
    try:
        schedule = json.loads((case_dir / "case.json").read_text()).get("scale_schedule") or []
        return sum(int(s[-2]) * int(s[-1]) for s in schedule)
    except (json.JSONDecodeError, OSError, TypeError, ValueError, IndexError):
        return 0


def _params():
    params = []
    for set_dir in _set_dirs():
        cases = sorted(p.parent for p in set_dir.glob("cases/*/case.json"))
        if not cases:
            params.append(pytest.param("missing", set_dir, id=f"{set_dir.name}/NO-CASES"))
            continue
        family = _family(set_dir)
        for c in cases:
            # 1024 px schedules take tens of seconds each on 2 CPU cores (still part of `make test`)
            marks = [pytest.mark.slow] if _tokens(c) > 3000 else []
            params.append(pytest.param(family, c, id=f"{set_dir.name}/{c.name}", marks=marks))
    return params


# ----------------------------------------------------------------------------------------------
# shared loading (one model / VAE per file for the whole module)


@functools.lru_cache(maxsize=4)
def _model(path: str, patchify: bool | None):
    return load_infinity_model(path, patchify=patchify)


@functools.lru_cache(maxsize=4)
def _vae(path: str):
    return load_infinity_vae(path)


def _text(tensors: dict, prefix: str) -> TextCond:
    lens = [int(n) for n in tensors[f"{prefix}.lens"]]
    return TextCond(tensors[f"{prefix}.kv_compact"], lens, tensors[f"{prefix}.cu_seqlens_k"], max(lens), [""] * len(lens))


def _schedule(case: dict) -> ScaleSchedule:
    template = float(case["h_div_w_template"])
    scales = tuple((int(h), int(w)) for _, h, w in case["scale_schedule"])
    grid = infinity_schedule(template, "1M").final_size  # RoPE mode 2: the template's 1M last scale
    return ScaleSchedule("infinity", scales, grid, template, case.get("pn"))


def _pruning(case: dict, scales) -> PruningConfig | None:
    """FastVAR config spelled out from case.json's ``fastvar`` block (not a preset)."""
    fv = case.get("fastvar")
    if not fv:
        return None
    by_width = {int(w): float(r) for w, r in fv["prune_ratio_by_width"].items()}
    ratios = {int(s): by_width[scales[int(s)][1]] for s in fv["pruned_scales"]}
    ratios.update({int(s): 1.0 for s in fv["skipped_scales"]})
    layers = [int(x) for x in fv["pruned_layers"]]
    cache = fv["cache_scales_576_tokens"]
    return PruningConfig(drop_ratios=ratios, cache_scale=int(cache[-1]) if cache else None,
                         layers=(min(layers), max(layers) + 1) if layers else (0, 0), name="case")


def _logit_atol(cfg: float, tau: float) -> float:
    if cfg == 1 and tau == 1:
        return 1e-4
    return 1e-3 * max(1.0, 0.5 / tau) * max(1.0, (2 * cfg - 1) / 7)


def _checkpoint_config(case_dir: Path, case: dict) -> dict:
    rel = case["checkpoints"].get("infinity_config")
    return json.loads((case_dir / rel).read_text()) if rel and (case_dir / rel).is_file() else {}


def _load_model(case_dir: Path, case: dict):
    cfg_json = _checkpoint_config(case_dir, case)
    patchify = cfg_json.get("fixed_kwargs_from_load_infinity", {}).get("apply_spatial_patchify")
    return _model(str((case_dir / case["checkpoints"]["infinity"]).resolve()),
                  None if patchify is None else bool(patchify))


def _run(case_dir: Path, case: dict, inputs: dict, pruning, expected: dict | None = None, **overrides):
    """Run a case; with ``expected``, sampled bits are judged against it draw by draw and the run continues
    on the reference bits (docs/parity.md). Returns (model, result, draws judge or None, selections,
    logits): a teacher-forced case also records the guided logits of every executed scale as logits.SS."""
    model = _load_model(case_dir, case)
    negative = _text(inputs, "neg_text") if case.get("negative_text") else None
    teacher = None
    if case.get("teacher_forcing"):
        teacher = {int(k.split(".")[1]): v for k, v in inputs.items() if k.startswith("gt_bits.")}
    kwargs = dict(
        negative=negative, cfg=case["cfg"], tau=case["tau"], top_k=case["top_k"], top_p=case["top_p"],
        seed=case["seed"], pruning=pruning,
    )
    logits: dict[str, torch.Tensor] = {}

    def record_logits(si: int, guided: torch.Tensor) -> None:
        logits[f"logits.{si:02d}"] = guided.detach().clone()

    draws = None
    if expected is not None and teacher is None:
        reference = {int(k.split(".")[1]): v for k, v in expected.items() if k.startswith("idx_Bld.")}
        atol = _logit_atol(float(case["cfg"]), float(case["tau"]))
        draws = ReferenceDraws(case_dir.name, reference, lambda si: atol)
    selections = Selections(_reference_kept(expected or {}))
    kwargs["hooks"] = SamplingHooks(on_select=selections, on_draw=draws, teacher=teacher,
                                    on_logits=record_logits if teacher is not None else None)
    kwargs.update(overrides)
    result = sample_infinity(model, _text(inputs, "text"), _schedule(case), **kwargs)
    return model, result, draws, selections, logits


# ----------------------------------------------------------------------------------------------
# comparisons


def _reference_kept(expected: dict) -> dict:
    """fastvar_kept_idx.SS.L<n>.<sub> -> {(scale, layer, sub): (rows, K)}."""
    kept = {}
    for key, value in expected.items():
        if key.startswith("fastvar_kept_idx."):
            _, s, lay, sub = key.split(".")
            kept[(int(s), int(lay[1:]), sub)] = value
    return kept


def _compare_kept(name, case, selections, expected, errors, tolerated) -> None:
    """Pruning calls and kept-token sets per row (the run continued on the reference's sets)."""
    calls = (case.get("fastvar") or {}).get("pruning_calls")
    if calls is not None:  # every official pruning call, with its keep count
        want_calls = {(c["si"], c["layer"], c["sub"]): c["num_remain"] for c in calls}
        got_calls = {key: idx.shape[1] for key, idx in selections.kept.items()}
        if set(got_calls) != set(want_calls):
            errors.append(f"{name}: pruned sub-layer calls differ: only ours {sorted(set(got_calls) - set(want_calls))[:4]}, "
                          f"only reference {sorted(set(want_calls) - set(got_calls))[:4]}")
        for key in sorted(set(got_calls) & set(want_calls)):
            if got_calls[key] != want_calls[key]:
                errors.append(f"{name}: scale {key[0]:02d} layer {key[1]} {key[2]}: kept {got_calls[key]} tokens, "
                              f"reference {want_calls[key]}")
    for key, ref in sorted(_reference_kept(expected).items()):
        failures, swaps = selections.compare(key, ref, f"scale {key[0]:02d} layer {key[1]} {key[2]}")
        errors.extend(f"{name}: {f}" for f in failures)
        tolerated.extend(f"{name}: {swap}" for swap in swaps)


def _compare_logits(name, case, logits, expected, errors):
    atol = _logit_atol(float(case["cfg"]), float(case["tau"]))
    for key in sorted(k for k in expected if k.startswith("logits.")):
        si = int(key.split(".")[1])
        if key not in logits:
            errors.append(f"{name}: scale {si:02d}: no logits produced (scale not executed?)")
            continue
        got, ref = logits[key].cpu(), expected[key]
        if got.shape != ref.shape:
            errors.append(f"{name}: scale {si:02d}: logits shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
            continue
        per_token = (got - ref).abs().amax(dim=-1)  # (B, L)
        worst = per_token.max().item()
        if worst > atol:
            errors.append(f"{name}: scale {si:02d}: logits max|d| = {worst:.3g} > {atol:g}")
    produced = set(logits)
    extra = sorted(produced - set(expected))
    if extra:
        errors.append(f"{name}: logits produced for scales the reference did not run: {extra}")


def _compare_bits(name, case, result, expected, draws, errors):
    want_exec = case.get("executed_scales")
    if want_exec is not None and list(result.executed_scales) != list(want_exec):
        errors.append(f"{name}: executed scales {result.executed_scales} != reference {want_exec}")
    for key in sorted(k for k in expected if k.startswith("idx_Bld.")):
        si = int(key.split(".")[1])
        if si not in result.tokens:
            errors.append(f"{name}: scale {si:02d}: no sampled bits (scale not executed)")
            continue
        got, ref = result.tokens[si].cpu(), expected[key]
        if got.shape != ref.shape:
            errors.append(f"{name}: scale {si:02d}: idx_Bld shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if draws is not None:  # every draw against the reference: exact but for proven near-ties
        errors.extend(draws.verdict())


def _compare_latent(name, result, expected, errors):
    if "summed_codes" not in expected:
        return
    ref = expected["summed_codes"][:, :, 0]  # (B, d_v, H, W)
    got = result.latent.cpu()
    if got.shape != ref.shape:
        errors.append(f"{name}: summed_codes shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        return
    worst = (got - ref).abs().max().item()
    if worst > 1e-6:
        errors.append(f"{name}: summed_codes max|d| = {worst:.3g} > 1e-6")


def _compare_image(name, case_dir, case, result, expected, errors):
    if "vae_decoded" not in expected and "image_uint8_bgr" not in expected:
        return
    vae = _vae(str((case_dir / case["checkpoints"]["vae"]).resolve()))
    decoded = vae.decode(result.latent).float().cpu()  # (B, 3, H, W) in [-1, 1], RGB
    if "vae_decoded" in expected:
        ref = expected["vae_decoded"]
        if decoded.shape != ref.shape:
            errors.append(f"{name}: vae_decoded shape {tuple(decoded.shape)} != reference {tuple(ref.shape)}")
        else:
            diff = (decoded - ref).abs()
            if diff.max().item() > 2e-3 or diff.mean().item() > 1e-4:
                errors.append(f"{name}: vae_decoded max|d| = {diff.max().item():.3g} (<= 2e-3), "
                              f"mean {diff.mean().item():.3g} (<= 1e-4)")
    if "image_uint8_bgr" in expected:
        ref = expected["image_uint8_bgr"]
        # the official post-processing: (x+1)/2*255, uint8 by truncation, BGR channel order
        image = ((decoded + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))
        if image.shape != ref.shape:
            errors.append(f"{name}: image_uint8_bgr shape {tuple(image.shape)} != reference {tuple(ref.shape)}")
        else:
            diff = (image.int() - ref.int()).abs()
            frac = (diff > 0).float().mean().item()
            if diff.max().item() > 1 or frac > 0.02:
                errors.append(f"{name}: image_uint8_bgr max|d| = {diff.max().item()} (<= 1), "
                              f"{frac:.2%} of values differ (<= 2%)")


# ----------------------------------------------------------------------------------------------
# the tests


def _run_error_case(name, case_dir, case, inputs):
    """The official FastVAR code raises here; our scale-index engine must run these schedules.

    Two configurations run: the one recorded in case.json (when it is expressible: a width-32 scale with
    no 576-token scale before it has nothing to restore from, which our validation refuses clearly) and
    the scale-index ``paper`` preset, which accelerates every aspect ratio.
    """
    base = _schedule(case)
    model = _load_model(case_dir, case)
    configs = []
    recorded = _pruning(case, base.scales) or PruningConfig(name="off")
    try:
        configs.append(recorded.validate(base.num_scales, model.config.depth))
    except ConfigError as exc:
        assert "pruning.cache_scale" in str(exc), f"{name}: unclear refusal: {exc}"
    configs.append(make_preset(get_family("infinity").presets, "paper", base.num_scales, model.config.depth))
    for pruning in configs:
        _check_error_case_run(name, case_dir, case, inputs, base, model, pruning)


def _check_error_case_run(name, case_dir, case, inputs, base, model, pruning):
    name = f"{name} [{pruning.name}]"
    _, result, _, selections, _ = _run(case_dir, case, inputs, pruning)
    B = len(case["text"]["lens"])
    H, W = base.final_size
    scale = 2 if model.config.patchify else 1
    shape = (B, model.config.vae_bits, H * scale, W * scale)
    assert tuple(result.latent.shape) == shape, f"{name}: latent shape {tuple(result.latent.shape)} != {shape}"
    assert torch.isfinite(result.latent).all(), f"{name}: latent has non-finite values"
    skipped = set(pruning.skipped_scales)
    assert result.executed_scales == [s for s in range(base.num_scales) if s not in skipped], name
    if pruning.pruned_scales:
        assert selections.kept, f"{name}: pruning was configured but no sub-layer pruned"

    first = min(pruning.pruned_scales + pruning.skipped_scales, default=base.num_scales)
    if first == 0:
        return
    # Scales before the first pruned/skipped one are untouched by FastVAR: they must equal a run without
    # pruning. That run stops after them (skipping the rest keeps the full-size latent accumulator, so
    # the earlier scales compute exactly what an unpruned run computes).
    stop = PruningConfig(drop_ratios={s: 1.0 for s in range(first, base.num_scales)}, name="prefix")
    _, plain, _, _, _ = _run(case_dir, case, inputs, stop)
    assert plain.executed_scales == list(range(first)), name
    for si in range(first):
        assert torch.equal(result.tokens[si], plain.tokens[si]), (
            f"{name}: scale {si:02d}: bits differ from the unpruned run although pruning starts at scale {first}")


@pytest.mark.parametrize("family,case_dir", _params())
def test_parity_case(family: str, case_dir: Path, request):
    if family == "missing":
        pytest.fail(f"FASTVAR_PARITY_CASES names {case_dir}, which has no cases/<name>/case.json")
    if family == "hart":
        if _run_hart_case is None:
            pytest.fail(f"{case_dir.name}: tests/test_hart_parity.py (the HART case runner) cannot be imported")
        _run_hart_case(case_dir, request.getfixturevalue("loaded"), request.getfixturevalue("attention_backend"))
        return

    case = json.loads((case_dir / "case.json").read_text())
    name = case_dir.name
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    expected_file = case_dir / "expected.safetensors"
    if case.get("expected_error") or not expected_file.is_file():
        _run_error_case(name, case_dir, case, inputs)
        return

    expected = load_file(str(expected_file))
    pruning = _pruning(case, _schedule(case).scales)
    _, result, draws, selections, logits = _run(case_dir, case, inputs, pruning, expected)
    errors: list[str] = []
    tolerated: list[str] = []
    if pruning is not None:
        _compare_kept(name, case, selections, expected, errors, tolerated)
    _compare_logits(name, case, logits, expected, errors)
    _compare_bits(name, case, result, expected, draws, errors)
    _compare_latent(name, result, expected, errors)
    _compare_image(name, case_dir, case, result, expected, errors)
    assert not errors, "\n".join(errors)
    TOLERATED.extend(tolerated)
