"""One front door for every model family (docs/architecture.md §2).

A :class:`Family` holds everything that differs between Infinity and HART: how its parts load and pair,
which schedule a requested size gets, how its sampler is called, its defaults, capabilities, pruning
preset table and cost-model shapes. Each family implements it in its own folder
(``fastvar_core/infinity/family.py``, ``fastvar_core/hart/family.py``) and registers itself here.

The checks every front door needs (seed range, finite conditioning and latent, negative prompt support,
top-k meaning, decode tiling) live once, in :func:`sample` and :func:`decode`; the Pipeline, the CLI and
the ComfyUI nodes all go through them.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import cost
from .cost import ArchSpec, MemoryEstimate
from .errors import ConfigError, IncompatibleModelsError
from .pruning import PresetTable, PruningConfig
from .pruning_request import PruningRequest
from .sampling import ProgressCallback, SampleResult, SamplingHooks, check_finite, check_seed
from .schedules import ScaleSchedule
from .vae_layout import takes_bands

NUMERIC_HINT = "the weights may be corrupt (download them again) or overflow in float16 (use bfloat16 or float32)"
TILE = 64  # latent cells per decode tile; latents larger than one tile (2K) decode in tiles
MIN_TILE = 32  # the smallest tile a memory budget can choose: below it per-tile GroupNorm statistics drift
TILE_OVERLAP = 8  # latent cells neighbouring tiles share in both VAEs' tiled decodes
# What a decode holds beyond the live tensors its estimate counts: freeing map after map leaves memory with the
# allocator (on the CPU glibc keeps up to 64 MiB at the top of each thread's heap: 0.16-0.19 GiB retained after a
# tile of HART's 1024 px decode with 2 threads, docs/architecture.md §6).
DECODE_SLACK_BYTES = 256 * 2**20
TILINGS = ("auto", "on", "off")


class Family(ABC):
    """What a next-scale model family supplies; instances are stateless singletons in :data:`FAMILIES`."""

    name: str  # registry key, carried by every part ("infinity", "hart")
    label: str  # for messages ("Infinity", "HART")
    text_encoder_name: str  # the release's text encoder, named in pairing errors
    # Capabilities
    negative_prompt: bool  # a negative prompt replaces the unconditional branch
    has_tau: bool  # the sampler takes a logit temperature divisor
    can_skip: bool  # pruning may skip whole scales (docs/fastvar.md §3.7)
    pixel_budgets: tuple[str, ...] = ()  # the size classes schedule_for_* take as ``budget`` (empty: not listed)
    min_cache_scale = 0  # the earliest scale that can refill pruned tokens (it must hold a token map)
    attention_sublayer: str  # name of self-attention in the kept-token records (token maps)
    # Official sampling defaults; None for a knob the family does not have.
    defaults: dict[str, float | int | None]
    presets: PresetTable  # the pruning presets' numbers (docs/fastvar.md §4)
    # The dtypes its VAE may compute in, preferred first (a host picks one its device runs well, as ComfyUI's
    # ``vae_dtype(device, working_dtypes)``); float32 last, for devices without fast half precision.
    vae_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)

    # ---- parts ---------------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
                   operations=None, weight_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The transformer from the release's files; ``operations``: the layer namespace (fastvar_core.ops);
        ``weight_dtype``: the storage dtype of the namespace's Linear weights, converted straight from the file
        (None: ``dtype``), bit for bit what ``fastvar_core.ops.store_weights`` makes of a ``dtype`` load."""

    @abstractmethod
    def load_vae(self, path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 operations=None) -> torch.nn.Module:
        """The VAE (decoder) from the release's files, stored and computing in ``dtype`` (one of
        :attr:`vae_dtypes`, or what the user forces); ``operations`` as for :meth:`load_model`."""

    @abstractmethod
    def load_text_encoder(self, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                          device: torch.device, dtype: torch.dtype | None = None):
        """The text encoder; ``encode(prompts)`` gives this family's conditioning."""

    @abstractmethod
    def check_pair(self, model: torch.nn.Module, vae: torch.nn.Module) -> None:
        """IncompatibleModelsError when the VAE does not belong to the transformer."""

    def read_vae_config(self, path: str | os.PathLike):
        """The VAE's config read cheaply from its file (names and shapes, no weights), for
        :meth:`check_vae_config` before a long computation; None: the family has no such check."""
        return None

    def check_vae_config(self, model: torch.nn.Module, config) -> None:
        """IncompatibleModelsError when a VAE of ``config`` (:meth:`read_vae_config`) does not belong to the model."""

    @abstractmethod
    def text_width(self, model: torch.nn.Module) -> int:
        """Feature width the transformer expects from its text encoder."""

    has_default_vae = False  # True: default_vae finds the VAE beside the model files

    def default_vae(self, model_path: str | os.PathLike) -> Path:
        """Where the VAE sits when none is given (only when ``has_default_vae``)."""
        raise ConfigError(f"{self.label} has no default VAE location: pass the VAE")

    def sampler_needs_vae(self) -> bool:
        """True when sampling itself needs the VAE (HART's codebook); loaders then load it with the model."""
        return False

    def depth(self, model: torch.nn.Module) -> int:
        return model.config.depth

    def compute_dtype(self, model: torch.nn.Module) -> torch.dtype:
        """The dtype the transformer computes in (its own parameters', whatever its layers store)."""
        return model.dtype

    def decode_memory(self, vae: torch.nn.Module, latent_shape: tuple[int, ...],
                      tile: int | tuple[int, int] | None, banded: bool = False) -> int:
        """Peak activation bytes of decoding a latent of ``latent_shape`` (B, C, h, w) with tiles of ``tile``
        latent cells (square, or (rows, columns); None: whole), ``banded`` as vae_layout.takes_bands says for
        the decode's device and dtype; 0 when the family has no estimate."""
        return 0

    @abstractmethod
    def arch_spec(self, config, cond=None) -> ArchSpec:
        """The cost model's view of a transformer of this ``config`` (a loaded model's ``model.config``).

        ``cond``: the run's conditioning, when it changes the cost (Infinity's prompt length); None: the
        family's documented assumption, which the chart uses.
        """

    def detect_config(self, path: str | os.PathLike):
        """The model config of the release at ``path``, read cheaply (headers or memory-mapped shapes, no
        weights); None when it cannot be told without loading. The chart uses it to draw the connected model."""
        return None

    # ---- configs and random-weight models (the tools' benchmarks and demos) ------------------------
    def released_configs(self) -> dict[str, object]:
        """The released transformers' configs by name (e.g. "Infinity-2B")."""
        return {}

    def sizes(self, config) -> dict[str, int]:
        """A config's ``depth``, ``width``, ``heads`` and ``text_width`` (its text encoder's feature width)."""
        raise ConfigError(f"{self.label} has no sizes to report")

    def with_sizes(self, config, *, depth: int | None = None, width: int | None = None, heads: int | None = None,
                   text_width: int | None = None):
        """``config`` with the given :meth:`sizes` changed and what follows from them (FFN width...);
        ConfigError when they do not make a valid model."""
        raise ConfigError(f"{self.label} cannot resize a config")

    def random_model(self, config) -> torch.nn.Module:
        """A float32 CPU transformer of ``config`` with default random initialisation, eval mode, frozen."""
        raise ConfigError(f"{self.label} cannot build a random-weight model")

    def random_vae(self, config, base_width: int | None = None) -> torch.nn.Module:
        """A random-weight VAE of the release's layout for a transformer of ``config``; ``base_width``
        replaces the decoder's base width."""
        raise ConfigError(f"{self.label} cannot build a random-weight VAE")

    def random_text_encoder(self, depth: int | None = None):
        """The release's text encoder (transformers model and this family's encoding, no tokenizer) with default
        initialisation in float32, ``depth`` layers (None: the release's); built under ``torch.device("meta")``
        it holds no memory (the memory report)."""
        raise ConfigError(f"{self.label} cannot build a random-weight text encoder")

    def vae_upscale(self, vae) -> int:
        """Image pixels per latent cell along each side of ``vae``'s decoder."""
        raise ConfigError(f"{self.label} does not say how its VAE scales a latent")

    def random_conditioning(self, config, batch: int, tokens: int, generator: torch.Generator):
        """Random text features of ``tokens`` tokens per prompt, in this family's conditioning layout."""
        raise ConfigError(f"{self.label} cannot make a random conditioning")

    def to_compute_dtype(self, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """The transformer computing in ``dtype`` (a family may keep sensitive parameters in float32)."""
        return model.to(dtype)

    # ---- request -> schedule --------------------------------------------------------------------
    @abstractmethod
    def schedule_for_size(self, model, width: int | None, height: int | None, budget: str | None) -> ScaleSchedule:
        """Snap a requested size (None, None: square) and optional budget to the family's schedule."""

    @abstractmethod
    def schedule_for_template(self, model, aspect: float, budget: str) -> ScaleSchedule:
        """The schedule of an aspect template (h/w) and a pixel budget."""

    # ---- pruning and cost tables ---------------------------------------------------------------
    @abstractmethod
    def chart_models(self) -> dict[str, tuple[object, Callable[[], ScaleSchedule]]]:
        """Released models for the schedule chart: label -> (their model config, schedule factory)."""

    # ---- sampling ---------------------------------------------------------------------------------
    def sampler_top_k(self, top_k: int | None) -> int | None:
        """The sampler's top_k for a front door's value (None = the family's official default)."""
        return top_k

    @abstractmethod
    def run_sampler(self, model, vae, cond, schedule: ScaleSchedule, *, negative, knobs: dict, seed: int,
                    pruning, callback, hooks: SamplingHooks | None) -> SampleResult:
        """The family's scale loop; ``knobs`` holds only the guidance knobs given (cfg, tau, top_k, top_p)."""

    # ---- decoding ---------------------------------------------------------------------------------
    def decode_tile(self, vae, latent: torch.Tensor) -> int | None:
        """Tile size for the automatic rule: tiles when the latent exceeds the 1024 px one."""
        return TILE if max(latent.shape[-2:]) > TILE else None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (a third family registers itself like Infinity and HART do)."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str | Family) -> Family:
    """The registered family of this name (a Family passes through), or ConfigError."""
    if isinstance(name, Family):
        return name
    _load_builtin()
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} is unknown; allowed: {list(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> list[str]:
    _load_builtin()
    return list(FAMILIES)


def _load_builtin() -> None:
    if "infinity" not in FAMILIES or "hart" not in FAMILIES:
        from .hart import family as _hart  # noqa: F401  (registers itself)
        from .infinity import family as _infinity  # noqa: F401

        # Infinity, HART, then any other family: the order of menus and charts.
        others = {k: v for k, v in FAMILIES.items() if k not in ("infinity", "hart")}
        builtin = {k: FAMILIES[k] for k in ("infinity", "hart")}
        FAMILIES.clear()
        FAMILIES.update({**builtin, **others})


def load_parts(family: str | Family, model: str | os.PathLike, vae: str | os.PathLike | None = None,
               text_encoder: str | os.PathLike | None = None, *, tokenizer=None, device: torch.device,
               dtype: torch.dtype = torch.float32, text_dtype: torch.dtype | None = None):
    """(transformer, VAE, text encoder or None) of one release, checked to belong together."""
    fam = get_family(family)
    if vae is None and not fam.has_default_vae:
        raise ConfigError(f"a VAE is required for {fam.label} (--vae, or vae= of Pipeline.load)")
    net = fam.load_model(model, device=device, dtype=dtype)
    vae = vae if vae is not None else fam.default_vae(model)
    ae = fam.load_vae(vae, device=device)
    check_pair(fam, net, ae, f"model '{model}' and VAE '{vae}'")
    enc = None
    if text_encoder:
        enc = fam.load_text_encoder(text_encoder, tokenizer, device=device, dtype=text_dtype)
        check_text_encoder(fam, net, enc, f"text encoder '{text_encoder}'", f"the model '{model}'")
    return net, ae, enc


def check_pair(family: str | Family, model, vae, names: str = "") -> None:
    """The family's model/VAE check; its error names the two parts."""
    try:
        get_family(family).check_pair(model, vae)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"{names}: {exc}" if names else str(exc)) from None


def check_vae_file(family: str | Family, model, path: str | os.PathLike, names: str = "") -> None:
    """:func:`check_pair` against a VAE file not loaded yet, from its shapes only (no-op for a family without
    :meth:`Family.read_vae_config`)."""
    fam = get_family(family)
    config = fam.read_vae_config(path)
    if config is None:
        return
    try:
        fam.check_vae_config(model, config)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"{names}: {exc}" if names else str(exc)) from None


