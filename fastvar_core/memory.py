"""Memory report: the bytes each part of a released model holds and the peak a run at a given size needs.

Parts are built from the released shapes on the meta device (no weights are read or allocated) through the
:class:`~fastvar_core.families.Family` interface; working memory comes from the cost model
(:func:`families.sampling_memory`, :func:`families.decode_memory`) and the text encoder's own estimate, the
numbers the ComfyUI nodes hand to the memory manager. Sizes are in GiB (2**30 bytes), as GPUs are sold.

Peaks: "parts take turns" is the largest stage (text encoding, sampling, decoding) with only that stage's parts
resident, which is how ComfyUI's manager can run a workflow when all parts do not fit at once; "all resident"
keeps every part loaded. The working memory assumes the attention kernel named in the report: "math" holds one
score matrix per head (an upper bound), "flash" (flash-attn or PyTorch's fused SDPA kernels on a GPU) holds none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain

import torch

from . import families
from .errors import ConfigError
from .ops import WEIGHT_DTYPES, TorchOps, store_weights

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("flash", "math")
PARTS = ("transformer", "text encoder", "VAE")


def released_names() -> list[str]:
    """Every family's released transformers (Infinity-2B, Infinity-8B, HART-0.7B, ...)."""
    return [n for f in families.family_names() for n in families.get_family(f).released_configs()]


def find_model(name: str) -> tuple[families.Family, str, object]:
    """(family, released name, config) of a released transformer, matched case-insensitively."""
    known = {}
    for fam_name in families.family_names():
        fam = families.get_family(fam_name)
        for released, config in fam.released_configs().items():
            known[released.lower()] = (fam, released, config)
    if name.lower() not in known:
        raise ConfigError(f"--model {name!r} is not a released model; choose one of "
                          f"{', '.join(v[1].lower() for v in known.values())}")
    return known[name.lower()]


def parse_size(size: str) -> tuple[int | None, int | None, str | None]:
    """(width, height, budget) of --size: "1024" (a square of that side), "2K" (the 2K budget) or "WxH"."""
    from .pipeline import check_image_size

    text = str(size).strip()
    if text.upper() == "2K":
        return None, None, "2K"
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text)
    if not match:
        raise ConfigError(f"--size must be a side such as 1024, 2K, or WIDTHxHEIGHT such as 1536x640; got {size!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    check_image_size(width, height)
    return width, height, None


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors once)."""
    return sum(t.numel() * t.element_size() for t in chain(module.parameters(), module.buffers()))


def meta_transformer(fam: families.Family, config, dtype: torch.dtype, weight_dtype: str = "default"):
    """The released transformer on the meta device computing in ``dtype``, its Linear weights stored as the
    loaders store them for ``weight_dtype``."""
    with torch.device("meta"):
        model = fam.to_compute_dtype(fam.random_model(config), dtype)
        if WEIGHT_DTYPES[weight_dtype] is not None:
            store_weights(model, WEIGHT_DTYPES[weight_dtype], TorchOps)
    return model


@dataclass(frozen=True)
class Part:
    name: str  # one of PARTS
    weights: dict[str, int]  # resident bytes by weight_dtype name (only the transformer's depend on it)
    working: int  # peak working bytes beside the weights at the report's size


@dataclass(frozen=True)
class Report:
    model: str
    image_size: tuple[int, int]  # (height, width) in pixels of the schedule that runs
    batch: int
    pruning: str
    dtype: str
    attention: str
    parts: tuple[Part, ...]
    sampler_needs_vae: bool  # the VAE stays resident while sampling (HART's codebook)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def weights(self, weight_dtype: str) -> int:
        return sum(p.weights[weight_dtype] for p in self.parts)

    def peak_in_turns(self, weight_dtype: str) -> int:
        """Largest stage: text encoding, sampling (with the VAE if the sampler needs it) or decoding."""
        t, e, v = (self.part(n) for n in PARTS)
        sampling = t.weights[weight_dtype] + t.working + (v.weights[weight_dtype] if self.sampler_needs_vae else 0)
        return max(e.weights[weight_dtype] + e.working, sampling, v.weights[weight_dtype] + v.working)

    def peak_resident(self, weight_dtype: str) -> int:
        """Every part loaded at once plus the largest stage's working memory."""
        return self.weights(weight_dtype) + max(p.working for p in self.parts)

    def fits(self, gpu_gib: float, weight_dtype: str) -> str:
        """"yes" (all parts resident), "swap" (parts take turns), "lowvram" (part of the weights offloaded
        during a stage) or "no" (a stage's working memory alone exceeds the GPU)."""
        limit = gpu_gib * GIB
        if self.peak_resident(weight_dtype) <= limit:
            return "yes"
        if self.peak_in_turns(weight_dtype) <= limit:
            return "swap"
        return "lowvram" if max(p.working for p in self.parts) < limit else "no"


