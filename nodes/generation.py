"""Text encoding, FastVAR pruning, the scale-loop sampler, decoding and token maps."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from ..fastvar_core import families
from ..fastvar_core.errors import ConfigError
from ..fastvar_core.families import get_family
from ..fastvar_core.memory import summary as memory_summary
from ..fastvar_core.memory import tensor_bytes
from ..fastvar_core.pruning_request import MODES, SPEED_TARGET_RANGE, PruningRequest
from ..fastvar_core.sampling import SamplingHooks

from . import compat
from .chart import CHART_MODELS
from .objects import CONDITIONING, LATENT, MODEL, PRUNING, TEXT_ENCODER, VAE, Conditioning, Latent, check_inputs
from .wiring import check_decode_vae, feeds_token_map

MAX_SEED = 0xFFFFFFFFFFFFFFFF


class TextEncode:
    DESCRIPTION = ("Encodes a prompt (and an optional negative prompt) with the connected text encoder, for the "
                   "model family of that encoder (T5 for Infinity, Qwen2 for HART).")
    CATEGORY = "FastVAR"
    RETURN_TYPES = (CONDITIONING, CONDITIONING)
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "From Load T5 Text Encoder (Infinity) or Load Qwen2 Text Encoder (HART)."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "", "tooltip": "What the image shows."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Infinity only: what to steer away from. Empty: the model's learned unconditional text."}),
        }}

    def encode(self, text_encoder, prompt, negative_prompt):
        family = get_family(text_encoder.family)
        if not family.negative_prompt and negative_prompt.strip():
            raise ConfigError(f"{family.label} has no negative prompt (its unconditional branch is an empty context): "
                              f"clear it")
        enc = text_encoder.module
        count = 2 if negative_prompt.strip() else 1
        compat.load_models([text_encoder.patcher], enc.working_memory(count), full=True)
        with torch.inference_mode():
            cond = enc.encode([prompt]).to("cpu")
            neg = enc.encode([negative_prompt]).to("cpu") if negative_prompt.strip() else None
        return (Conditioning(text_encoder.family, cond, [prompt]), Conditioning(text_encoder.family, neg, [negative_prompt]))


# Late-scale sliders of the Pruning node, counted from the last scale (1 = the last).
TAIL_SLIDERS = 6


def _released_layers() -> dict[str, int]:
    """Depth of every released model, by name (for the layer widgets' range and tooltips)."""
    return {name: get_family(f).sizes(config)["depth"] for f in families.family_names()
            for name, config in get_family(f).released_configs().items()}


def _layer_widget(tooltip: str) -> tuple:
    depths = _released_layers()
    ranges = ", ".join(f"{name} 0-{d - 1}" for name, d in depths.items())
    return ("INT", {"default": -1, "min": -1, "max": max(depths.values()) - 1,
                    "tooltip": f"{tooltip} Layers of each model: {ranges}; checked against the connected model."})


class FastVARPruning:
    DESCRIPTION = ("FastVAR cached token pruning (ICCV 2025): at the late, large scales only the most distinct "
                   "tokens go through attention and FFN; the rest are refilled from an earlier scale's cached output. "
                   "'paper' is the official setting: the paper measured 2.7x faster generation on Infinity-2B and "
                   "1.5x on HART at 1024 px. 100 % on a scale skips it. The chart draws the plan for the connected "
                   "sampler's model and size; its number is the cost model's prediction of how many fewer transformer "
                   "FLOPs run (higher than a measured speedup, which also counts VAE decoding and overheads).")
    CATEGORY = "FastVAR"
    RETURN_TYPES = (PRUNING,)
    RETURN_NAMES = ("pruning",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        ratio = {"default": 0, "min": 0, "max": 100, "step": 5, "display": "slider"}
        sliders = {
            f"last_{k}_drop": ("INT", {**ratio, "tooltip": f"custom only: % of tokens dropped at the {_ordinal(k)} scale "
                                                          f"from the end (100 = skip that scale)."})
            for k in range(1, TAIL_SLIDERS + 1)
        }
        return {"required": {
            "preset": (list(MODES), {"default": "paper", "tooltip": "off: no pruning. paper: the official FastVAR setting. 2k: for the zero-shot 2K schedule. speed target: ratios chosen by the cost model. custom: the sliders below. fast: paper (2k on 2K schedules) plus two accelerations beyond the paper: no unconditional CFG branch at the last two scales and half the KV cache of the two scales before (trades some guidance fidelity for speed)."}),
            "speed_target": ("FLOAT", {"default": SPEED_TARGET_DEFAULT, "min": SPEED_TARGET_RANGE[0], "max": SPEED_TARGET_RANGE[1], "step": 0.1, "tooltip": "speed target only: desired reduction of the transformer's FLOPs (cost model); the latest scales are pruned first."}),
            **sliders,
            "cache_from_end": ("INT", {"default": CACHE_FROM_END_DEFAULT, "min": 2, "max": 12, "tooltip": "custom only: which scale (counted from the end) refills the pruned tokens; must come before every pruned scale."}),
            "first_layer": _layer_widget("First transformer layer that prunes; -1 = the family's default (Infinity 3, HART 0)."),
            "last_layer": _layer_widget("Last transformer layer that prunes; -1 = the family's default (Infinity-2B 27, HART all)."),
        }, "optional": {
            # Display only: the frontend keeps it out of the prompt, so changing it never re-runs the sampler.
            "chart_for": ([CHART_CONNECTED, *CHART_MODELS], {"default": CHART_CONNECTED, "tooltip": "Only for the schedule chart on this node: the connected sampler's model and size, or a released model at its square size. The sampler always applies the pruning to its own model and size."}),
        }}

    @classmethod
    def make_request(cls, preset, speed_target, cache_from_end, first_layer, last_layer, **sliders) -> PruningRequest:
        """The request of the widget values (checked as it is built: ConfigError). Widgets the preset ignores
        are replaced by their defaults first, so moving one gives the very same request."""
        ignored = ignored_widgets(preset)
        if "speed_target" in ignored:
            speed_target = SPEED_TARGET_DEFAULT
        if "cache_from_end" in ignored:
            cache_from_end = CACHE_FROM_END_DEFAULT
        if "first_layer" in ignored:
            first_layer = last_layer = -1
        tail = tuple(0 if f"last_{k}_drop" in ignored else sliders.get(f"last_{k}_drop", 0)
                     for k in range(1, TAIL_SLIDERS + 1))
        return cls._request(preset, speed_target, cache_from_end, first_layer, last_layer, tail)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _request(preset, speed_target, cache_from_end, first_layer, last_layer, tail) -> PruningRequest:
        # Cached, so the chart and build share one request per set of values.
        return PruningRequest(
            mode=preset, tail_drop_ratios=tuple(t / 100 for t in tail), cache_from_end=cache_from_end,
            speed_target=speed_target, layer_start=None if first_layer < 0 else first_layer,
            layer_stop=None if last_layer < 0 else last_layer + 1,
        )

    # No VALIDATE_INPUTS: ComfyUI repeats its message once per input it takes (12 times for these widgets).
    # build checks the request when the node runs, before the sampler, and reports it once; the chart shows the
    # same message while the artist edits.
    def build(self, preset, speed_target, cache_from_end, first_layer, last_layer, chart_for=None, **sliders):
        # chart_for only chooses what the chart draws: it never reaches the request.
        return (self.make_request(preset, speed_target, cache_from_end, first_layer, last_layer, **sliders),)


SPEED_TARGET_DEFAULT = 2.0
CACHE_FROM_END_DEFAULT = 5
CHART_CONNECTED = "the connected sampler"


def ignored_widgets(preset: str) -> tuple[str, ...]:
    """The Pruning node's widgets that ``preset`` does not read (the frontend greys them and sends defaults)."""
    tail = tuple(f"last_{k}_drop" for k in range(1, TAIL_SLIDERS + 1))
    if preset == "custom":
        return ("speed_target",)
    ignored = ("speed_target",) if preset != "speed target" else ()
    ignored += (*tail, "cache_from_end")
    if preset == "off":
        ignored += ("first_layer", "last_layer")
    return ignored


def _ordinal(k: int) -> str:
    return {1: "last", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


# Aspect ratios offered by the sampler: label -> Infinity template (h/w). 16:9 and 9:16 have no template of their
# own: they run the nearest one, 7:4 and 4:7 (the node shows the resulting width and height).
ASPECTS = {"1:1": 1.0, "4:5": 1.25, "5:4": 0.8, "3:4": 1.333, "4:3": 0.75, "2:3": 1.5, "3:2": 0.666, "4:7": 1.75,
           "7:4": 0.571, "16:9 (runs 7:4)": 0.571, "9:16 (runs 4:7)": 1.75, "1:2": 2.0, "2:1": 0.5, "2:5": 2.5,
           "5:2": 0.4, "1:3": 3.0, "3:1": 0.333}
BUDGETS = {"auto": None, "0.06M (256px)": "0.06M", "0.25M (512px)": "0.25M", "0.60M (768px)": "0.60M",
           "1M (1024px)": "1M", "2K (zero-shot)": "2K"}


def pick_schedule(model, width, height, aspect_ratio, pixel_budget):
    """The sampler's schedule from its size widgets, through the model's Family."""
    family = get_family(model.family)
    budget = BUDGETS[pixel_budget]
    if aspect_ratio == "from width/height":
        return family.schedule_for_size(model.module, width, height, budget)
    if budget is None:
        return family.schedule_for_size(model.module, *_size_for_aspect(aspect_ratio, width, height), None)
    return family.schedule_for_template(model.module, ASPECTS[aspect_ratio], budget)


def _size_for_aspect(aspect: str, width: int, height: int) -> tuple[int, int]:
    ratio = ASPECTS[aspect]
    area = width * height
    return round((area / ratio) ** 0.5), round((area * ratio) ** 0.5)


class FastVARSampler:
    DESCRIPTION = ("Generates an image latent scale by scale (next-scale prediction) with optional FastVAR pruning. "
                   "The size snaps to the nearest official template; the info output says what ran and how long it took.")
    CATEGORY = "FastVAR"
    RETURN_TYPES = (LATENT, "STRING")
    RETURN_NAMES = ("latent", "info")
    FUNCTION = "sample"
    # ComfyUI re-sends a cached node's UI (the run info box) only for output nodes: without this a page opened
    # after the run shows an empty box when the queue is served from the cache.
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load Infinity Model or Load HART Model."}),
                "positive": (CONDITIONING, {"tooltip": "From FastVAR Text Encode."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": "Same seed, same settings: the same image."}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16, "tooltip": "Requested width; snapped to the nearest aspect template and size class (HART: 1024 class or 2K)."}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16, "tooltip": "Requested height; snapped like the width."}),
                "aspect_ratio": (["from width/height", *ASPECTS], {"default": "from width/height", "tooltip": "Width:height template; 'from width/height' picks the nearest one. Choosing one sets width and height to the size it runs."}),
                "pixel_budget": (list(BUDGETS), {"default": "auto", "tooltip": "Image size class; auto picks the closest to width x height. 2K is zero-shot (beyond the trained sizes)."}),
                "cfg": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 20.0, "step": 0.1, "round": 0.01, "tooltip": "Classifier-free guidance. Infinity: 3-4; HART: 4.5 (ramped up over the scales as upstream does)."}),
                "tau": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 2.0, "step": 0.05, "tooltip": "Logit temperature divisor (official 0.5 for Infinity-2B, 1.0 for 8B); greyed when the connected model has none."}),
                "top_k": ("INT", {"default": 900, "min": 0, "max": 10000, "tooltip": "Keep the k most likely tokens (0 = off). Infinity: 900 (no effect on bits). HART: official 600/300 per scale when set to 900 or 0."}),
                "top_p": ("FLOAT", {"default": 0.97, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Nucleus sampling (0 = off). Infinity: 0.97; HART upstream: off."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Images generated together from the same prompt."}),
            },
            "optional": {
                "negative": (CONDITIONING, {"tooltip": "Negative conditioning (Infinity)."}),
                "pruning": (PRUNING, {"tooltip": "From FastVAR Pruning; not connected = no pruning."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, positive, seed, width, height, aspect_ratio, pixel_budget, cfg, tau, top_k, top_p,
               batch_size, negative=None, pruning=None, prompt=None, unique_id=None):
        from ..fastvar_core import attention

        from ..fastvar_core.pipeline import check_batch

        check_batch(batch_size)
        conds = {"positive": positive} | ({"negative": negative} if negative is not None else {})
        check_inputs("FastVAR Sampler", {"model": (model.family, "a model of {}")} | {
            name: (c.family, "{} conditioning (from its text encoder, " + get_family(c.family).text_encoder_name + ")")
            for name, c in conds.items()})
        check_decode_vae(prompt, unique_id, model)
        family = get_family(model.family)
        schedule = pick_schedule(model, width, height, aspect_ratio, pixel_budget)
        cond = positive.value.repeat(batch_size) if batch_size > 1 else positive.value
        neg = None
        if negative is not None and negative.value is not None:
            neg = negative.value.repeat(batch_size) if batch_size > 1 else negative.value
        progress = compat.Progress(schedule.num_scales)

        def callback(step, total, preview):
            compat.check_interrupt()
            progress.update(step, preview()[0], total)

        parts = [model] + ([model.companion] if model.companion is not None else [])
        plan = families.resolve_pruning(family, pruning, schedule, model.module.config, cond)  # resolved once
        scores = model.attention == "math"  # fused kernels hold no score matrices
        load_device = model.patcher.load_device  # where it will run (the module may sit on the offload device now)
        need = families.sampling_memory(family, model.module, cond, schedule, plan=plan, batch=batch_size,
                                        score_matrices=scores, device=load_device)
        unpruned = families.sampling_memory(family, model.module, cond, schedule, batch=batch_size,
                                            score_matrices=scores, device=load_device).total  # the decode stays below it
        weights = sum(tensor_bytes(p.module) for p in parts)

        def run(hooks, callback=None):
            device = compat.load_models([p.patcher for p in parts], need.total)
            with attention.use_backend(model.attention), torch.inference_mode():
                result = families.sample(family, model.module, cond.to(device), schedule,
                                         vae=model.companion.module if model.companion is not None else None,
                                         negative=neg.to(device) if neg is not None else None, cfg=cfg, tau=tau,
                                         top_k=top_k, top_p=top_p, seed=seed, pruning=plan, callback=callback,
                                         hooks=hooks)
            result.latent = result.latent.to(compat.intermediate_device())
            return result

        record = feeds_token_map(prompt, unique_id)  # kept tokens cost a device sync per pruned layer
        start = time.perf_counter()
        result = run(SamplingHooks(record_kept=True) if record else None, callback)
        seconds = time.perf_counter() - start
        h, w = schedule.image_size
        info = (f"{model.family} {w}x{h} ({schedule.num_scales} scales), pruning {result.pruning.name}, "
                f"sampling {seconds:.2f}s, seed {seed}\n{memory_summary(weights, need.total)}")
        if plan.note:  # e.g. a speed target out of reach: say what was reached and why
            compat.log.warning("FastVAR: %s", plan.note)
            info += f"\n{plan.note}"
        # A Token Map added after this run was cached gets a latent without records: it runs it again, recording.
        rerun = None if record else functools.partial(run, SamplingHooks(record_kept=True))
        latent = Latent(model.family, result, info, rerun, model.module, sampling_bytes=unpruned)
        return {"ui": {"fastvar_info": [info]}, "result": (latent, info)}


class FastVARDecode:
    DESCRIPTION = "Decodes a FastVAR latent to an image with the family's VAE; large images decode in tiles."
    CATEGORY = "FastVAR"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "From Load Infinity VAE or Load HART VAE."}),
            "latent": (LATENT, {"tooltip": "From FastVAR Sampler."}),
            "tiling": (["auto", "on", "off"], {"default": "auto", "tooltip": "auto: decodes whole when it fits in free memory and in what sampling this image unpruned needs (so the decode is never the run's memory peak), else in the largest tiles that fit (a small cost in accuracy)."}),
        }}

    def decode(self, vae, latent, tiling):
        check_inputs("FastVAR Decode", {"latent": (latent.family, "a latent made by {}"), "vae": (vae.family, "a VAE of {}")})
        if latent.model is not None:
            families.check_pair(latent.family, latent.model, vae.module, "FastVAR Decode's input 'vae'")
        progress = compat.Progress(1)

        def callback(done, total):  # after every tile: progress, and Cancel stops between tiles
            progress.update(done, None, total)
            compat.check_interrupt()

        compat.check_interrupt()
        # "auto": the largest tile that fits what is free now, and never more than unpruned sampling needed
        need = families.decode_memory(latent.family, vae.module, latent.result.latent, tiling, latent.sampling_bytes,
                                      vae.patcher.load_device)
        device = compat.load_models([vae.patcher], need)
        budget = families.decode_budget(compat.free_memory(device), latent.sampling_bytes)
        image = families.decode(latent.family, vae.module, latent.result.latent.to(device), tiling, callback=callback,
                                budget=budget)
        return (image.to(compat.intermediate_device()),)


