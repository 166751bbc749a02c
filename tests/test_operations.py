"""The operations namespace (docs/architecture.md "Operations namespace"): every model builds its
weight-holding layers from ``operations=`` and reads raw weights only through ``ops.cast_bias_weight``,
so a host's layers may store weights in fp8, or elsewhere, and cast them at call time.

Three test namespaces, none of them ComfyUI's:
* ``FP8``: layers store float8_e4m3fn weights and cast them to the input dtype in forward (no hook:
  the library's default cast, ``.to(device, dtype)``, serves the raw reads);
* ``SCALED64``: layers store 4 x the weight in float64 and undo both at call time, in forward and in
  the namespace's ``cast_bias_weight`` hook; any read of ``.weight`` that bypasses them is off by 4x
  (or fails on the dtype), so matching the default model proves every read goes through the namespace
  (ComfyUI's lowvram / scaled-fp8 layers work the same way);
* ``Counting``: plain torch layers that count their constructions.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import PARITY
from safetensors.torch import load_file

from fastvar_core import ops as nnops
from fastvar_core.hart import HARTTextConditioning, load_hart_model, load_hart_vae, sample_hart
from fastvar_core.hart import model as hart_model
from fastvar_core.infinity import load_infinity_model, sample_infinity
from fastvar_core.infinity import model as inf_model
from fastvar_core.infinity.vae import load_infinity_vae
from fastvar_core.sampling import SamplingHooks
from fastvar_core.schedules import ScaleSchedule, hart_schedule, infinity_schedule

INF = PARITY / "infinity" / "checkpoints"
INF_CASE = PARITY / "infinity" / "cases" / "sample_0.06M_1x1_b1_cfg4_tau0.5_negprompt__infinity"
HART = PARITY / "hart" / "checkpoint"


# ------------------------------------------------------------------------------------------------
# test namespaces


class _Cast:
    """Mixin: weights stored as ``scale * w`` in ``storage`` (applied by :func:`store`), cast back at call time."""

    storage: torch.dtype = torch.float32
    scale: float = 1.0
    fit_scale = False  # store() picks a per-layer scale that fits the storage range
    casts = 0  # calls of the namespace hook, across all layers

    def cast(self, dtype, device, bias_dtype=None):
        def back(t):
            return None if t is None else (t.to(device, torch.float64) / self.scale).to(dtype)

        return back(self.weight), back(getattr(self, "bias", None)).to(bias_dtype or dtype) \
            if getattr(self, "bias", None) is not None else None


def _namespace(name: str, storage: torch.dtype, scale: float, hook: bool, fit_scale: bool = False):
    base = type(f"{name}Cast", (_Cast,), {"storage": storage, "scale": scale, "fit_scale": fit_scale})

    class Linear(base, nn.Linear):
        def forward(self, x):
            return F.linear(x, *self.cast(x.dtype, x.device))

    class Conv2d(base, nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, *self.cast(x.dtype, x.device))

    class LayerNorm(base, nn.LayerNorm):
        def forward(self, x):
            w, b = self.cast(x.dtype, x.device) if self.weight is not None else (None, None)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class GroupNorm(base, nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, *self.cast(x.dtype, x.device), self.eps)

    class Embedding(base, nn.Embedding):
        def forward(self, idx):
            return F.embedding(idx, self.cast(torch.float32, idx.device)[0])

    attrs = {"Linear": Linear, "Conv2d": Conv2d, "LayerNorm": LayerNorm, "GroupNorm": GroupNorm,
             "Embedding": Embedding, "layer": base}
    if hook:
        def cast_bias_weight(layer, dtype=None, device=None, bias_dtype=None):
            base.casts += 1
            return layer.cast(dtype, device, bias_dtype)

        attrs["cast_bias_weight"] = staticmethod(cast_bias_weight)
    return type(name, (), attrs)


FP8 = _namespace("FP8", torch.float8_e4m3fn, 1.0, hook=True, fit_scale=True)
FP8_NO_HOOK = _namespace("FP8NoHook", torch.float8_e4m3fn, 1.0, hook=False)
SCALED64 = _namespace("Scaled64", torch.float64, 4.0, hook=True)


def store(model: nn.Module, ops) -> nn.Module:
    """Re-store every namespace layer's parameters as ``scale * p`` in the namespace's storage dtype.

    With ``fit_scale`` each layer gets a power-of-two scale that maps its largest magnitude into
    [112, 224] (e4m3fn tops out at 448), as ComfyUI's scaled fp8 checkpoints do.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, ops.layer):
            params = list(m.named_parameters(recurse=False))
            if m.fit_scale and params:
                amax = max(p.detach().abs().max().item() for _, p in params)
                m.scale = 2.0 ** math.floor(math.log2(224 / amax)) if amax > 0 else 1.0
            for name, p in params:
                setattr(m, name, nn.Parameter((p.detach().double() * m.scale).to(m.storage), requires_grad=False))
                n += 1
    assert n > 0
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def dequantized(plain: nn.Module, stored: nn.Module, ops) -> nn.Module:
    """``plain`` (a default-namespace model) with each namespace layer's weights as ``stored`` computes with."""
    for name, m in stored.named_modules():
        if isinstance(m, ops.layer) and getattr(m, "weight", None) is not None:
            target = plain.get_submodule(name)
            w, b = m.cast(target.weight.dtype, target.weight.device)
            target.weight.data = w
            if b is not None:
                target.bias.data = b
    return plain