def check_text_encoder(family: str | Family, model, encoder, enc_name: str = "the text encoder",
                       model_name: str = "the model") -> None:
    """IncompatibleModelsError when the encoder's feature width is not the transformer's."""
    fam = get_family(family)
    width = fam.text_width(model)
    if encoder.width != width:
        raise IncompatibleModelsError(
            f"{enc_name} makes {encoder.width}-wide features, but {model_name} expects {width} "
            f"({fam.text_encoder_name}): use the text encoder of this model's release"
        )


def resolve_pruning(family: str | Family, pruning: PruningRequest | PruningConfig | None, schedule: ScaleSchedule,
                    config, cond=None) -> PruningConfig:
    """The validated plan for a run: a PruningRequest resolved, or a PruningConfig validated (None: off).

    ``config`` is the model's config (``model.config``); the one place where a plan is checked against a
    schedule and model, for the sampler and the chart alike.
    """
    fam = get_family(family)
    if pruning is None:
        return PruningConfig(name="off")
    arch = fam.arch_spec(config, cond)
    if isinstance(pruning, PruningRequest):
        return pruning.resolve(fam, list(schedule.scales), arch)
    return pruning.validate(schedule.num_scales, arch.depth, can_skip=fam.can_skip,
                            min_cache_scale=fam.min_cache_scale)