def build_report(model: str, size: str = "1024", *, batch: int = 1, pruning: str = "off", dtype: str = "bfloat16",
                 attention: str = "flash") -> Report:
    """The memory report of a released model at ``size`` (see :func:`parse_size`)."""
    from .pipeline import check_batch, load_pruning

    fam, released, config = find_model(model)
    width, height, budget = parse_size(size)
    check_batch(batch)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if attention not in ATTENTION:
        raise ConfigError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    request = load_pruning(pruning)
    compute = DTYPES[dtype]

    net = {name: meta_transformer(fam, config, compute, name) for name in WEIGHT_DTYPES}
    schedule = fam.schedule_for_size(net["default"], width, height, budget)
    plan = families.resolve_pruning(fam, request, schedule, config)
    sampling = families.sampling_memory(fam, net["default"], None, schedule, plan=plan, batch=batch,
                                        score_matrices=attention == "math").total
    with torch.device("meta"):
        vae = fam.random_vae(config)  # the loaders keep the VAE in float32
        encoder = fam.random_text_encoder().to(compute)
    h, w = schedule.image_size
    up = fam.vae_upscale(vae)
    latent = torch.empty(batch, 1, h // up, w // up, device="meta")  # decode memory reads its batch and size
    decode = families.decode_memory(fam, vae, latent)
    constant = lambda module: dict.fromkeys(WEIGHT_DTYPES, tensor_bytes(module))  # noqa: E731
    parts = (Part("transformer", {k: tensor_bytes(m) for k, m in net.items()}, sampling),
             Part("text encoder", constant(encoder), encoder.working_memory(1)),
             Part("VAE", constant(vae), decode))
    return Report(released, (h, w), batch, plan.name, dtype, attention, parts, fam.sampler_needs_vae())


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def summary(weights: int, working: int) -> str:
    """The one line the sampler node and the report share: resident weights plus the predicted working peak."""
    return f"memory: weights {amount(weights)} resident + predicted peak {amount(working)}"


def amount(n: int) -> str:
    """Bytes for a reader: GiB from 0.1 GiB up, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def format_report(report: Report, weight_dtype: str = "default") -> str:
    """Per part and in total: weights for each weight_dtype, working memory and the peaks, in GiB; last, the
    summary line for ``weight_dtype``."""
    names = list(WEIGHT_DTYPES)
    h, w = report.image_size
    lines = [f"{report.model} at {w}x{h}, batch {report.batch}, pruning {report.pruning}, compute {report.dtype}, "
             f"attention {report.attention} (GiB; an estimate from the released shapes, no weights read)",
             "",
             "| part | " + " | ".join(f"weights {n}" for n in names) + " | working at this size |",
             "|---" * (len(names) + 2) + "|"]
    for p in report.parts:
        lines.append(f"| {p.name} | " + " | ".join(_gib(p.weights[n]) for n in names) + f" | {_gib(p.working)} |")
    lines.append("| total weights | " + " | ".join(_gib(report.weights(n)) for n in names) + " | |")
    lines.append("| peak, parts take turns | " + " | ".join(_gib(report.peak_in_turns(n)) for n in names) + " | |")
    lines.append("| peak, all resident | " + " | ".join(_gib(report.peak_resident(n)) for n in names) + " | |")
    lines += ["", "weight_dtype changes only the transformer's Linear weights; the VAE is kept in float32. "
              "Working memory: sampling KV cache and activations (both CFG rows), the text encoder's activations "
              "for one prompt, the VAE decode (tiled above 1024 px).",
              f"weight_dtype {weight_dtype}, all parts resident: "
              + summary(report.weights(weight_dtype), max(p.working for p in report.parts))]
    return "\n".join(lines)


FITS_MODELS = ("Infinity-2B", "Infinity-8B", "HART-0.7B")
FITS_SIZES = ("1024", "2K")
FITS_WEIGHT_DTYPES = ("default", "fp8_e4m3fn")


def fits_table(gpus: list[float], *, batch: int = 1, pruning: str = "off", dtype: str = "bfloat16",
               attention: str = "flash", models=FITS_MODELS, sizes=FITS_SIZES,
               weight_dtypes=FITS_WEIGHT_DTYPES) -> str:
    """Markdown "what fits": one row per model, size and weight_dtype, one column per GPU size (GiB)."""
    for g in gpus:
        if not g > 0:
            raise ConfigError(f"--fits takes GPU memory sizes in GB greater than 0, got {g!r}")
    header = ("| model | size | weight_dtype | all weights | largest stage | " + " | ".join(f"{g:g} GB" for g in gpus)
              + " |")
    lines = [header, "|---" * (5 + len(gpus)) + "|"]
    for model in models:
        for size in sizes:
            report = build_report(model, size, batch=batch, pruning=pruning, dtype=dtype, attention=attention)
            h, w = report.image_size
            for wd in weight_dtypes:
                cells = [report.fits(g, wd) for g in gpus]
                lines.append(f"| {report.model} | {w}x{h} | {wd} | {_gib(report.weights(wd))} | "
                             f"{_gib(report.peak_in_turns(wd))} | " + " | ".join(cells) + " |")
    lines += ["", f"batch {batch}, pruning {pruning}, compute {dtype}, attention {attention}; sizes in GiB. "
              "yes: all parts stay loaded; swap: parts take turns (ComfyUI unloads the text encoder to sample); "
              "lowvram: ComfyUI must offload part of the transformer while sampling (slower); no: a stage's "
              "working memory alone exceeds the GPU."]
    return "\n".join(lines)