# ------------------------------------------------------------------------------------------------
# reference runs (default namespace), teacher-forced runs of the other namespaces replay their tokens


@pytest.fixture(scope="module")
def infinity_ref():
    inputs = load_file(str(INF_CASE / "inputs.safetensors"))
    cond = SimpleNamespace(kv_compact=inputs["text.kv_compact"], lens=inputs["text.lens"].tolist())
    full = infinity_schedule(1.0, "0.06M")
    schedule = ScaleSchedule("infinity", full.scales[:7], full.rope_grid, 1.0, "0.06M")  # up to 16x16
    logits, hooks = _logits_observer()
    result = sample_infinity(load_infinity_model(INF / "infinity_tiny.pth"), cond, schedule, cfg=3.0, seed=5,
                             hooks=hooks)
    image = load_infinity_vae(INF / "infinity_vae_d32_tiny.pth").decode(result.latent)
    return SimpleNamespace(cond=cond, schedule=schedule, result=result, image=image, logits=_flat(logits))


def _logits_observer(teacher=None) -> tuple[dict, SamplingHooks]:
    """A dict that fills with every scale's guided logits, and the hooks that fill it (teacher-forced if given)."""
    seen: dict[int, torch.Tensor] = {}
    return seen, SamplingHooks(on_logits=lambda scale, logits: seen.__setitem__(scale, logits.float().clone()),
                               teacher=teacher)


def _flat(logits: dict) -> torch.Tensor:
    return torch.cat([logits[s].flatten() for s in sorted(logits)])


def _infinity_run(model, ref):
    logits, hooks = _logits_observer(ref.result.tokens)
    sample_infinity(model, ref.cond, ref.schedule, cfg=3.0, seed=5, hooks=hooks)
    return _flat(logits)


@pytest.fixture(scope="module")
def hart_ref():
    p = load_file(str(PARITY / "hart" / "prompts.safetensors"))
    cond = HARTTextConditioning(p["context_tensor"][:1], p["context_mask"][:1], p["context_position_ids"][:1])
    schedule = hart_schedule((1, 2, 3, 4, 6, 8))
    model, vae = load_hart_model(HART), load_hart_vae(HART / "tokenizer")
    teacher = dict(sample_hart(model, cond, schedule, vae=vae, seed=2).tokens)
    logits, hooks = _logits_observer(teacher)
    result = sample_hart(model, cond, schedule, vae=vae, seed=2, hooks=hooks)
    return SimpleNamespace(cond=cond, schedule=schedule, teacher=teacher, result=result,
                           image=vae.decode(result.latent), logits=_hart_stats(logits))