def _features(cond) -> torch.Tensor:
    """The feature tensor of a conditioning (Infinity's packed kv_compact, else ``context``)."""
    return cond.kv_compact if hasattr(cond, "kv_compact") else cond.context


def sampling_memory(family: str | Family, model, cond, schedule: ScaleSchedule, *, plan: PruningConfig | None = None,
                    batch: int = 1, score_matrices: bool = True,
                    device: torch.device | str | None = None) -> MemoryEstimate:
    """Working memory of :func:`sample` beside the weights: KV cache and peak activations of ``batch`` images
    (both CFG rows) running ``plan``, the pruning already resolved by :func:`resolve_pruning` (cost.sampling_memory;
    ``score_matrices``: attention scores held, as the math kernel does), on ``device`` (None: the model's; a
    head that runs in chunks does so on the CPU)."""
    fam = get_family(family)
    arch = replace(fam.arch_spec(model.config, cond), dtype_bytes=fam.compute_dtype(model).itemsize)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    return cost.sampling_memory(arch, list(schedule.scales), plan, batch=batch, score_matrices=score_matrices,
                                chunked_head=torch.device(device).type == "cpu")


def sample(family: str | Family, model, cond, schedule: ScaleSchedule, *, vae=None, negative=None,
           cfg=None, tau=None, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           pruning=None, callback: ProgressCallback | None = None,
           hooks: SamplingHooks | None = None) -> SampleResult:
    """Run a family's scale loop with the checks every front door shares.

    ``pruning`` is a PruningRequest, a PruningConfig or None (off), checked once by :func:`resolve_pruning`;
    None for a knob means the family's official default.
    A knob the family does not have (HART: tau) is ignored; a negative conditioning it cannot use is refused.
    ``hooks``: observers for tests and tools; ``SamplingHooks(record_kept=True)`` fills ``result.kept``.
    """
    fam = get_family(family)
    seed = check_seed(seed)
    if negative is not None and not fam.negative_prompt:
        raise ConfigError(f"{fam.label} has no negative prompt (its unconditional branch is an empty context)")
    for name, c in (("text conditioning", cond), ("negative text conditioning", negative)):
        if c is not None:
            check_finite(_features(c), name)
    pruning = resolve_pruning(fam, pruning, schedule, model.config, cond)
    knobs = dict(cfg=cfg, tau=tau if fam.has_tau else None, top_k=fam.sampler_top_k(top_k), top_p=top_p)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    result = fam.run_sampler(model, vae, cond, schedule, negative=negative, knobs=knobs, seed=seed, pruning=pruning,
                             callback=callback, hooks=hooks)
    check_finite(result.latent, "the sampled latent", NUMERIC_HINT)
    return result


