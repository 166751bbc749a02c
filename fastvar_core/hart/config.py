"""HART transformer configuration: read ``llm/config.json`` and check it against the weights.

Only the structure of the released text-to-image model is supported (docs/hart.md §1.3, §2.2): llama
attention and SwiGLU FFN, ``disable_aln`` without a shared AdaLN table, no cross-attention, the
iDDPM residual diffusion head. Every other size or flag is read from the file and validated against
the tensor shapes (docs/hart.md §2.3, §2.4), so a config that does not describe its weights is refused
before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

MODEL_TYPE = "hart_transformer_t2i"
VAE_MODEL_TYPE = "hart_autoencoder_with_disc"
TIMESTEP_FEATURES = 256  # sinusoid width of the level and diffusion-time embeddings (docs/hart.md §2.2 item 4)

# HARTForT2IConfig's code defaults, used for fields config.json leaves out (as transformers does).
_DEFAULTS: dict[str, object] = {
    "context_token": 77,
    "context_dim": 768,
    "depth": 16,
    "embed_dim": 1024,
    "num_heads": 16,
    "mlp_ratio": 4.0,
    "norm_eps": 1e-6,
    "attn_type": "gpt2",
    "mlp_type": "gpt2",
    "disable_aln": False,
    "shared_aln": False,
    "use_cross_attn": False,
    "use_timestep_embed": False,
    "attn_l2_norm": False,
    "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    "use_context_norm": False,
    "diff_width": 1024,
    "diff_depth": 6,
    "num_sampling_steps": "8",
    "sampler": "iddpm",
}

# The released model's structure; anything else is a different architecture this pack does not build.
_REQUIRED_FLAGS: dict[str, object] = {
    "attn_type": "llama",
    "mlp_type": "llama",
    "disable_aln": True,
    "shared_aln": False,
    "use_cross_attn": False,
    "sampler": "iddpm",
}


@dataclass(frozen=True)
class HARTConfig:
    """Sizes and flags of a HART transformer (llm/config.json plus what only the weights tell)."""

    embed_dim: int  # C
    depth: int
    num_heads: int  # H
    ffn_hidden: int  # F, SwiGLU hidden width
    norm_eps: float
    context_token: int  # T_ctx, text tokens per prompt
    context_dim: int  # D_ctx, text-encoder width
    patch_nums: tuple[int, ...]
    attn_l2_norm: bool
    use_context_norm: bool
    use_timestep_embed: bool
    diff_width: int  # W
    diff_depth: int  # J
    num_sampling_steps: str  # iDDPM respacing string, e.g. "8"
    vocab_size: int  # V, from head.weight
    vae_channels: int  # Cvae, from word_embed.weight

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def total_tokens(self) -> int:
        """Sum of pn^2 over the scales (9451 for the 1024 px schedule)."""
        return sum(p * p for p in self.patch_nums)

    def describe(self) -> str:
        pn = self.patch_nums
        attn = "l2-normalised q/k" if self.attn_l2_norm else "scale 0.25/sqrt(hd)"
        return (
            f"HART transformer: depth {self.depth}, width {self.embed_dim}, {self.num_heads} heads "
            f"(hd {self.head_dim}, {attn}), SwiGLU {self.ffn_hidden}, vocab {self.vocab_size}, Cvae {self.vae_channels}; "
            f"text {self.context_token} x {self.context_dim}{' (context_norm)' if self.use_context_norm else ''}; "
            f"{len(pn)} scales {pn[0]}..{pn[-1]} ({pn[-1] * 16} px); "
            f"diffusion head {self.diff_depth} x {self.diff_width}, {self.num_sampling_steps} steps"
        )


def llama_ffn_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """SwiGLU width: 2/3 of C * mlp_ratio rounded up to a multiple of 256 (docs/hart.md §2.1)."""
    return int((embed_dim * mlp_ratio * 2) / 3 + 255) // 256 * 256


def _field(cfg: Mapping, name: str, kind: type, source: str):
    value = cfg.get(name, _DEFAULTS.get(name))
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"{source}: field '{name}' should be a {kind.__name__}, found {value!r}.")
    return value


def _shape(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], source: str, why: str) -> None:
    if key not in state:
        raise CheckpointError(f"{source}: tensor '{key}' is missing (expected from {why}).")
    found = tuple(state[key].shape)
    if found != shape:
        raise CheckpointError(f"{source}: tensor '{key}' has shape {list(found)}, but {why} implies {list(shape)}.")


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive numbered sub-modules ``prefix{i}.`` in the keys."""
    found = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def detect_hart_config(cfg: Mapping, state: Mapping[str, torch.Tensor], source: str) -> HARTConfig:
    """Build a :class:`HARTConfig` from config.json fields, validated against the weights' shapes.

    ``source`` names the config/weight file in error messages.
    """
    model_type = cfg.get("model_type")
    if model_type != MODEL_TYPE:
        hint = " This is the HART VAE ('tokenizer' folder); pass the 'llm' folder." if model_type == VAE_MODEL_TYPE else ""
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected '{MODEL_TYPE}'.{hint}")
    for name, want in _REQUIRED_FLAGS.items():
        found = cfg.get(name, _DEFAULTS[name])
        if found != want:
            raise CheckpointError(
                f"{source}: {name} = {found!r}, but only the released HART structure ({name} = {want!r}) is supported."
            )

    C = _field(cfg, "embed_dim", int, source)
    depth = _field(cfg, "depth", int, source)
    H = _field(cfg, "num_heads", int, source)
    mlp_ratio = _field(cfg, "mlp_ratio", float, source)
    norm_eps = _field(cfg, "norm_eps", float, source)
    T = _field(cfg, "context_token", int, source)
    D = _field(cfg, "context_dim", int, source)
    patch_nums = tuple(_field(cfg, "patch_nums", list, source))
    l2 = _field(cfg, "attn_l2_norm", bool, source)
    ctx_norm = _field(cfg, "use_context_norm", bool, source)
    ts_embed = _field(cfg, "use_timestep_embed", bool, source)
    W = _field(cfg, "diff_width", int, source)
    J = _field(cfg, "diff_depth", int, source)
    steps = cfg.get("num_sampling_steps", _DEFAULTS["num_sampling_steps"])
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = str(steps)
    if not isinstance(steps, str) or not all(s.strip().isdigit() for s in steps.split(",")):
        raise CheckpointError(f"{source}: num_sampling_steps should be a step count like \"8\", found {steps!r}.")

    if min(C, depth, H, T, D, W, J) < 1 or C % H or (C // H) % 4:
        raise CheckpointError(
            f"{source}: embed_dim={C}, num_heads={H}, depth={depth}, context_token={T}, context_dim={D}, "
            f"diff_width={W}, diff_depth={J}: sizes must be positive and the head size a multiple of 4 (2D RoPE)."
        )
    if not patch_nums or patch_nums[0] != 1 or any(not isinstance(p, int) or p < 1 for p in patch_nums):
        raise CheckpointError(f"{source}: patch_nums {list(patch_nums)} must be positive integers starting with 1.")

    # Sizes only the weights know.
    if "head.weight" not in state or "word_embed.weight" not in state:
        raise CheckpointError(f"{source}: tensors 'head.weight' / 'word_embed.weight' are missing: not a HART transformer.")
    V = state["head.weight"].shape[0]
    Cvae = state["word_embed.weight"].shape[1]
    F = llama_ffn_hidden(C, mlp_ratio)

    _shape(state, "head.weight", (V, C), source, f"embed_dim={C}")
    _shape(state, "word_embed.weight", (C, Cvae), source, f"embed_dim={C}")
    _shape(state, "context_embed.weight", (C, D), source, f"embed_dim={C}, context_dim={D}")
    if ctx_norm:
        _shape(state, "context_norm.weight", (D,), source, "use_context_norm=true")
    elif "context_norm.weight" in state:
        raise CheckpointError(f"{source}: has 'context_norm.weight' but config.json says use_context_norm=false.")
    if ts_embed:
        _shape(state, "lvl_embed.mlp.0.weight", (C, TIMESTEP_FEATURES), source, "use_timestep_embed=true")
    else:
        _shape(state, "lvl_embed.weight", (len(patch_nums), C), source, "use_timestep_embed=false and patch_nums")
    found_depth = _count(state, "blocks.")
    if found_depth != depth:
        raise CheckpointError(f"{source}: holds {found_depth} blocks, but config.json says depth={depth}.")
    for i in range(depth):
        _shape(state, f"blocks.{i}.attn.qkv_proj.weight", (3 * C, C), source, f"embed_dim={C}")
        _shape(state, f"blocks.{i}.ffn.gate_proj.weight", (F, C), source, f"embed_dim={C}, mlp_ratio={mlp_ratio}")
        if l2:
            _shape(state, f"blocks.{i}.attn.scale_mul_1H11", (1, H, 1, 1), source, f"attn_l2_norm=true, num_heads={H}")
        elif f"blocks.{i}.attn.scale_mul_1H11" in state:
            raise CheckpointError(
                f"{source}: has 'blocks.{i}.attn.scale_mul_1H11' but config.json says attn_l2_norm=false."
            )
    _shape(state, "diffloss.net.input_proj.weight", (W, Cvae), source, f"diff_width={W}")
    _shape(state, "diffloss.net.cond_embed.weight", (W, C), source, f"diff_width={W}, embed_dim={C}")
    _shape(state, "diffloss.net.final_layer.linear.weight", (2 * Cvae, W), source, f"diff_width={W}")
    found_j = _count(state, "diffloss.net.res_blocks.")
    if found_j != J:
        raise CheckpointError(f"{source}: holds {found_j} diffusion res-blocks, but config.json says diff_depth={J}.")

    return HARTConfig(
        embed_dim=C, depth=depth, num_heads=H, ffn_hidden=F, norm_eps=norm_eps, context_token=T, context_dim=D,
        patch_nums=patch_nums, attn_l2_norm=l2, use_context_norm=ctx_norm, use_timestep_embed=ts_embed,
        diff_width=W, diff_depth=J, num_sampling_steps=steps, vocab_size=V, vae_channels=Cvae,
    )


# The release's config (docs/hart.md §1.3), for the schedule chart and cost predictions without weights.
HART_0_7B = HARTConfig(
    embed_dim=1536, depth=24, num_heads=24, ffn_hidden=llama_ffn_hidden(1536, 4.0), norm_eps=1e-6, context_token=300,
    context_dim=1536, patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), attn_l2_norm=True,
    use_context_norm=False, use_timestep_embed=True, diff_width=1024, diff_depth=6, num_sampling_steps="8",
    vocab_size=4096, vae_channels=32,
)