def _hart_stats(logits: dict) -> torch.Tensor:
    """Per position log-sum-exp and maximum of the logits of every scale (what the parity set stores)."""
    return torch.cat([torch.cat([logits[s].logsumexp(-1).flatten(), logits[s].amax(-1).flatten()])
                      for s in sorted(logits)])


def _hart_run(model, vae, ref):
    """(logits statistics, latent) of a teacher-forced run (the residual diffusion included)."""
    logits, hooks = _logits_observer(ref.teacher)
    out = sample_hart(model, ref.cond, ref.schedule, vae=vae, seed=2, hooks=hooks)
    return _hart_stats(logits), out.latent


def _ref_hart_logits(ref):
    return ref.logits


def _namespace_layers(model: nn.Module, ops) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ops.layer) and next(m.parameters(recurse=False), None) is not None]


# ------------------------------------------------------------------------------------------------
# (a) fp8 weight storage, compute in float32 (and bf16 for Infinity's blocks)
#
# Measured (tiny checkpoints, 2 CPU threads): fp8 vs float32 relative L2 error of Infinity's logits
# 0.079 (bf16 blocks 0.084), Infinity VAE image 0.18; HART logit statistics 0.021, latent 0.086,
# HART VAE image 0.18. e4m3fn keeps 3 mantissa bits, so each weight moves by up to 6%. The exact
# check is against each model's float32 twin holding the fp8-rounded weights: float rounding only.


def test_fp8_infinity_transformer_and_vae(infinity_ref):
    model = store(load_infinity_model(INF / "infinity_tiny.pth", operations=FP8), FP8)
    layers = _namespace_layers(model, FP8)
    assert all(p.dtype == torch.float8_e4m3fn for m in layers for p in m.parameters(recurse=False))
    twin = dequantized(load_infinity_model(INF / "infinity_tiny.pth"), model, FP8)
    ref_logits = infinity_ref.logits
    logits = _infinity_run(model, infinity_ref)
    assert rel_err(logits, _infinity_run(twin, infinity_ref)) < 1e-5  # oneDNN vs F.linear rounding
    assert rel_err(logits, ref_logits) < 0.12

    bf16 = store(load_infinity_model(INF / "infinity_tiny.pth", operations=FP8, dtype=torch.bfloat16), FP8)
    assert bf16.block_dtype == torch.bfloat16
    twin16 = dequantized(load_infinity_model(INF / "infinity_tiny.pth", dtype=torch.bfloat16), bf16, FP8)
    logits16 = _infinity_run(bf16, infinity_ref)
    assert rel_err(logits16, _infinity_run(twin16, infinity_ref)) < 1e-2  # bf16 rounding (measured 3e-3)
    assert rel_err(logits16, ref_logits) < 0.12

    vae = store(load_infinity_vae(INF / "infinity_vae_d32_tiny.pth", operations=FP8), FP8)
    image = vae.decode(infinity_ref.result.latent)
    twin_vae = dequantized(load_infinity_vae(INF / "infinity_vae_d32_tiny.pth"), vae, FP8)
    assert rel_err(image, twin_vae.decode(infinity_ref.result.latent)) < 1e-5
    assert torch.isfinite(image).all() and rel_err(image, infinity_ref.image) < 0.3


def test_fp8_hart_transformer_and_vae(hart_ref):
    model = store(load_hart_model(HART, operations=FP8), FP8)
    vae = store(load_hart_vae(HART / "tokenizer", operations=FP8), FP8)
    for m in _namespace_layers(model, FP8) + _namespace_layers(vae, FP8):
        assert all(p.dtype == torch.float8_e4m3fn for p in m.parameters(recurse=False))
    logits, latent = _hart_run(model, vae, hart_ref)
    twin_vae = dequantized(load_hart_vae(HART / "tokenizer"), vae, FP8)
    twin_logits, twin_latent = _hart_run(dequantized(load_hart_model(HART), model, FP8), twin_vae, hart_ref)
    assert torch.equal(vae.codebook(), twin_vae.quantize.embedding.weight)  # float32, through the hook
    assert rel_err(logits, twin_logits) < 1e-5 and rel_err(latent, twin_latent) < 1e-5
    assert rel_err(logits, _ref_hart_logits(hart_ref)) < 0.05
    assert rel_err(latent, hart_ref.result.latent) < 0.15
    image = vae.decode(hart_ref.result.latent)
    assert torch.isfinite(image).all() and rel_err(image, hart_ref.image) < 0.3