def _tile_count(size: int, tile: int) -> int:
    """Tiles of ``tile`` cells sharing TILE_OVERLAP cells that cover ``size`` (as vae_layout.blend_spans lays them)."""
    return 1 if tile >= size else math.ceil((size - TILE_OVERLAP) / (tile - TILE_OVERLAP))


def _tile_lengths(size: int) -> list[int]:
    """Useful tile lengths along a side: the smallest that covers it in 1, 2, 3 ... tiles, down to MIN_TILE."""
    lengths, count = [size], 2
    while lengths[-1] > MIN_TILE:
        lengths.append(max(math.ceil((size + (count - 1) * TILE_OVERLAP) / count), MIN_TILE))
        count += 1
    return lengths


def decodes_in_bands(vae, device: torch.device | str) -> bool:
    """Whether ``vae`` decoding on ``device`` takes the banded CPU path (vae_layout.takes_bands; its compute
    dtype is its ``compute_anchor``'s, float32 for a VAE without one)."""
    anchor = getattr(vae, "compute_anchor", None)
    return takes_bands(torch.device(device), anchor.dtype if anchor is not None else torch.float32)


def fit_tile(family: str | Family, vae, latent_shape: tuple[int, ...], budget: int,
             banded: bool = False) -> tuple[int, int] | None:
    """The tile (rows, columns in latent cells; None: whole) whose predicted decode memory fits ``budget`` bytes.

    The whole latent when it fits; else, of the layouts whose tile fits, the one that decodes the fewest
    cells (tiles overlap by TILE_OVERLAP; on ties, the fewest tiles, then the widest): for a latent that just misses the
    budget, two strips rather than 2 x 2 squares. Tile sides are at least :data:`MIN_TILE` (or the whole
    side); when not even that fits, MIN_TILE x MIN_TILE (the decode then needs more than the budget).
    """
    fam = get_family(family)
    shape = tuple(latent_shape)
    if fam.decode_memory(vae, shape, None, banded) <= budget:
        return None
    h, w = shape[-2:]
    if max(h, w) <= MIN_TILE:
        return None  # nothing smaller to tile into
    best = None
    for th in _tile_lengths(h):
        for tw in _tile_lengths(w):
            if (th, tw) == (h, w) or fam.decode_memory(vae, shape, (th, tw), banded) > budget:
                continue
            count = _tile_count(h, th) * _tile_count(w, tw)
            key = (count * th * tw, count, -tw)  # ties: the wider tile (whole rows are contiguous slices)
            if best is None or key < best[0]:
                best = (key, (th, tw))
    return best[1] if best else (min(h, MIN_TILE), min(w, MIN_TILE))


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now: the driver's count on CUDA, the kernel's MemAvailable on the CPU (Linux);
    None where unknown (a decode's budget then comes from the sampler's estimate alone)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decode_budget(free: int | None, sampling: int | None) -> int | None:
    """The bytes a decode's tile must fit: what is ``free``, and no more than the working memory of sampling the
    same image unpruned (``sampling``), so that the decode never sets a run's peak above the unpruned sampler's
    (docs/architecture.md §6), less :data:`DECODE_SLACK_BYTES`. None when neither is known (the family's fixed
    rule then applies)."""
    known = [b for b in (free, sampling) if b is not None]
    return max(min(known) - DECODE_SLACK_BYTES, 0) if known else None