class FastVARTokenMap:
    DESCRIPTION = ("Shows which tokens FastVAR kept (white) and pruned (black) at every pruned scale of a run, "
                   "like the paper's Fig. 7, scaled to the image size.")
    CATEGORY = "FastVAR"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("token_maps", "mask")
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": (LATENT, {"tooltip": "From FastVAR Sampler (a run with pruning)."}),
            "layer": _layer_widget("-1: grey level = share of pruned layers that kept the token; n: exactly what layer n kept."),
            "sublayer": (["all", "attention", "cross-attention", "ffn"], {"default": "all", "tooltip": "Which sub-layer's selection to show."}),
            "sample_index": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "Which image of the batch."}),
        }}

    def render(self, latent, layer, sublayer, sample_index):
        if not latent.result.kept and latent.rerun is not None and latent.result.pruning.drop_ratios:
            latent.result = latent.rerun()  # the sampler ran before this node was added: run it again, recording
            latent.rerun = None
        result = latent.result
        names = {"all": None, "attention": get_family(latent.family).attention_sublayer, "cross-attention": "ca",
                 "ffn": "ffn"}
        scales = sorted({s for (s, _, _) in result.kept})
        if not scales:
            raise ConfigError("this image was made without pruning, so there are no token maps to show: connect a "
                              "FastVAR Pruning node with a preset other than 'off' to the sampler and queue again")
        first, stop = result.pruning.layers
        if layer >= 0 and not result.pruning.prunes_layer(layer):
            raise ConfigError(f"layer {layer} did not prune in this run (it pruned layers {first} to {stop - 1}): "
                              f"set 'layer' to one of those, or -1 for all of them")
        h, w = result.schedule.image_size
        maps = []
        for s in scales:
            mask = result.kept_mask(s, None if layer < 0 else layer, names[sublayer])  # (B, h_s, w_s)
            row = mask[min(sample_index, mask.shape[0] - 1)][None, None]
            maps.append(F.interpolate(row, size=(h, w), mode="nearest")[0, 0])
        masks = torch.stack(maps)  # (S, H, W)
        return (masks[..., None].expand(-1, -1, -1, 3).contiguous(), masks)