def test_fp8_without_hook_uses_the_default_cast(infinity_ref):
    """A namespace without ``cast_bias_weight``: raw reads fall back to ``.to(device, dtype)``."""
    model = store(load_infinity_model(INF / "infinity_tiny.pth", operations=FP8_NO_HOOK), FP8_NO_HOOK)
    twin = dequantized(load_infinity_model(INF / "infinity_tiny.pth"), model, FP8_NO_HOOK)
    assert rel_err(_infinity_run(model, infinity_ref), _infinity_run(twin, infinity_ref)) < 1e-5


# ------------------------------------------------------------------------------------------------
# (c) lowvram emulation: weights kept as 4 x w in float64, cast at call time to float32


def test_scaled_float64_storage_matches_the_default_models(infinity_ref, hart_ref):
    SCALED64.layer.casts = 0
    model = store(load_infinity_model(INF / "infinity_tiny.pth", operations=SCALED64), SCALED64)
    ref_logits = infinity_ref.logits
    assert rel_err(_infinity_run(model, infinity_ref), ref_logits) < 1e-5  # measured 1.0e-6 (oneDNN vs F.linear)
    vae = store(load_infinity_vae(INF / "infinity_vae_d32_tiny.pth", operations=SCALED64), SCALED64)
    assert rel_err(vae.decode(infinity_ref.result.latent), infinity_ref.image) < 1e-6  # measured 0

    hart = store(load_hart_model(HART, operations=SCALED64), SCALED64)
    hvae = store(load_hart_vae(HART / "tokenizer", operations=SCALED64), SCALED64)
    logits, latent = _hart_run(hart, hvae, hart_ref)
    assert rel_err(logits, _ref_hart_logits(hart_ref)) < 1e-6  # measured 0
    assert rel_err(latent, hart_ref.result.latent) < 1e-5  # measured 3.5e-7 (diffusion head: oneDNN vs F.linear)
    assert rel_err(hvae.decode(hart_ref.result.latent), hart_ref.image) < 1e-6
    assert SCALED64.layer.casts > 0  # the raw reads went through the namespace's hook


# ------------------------------------------------------------------------------------------------
# (b) every weight-holding layer comes from the namespace