def sampled_decode_budget(family: str | Family, model, cond, schedule: ScaleSchedule, latent: torch.Tensor) -> int | None:
    """:func:`decode_budget` for ``latent``, sampled by ``model`` over ``schedule``: the memory free on the latent's
    device and the working memory of sampling it unpruned (fused attention; ``cond`` None: the family's
    assumption). The Pipeline's and the bench's "auto" decode; the Decode node takes ComfyUI's free memory."""
    unpruned = sampling_memory(family, model, cond, schedule, batch=latent.shape[0], score_matrices=False).total
    return decode_budget(free_memory(latent.device), unpruned)


def decode_tile(family: str | Family, vae, latent: torch.Tensor, tiling: str | int | None = "auto",
                budget: int | None = None, device: torch.device | str | None = None) -> int | tuple[int, int] | None:
    """The tile (latent cells, square or (rows, columns); None: whole) a decode with this ``tiling`` and
    ``budget`` uses on ``device`` (None: the latent's; see :func:`decode`)."""
    if tiling == "auto":
        if budget is not None:
            banded = decodes_in_bands(vae, latent.device if device is None else device)
            return fit_tile(family, vae, tuple(latent.shape), budget, banded)
        return get_family(family).decode_tile(vae, latent)
    if tiling == "on":
        return TILE
    if tiling in ("off", None):
        return None
    if isinstance(tiling, int) and not isinstance(tiling, bool) and tiling > 0:
        return tiling
    if (isinstance(tiling, tuple) and len(tiling) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in tiling)):
        return tiling
    raise ConfigError(f"tiling must be one of {list(TILINGS)}, a positive tile size or (rows, columns), "
                      f"got {tiling!r}")