def _counting():
    made = []

    def layer(cls):
        class Counted(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        Counted.__name__ = cls.__name__
        return Counted

    ops = SimpleNamespace(**{n: layer(getattr(nn, n)) for n in ("Linear", "LayerNorm", "Conv2d", "Embedding", "GroupNorm")})
    return ops, made


# Modules that hold parameters of their own, outside the namespace, and why.
OWN_PARAMETERS = {
    inf_model.SelfAttention: "q_bias/v_bias join the fused qkv product's bias and set the block's compute dtype; "
                             "scale_mul_1H11 is the float32 per-head log-scale",
    inf_model.CrossAttention: "v_bias joins the fused kv product's bias and sets the block's compute dtype",
    inf_model._PoolAttention: "mat_q is the learned pooling query (a tensor, not a layer); v_bias as above",
    inf_model.Block: "ada_gss, the float32 adaLN offsets added to the shared vector",
    inf_model.InfinityTransformer: "cfg_uncond (unconditional text features) and pos_start, used as tensors",
    inf_model.RMSNorm: "float32 RMSNorm (torch.nn has no layer with its rounding); the text path stays float32",
    hart_model.Attention: "q_bias/v_bias join the fused qkv product's bias; scale_mul_1H11 is the per-head log-scale",
    hart_model.RMSNorm: "HART's RMSNorm rounding (fp32 statistics, output in the input dtype); its weight "
                        "also marks the model's compute device and dtype",
}


@pytest.mark.parametrize("part", ["infinity", "infinity_vae", "hart", "hart_vae"])
def test_every_weight_layer_comes_from_the_namespace(part):
    ops, made = _counting()
    load = {
        "infinity": lambda: load_infinity_model(INF / "infinity_tiny.pth", operations=ops),
        "infinity_vae": lambda: load_infinity_vae(INF / "infinity_vae_d32_tiny.pth", operations=ops),
        "hart": lambda: load_hart_model(HART, operations=ops),
        "hart_vae": lambda: load_hart_vae(HART / "tokenizer", operations=ops),
    }[part]
    model = load()
    classes = tuple(vars(ops).values())
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    stray = sorted({type(m).__name__ for m in holders if not isinstance(m, classes) and type(m) not in OWN_PARAMETERS})
    assert not stray, f"{part}: parameters held outside the namespace by {stray}"
    namespace_layers = [m for m in model.modules() if isinstance(m, classes)]
    assert len(made) == len(namespace_layers) > 0  # built once each, all kept
    assert {id(m) for m in made} == {id(m) for m in namespace_layers}
    if part.endswith("vae"):
        assert all(isinstance(m, classes) for m in holders)  # the VAEs hold nothing of their own


def test_default_namespace_is_torch_nn_and_reads_weights_without_copies():
    assert nnops.resolve(None) is nnops.TorchOps
    assert all(getattr(nnops.TorchOps, n) is getattr(nn, n) for n in ("Linear", "LayerNorm", "Conv2d", "Embedding", "GroupNorm"))
    layer = nn.Linear(4, 3)
    w, b = nnops.cast_bias_weight(layer, torch.float32, "cpu")
    assert w is layer.weight and b is layer.bias  # the guarded fast path: as stored
    w16, _ = nnops.cast_bias_weight(layer, torch.bfloat16, "cpu")
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, layer.weight.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# fp8 storage straight from the file (the loaders' weight_dtype) == loading, then store_weights


def _bits(model: nn.Module) -> dict[str, tuple[torch.dtype, torch.Tensor]]:
    return {k: (v.dtype, v.contiguous().view(torch.uint8)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("part, dtype", [("infinity", torch.float32), ("infinity", torch.bfloat16),
                                         ("hart", torch.float32), ("hart", torch.bfloat16)])
def test_fp8_load_straight_from_the_file_equals_load_then_store(part, dtype, storage):
    load = {"infinity": lambda **kw: load_infinity_model(INF / "infinity_tiny.pth", **kw),
            "hart": lambda **kw: load_hart_model(HART, **kw)}[part]
    direct = load(dtype=dtype, operations=nnops.CastOps, weight_dtype=storage)
    cast = load(dtype=dtype, operations=nnops.CastOps)
    assert nnops.store_weights(cast, storage, nnops.CastOps) > 0
    got, want = _bits(direct), _bits(cast)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key][0] == want[key][0], key
        assert torch.equal(got[key][1], want[key][1]), key
    stored = set(nnops.stored_keys(direct, nnops.CastOps))
    assert stored and {got[k][0] for k in stored} == {storage}
    assert storage not in {got[k][0] for k in got.keys() - stored}  # biases of the fused products, norms, ...


# ------------------------------------------------------------------------------------------------
# VAEs in ComfyUI's vae_dtype: bfloat16 storage and compute (the decode casts the latent in, the image out)


@pytest.mark.parametrize("family", ["infinity", "hart"])
def test_vaes_decode_in_bfloat16(family, infinity_ref, hart_ref):
    """Measured (tiny VAEs, CPU): relative L2 error of the bf16 image against float32 0.010 (Infinity), 0.008 (HART)."""
    from fastvar_core import families

    load, ref = {"infinity": (lambda **kw: load_infinity_vae(INF / "infinity_vae_d32_tiny.pth", **kw), infinity_ref),
                 "hart": (lambda **kw: load_hart_vae(HART / "tokenizer", **kw), hart_ref)}[family]
    vae = load(dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    raw = vae.decode(ref.result.latent)  # a float32 latent goes in
    assert raw.dtype == torch.bfloat16 and torch.isfinite(raw).all()
    image = families.decode(family, vae, ref.result.latent, "off")
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    assert rel_err(image, families.decode(family, load(), ref.result.latent, "off")) < 0.05