def decode_memory(family: str | Family, vae, latent: torch.Tensor, tiling: str | int | None = "auto",
                  budget: int | None = None, device: torch.device | str | None = None) -> int:
    """Activation bytes :func:`decode` needs beside the VAE's weights on ``device`` (None: the latent's), at the
    tile size it will use."""
    device = latent.device if device is None else device
    tile = decode_tile(family, vae, latent, tiling, budget, device)
    return get_family(family).decode_memory(vae, tuple(latent.shape), tile, decodes_in_bands(vae, device))


def decode(family: str | Family, vae, latent: torch.Tensor, tiling: str | int | None = "auto",
           callback: Callable[[int, int], None] | None = None, budget: int | None = None) -> torch.Tensor:
    """(B, H, W, 3) float RGB in [0, 1] on the VAE's device.

    ``tiling``: "auto" tiles latents larger than the 1024 px one, or, given a ``budget`` of free bytes,
    as :func:`fit_tile` chooses; "on" always, "off" (or None) never, an int is the tile size in latent cells
    ((rows, columns): a rectangular tile).
    ``callback(done, total)`` runs after every decoded tile; raising from it (e.g. a Cancel) stops the decode there.
    """
    tile = decode_tile(family, vae, latent, tiling, budget)
    with torch.inference_mode():
        images = vae.to_image(latent, tile=tile, callback=callback).float()
    check_finite(images, "the decoded image", NUMERIC_HINT)
    return images
