"""The node pack's contract with ComfyUI, checked without ComfyUI (classic V1 nodes)."""

from __future__ import annotations

import sys
import types

import pytest
from pack import load_pack

PACK = load_pack()
MAPPINGS = PACK.NODE_CLASS_MAPPINGS
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_import_is_safe_without_comfyui():
    assert "folder_paths" not in sys.modules and "comfy" not in sys.modules
    assert PACK.WEB_DIRECTORY == "./web"


def test_every_node_class_is_registered_prefixed_and_displayed():
    defined = {
        cls for module in (PACK.nodes.loaders, PACK.nodes.generation) for cls in vars(module).values()
        if isinstance(cls, type) and cls.__module__ == module.__name__ and hasattr(cls, "INPUT_TYPES")
    }
    assert defined and defined == set(MAPPINGS.values()), "a node class is defined but not registered, or vice versa"
    for node_id, cls in MAPPINGS.items():
        assert node_id.startswith("FastVAR_")
        assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("FastVAR")
        assert cls.DESCRIPTION and len(cls.DESCRIPTION) > 30


@pytest.mark.parametrize("node_id", sorted(MAPPINGS))
def test_input_and_return_contract(node_id):
    cls = MAPPINGS[node_id]
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"} and "required" in types
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for section in ("required", "optional"):
        for name, (kind, options) in types.get(section, {}).items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, str) and kind not in WIDGETS:
                assert kind.startswith("FASTVAR_"), f"{node_id}.{name}: custom type {kind} lacks the pack prefix"
            if kind in ("INT", "FLOAT"):
                assert "min" in options and "max" in options and "step" in options or kind == "INT"
                assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name} default out of range"
            if isinstance(kind, list) and kind and "default" in options:
                assert options["default"] in kind
    for kind in cls.RETURN_TYPES:
        assert kind in ("IMAGE", "MASK", "STRING") or kind.startswith("FASTVAR_")


def test_sampler_latent_is_its_own_type():
    assert MAPPINGS["FastVAR_Sampler"].RETURN_TYPES[0] == "FASTVAR_LATENT"  # cannot reach a KSampler


def test_pruning_sliders():
    types = MAPPINGS["FastVAR_Pruning"].INPUT_TYPES()["required"]
    assert types["preset"][0] == ["off", "paper", "2k", "speed target", "custom", "fast"]
    for k in range(1, 7):
        options = types[f"last_{k}_drop"][1]
        assert (options["min"], options["max"], options["step"], options["display"]) == (0, 100, 5, "slider")


def _pruning_args(**over):
    args = {"preset": "custom", "speed_target": 2.0, "cache_from_end": 5, "first_layer": -1, "last_layer": -1,
            **{f"last_{k}_drop": 0 for k in range(1, 7)}}
    args.update(over)
    return args


def _build_error(**args):
    """The message building the Pruning node raises for these widget values (None: it builds)."""
    try:
        MAPPINGS["FastVAR_Pruning"]().build(chart_for="Infinity-2B 1024px", **args)
    except Exception as exc:  # noqa: BLE001 (the pack's ConfigError, imported under the pack's name)
        return str(exc)
    return None


def test_pruning_build_reports_the_engine_message():
    assert _build_error(**_pruning_args(last_1_drop=100, last_2_drop=50)) is None
    assert _build_error(**_pruning_args(last_5_drop=40, cache_from_end=4)) == (
        "cache scale 4 from the end must come before the earliest pruned scale (5 from the end); "
        "allowed: cache_from_end > 5")
    assert _build_error(**_pruning_args(first_layer=9, last_layer=3)) == (
        "the first pruned layer (9) comes after the last pruned layer (3): choose a first layer at most the last one")


def _comfy_errors(cls, inputs: dict) -> list[str]:
    """The errors ComfyUI's prompt validation (execution.validate_inputs) plus the node's run file for these
    widget values: a VALIDATE_INPUTS failure is filed once per input the function takes, a run error once."""
    import inspect

    errors = []
    check = getattr(cls, "VALIDATE_INPUTS", None)
    if check is not None:
        spec = inspect.getfullargspec(check)
        taken = {k: v for k, v in inputs.items() if k in spec.args or spec.varkw}
        found = check(**taken)
        if found is not True:
            return [f"{name} - {found}" for name in taken]  # the prompt is refused: the node never runs
    try:
        getattr(cls(), cls.FUNCTION)(**inputs)
    except Exception as exc:  # noqa: BLE001 (the pack's ConfigError, imported under the pack's name)
        errors.append(str(exc))
    return errors


def test_an_invalid_custom_schedule_is_reported_once():
    """Issue #15: the same error was shown 12 times, once per input of the Pruning node."""
    args = {**_pruning_args(last_5_drop=40, cache_from_end=4), "chart_for": "Infinity-2B 1024px"}
    assert _comfy_errors(MAPPINGS["FastVAR_Pruning"], args) == [
        "cache scale 4 from the end must come before the earliest pruned scale (5 from the end); "
        "allowed: cache_from_end > 5"]


def _core(name: str):
    return sys.modules[f"{PACK.__name__}.fastvar_core.{name}"]


def test_pruning_node_resolves_per_schedule():
    node = MAPPINGS["FastVAR_Pruning"]()
    (request,) = node.build(chart_for="Infinity-2B 1024px", **_pruning_args(preset="paper"))
    schedule = _core("schedules").infinity_schedule(0.5, "1M")
    config = _core("families").resolve_pruning("infinity", request, schedule, _core("infinity.config").INFINITY_2B)
    assert config.drop_ratios == {9: 0.4, 10: 0.5, 11: 1.0, 12: 1.0}  # non-square gets the paper acceleration too


@pytest.mark.parametrize("fault, message", [
    (dict(last_5_drop=40, cache_from_end=4), "cache scale 4 from the end must come before the earliest pruned scale"),
    (dict(first_layer=9, last_layer=3), "the first pruned layer (9) comes after the last pruned layer (3)"),
    (dict(preset="fastest"), "pruning mode 'fastest' is unknown"),
])
def test_an_invalid_request_gives_one_message_everywhere(fault, message):
    """Building the node's output and the chart give the same single message."""
    args = _pruning_args(**fault)
    found = _build_error(**args)
    assert isinstance(found, str) and found.startswith(message) and "\n" not in found
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    assert routes.chart_from_query({k: str(v) for k, v in args.items()}) == {"error": found}


def test_build_and_the_chart_share_one_request():
    node = MAPPINGS["FastVAR_Pruning"]
    args = _pruning_args(last_1_drop=50, last_2_drop=40)
    assert node().build(chart_for="Infinity-2B 1024px", **args)[0] is node.make_request(
        args.pop("preset"), args.pop("speed_target"), args.pop("cache_from_end"), args.pop("first_layer"),
        args.pop("last_layer"), **args)


def test_a_schedule_fault_is_reported_once_by_resolution(monkeypatch):
    """A request valid on its own but not for the schedule: it builds, resolution validates once."""
    node = MAPPINGS["FastVAR_Pruning"]
    args = _pruning_args(last_1_drop=50, cache_from_end=12)
    (request,) = node().build(chart_for="Infinity-2B 1024px", **args)
    config_cls = _core("pruning.config").PruningConfig
    calls = []
    original = config_cls.validate
    monkeypatch.setattr(config_cls, "validate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    families = _core("families")
    with pytest.raises(Exception, match="^cache_from_end = 12, but this schedule has only 7 scales"):
        families.resolve_pruning("infinity", request, _core("schedules").infinity_schedule(1.0, "0.06M"),
                                 _core("infinity.config").INFINITY_2B)
    assert calls == []  # refused before a plan exists
    families.resolve_pruning("infinity", node.make_request("paper", 2.0, 5, -1, -1),
                             _core("schedules").infinity_schedule(1.0, "1M"), _core("infinity.config").INFINITY_2B)
    assert calls == [1]


@pytest.mark.parametrize("label", ["Infinity-2B 1024px", "Infinity-2B 2K", "Infinity-8B 1024px", "HART-0.7B 1024px",
                                   "HART-0.7B 2K"])
@pytest.mark.parametrize("mode", ["paper", "fast", "speed target", "custom"])
def test_chart_predicts_the_speedup_of_the_plan_the_sampler_runs(label, mode):
    """The chart's speedup for a released config is the cost model's for the plan a run of that model and size gets."""
    import torch

    chart = sys.modules[PACK.__name__ + ".nodes.chart"]
    families, cost = _core("families"), _core("cost")
    family_name, model_config, make_schedule = chart.CHART_MODELS[label]
    family = families.get_family(family_name)
    request = MAPPINGS["FastVAR_Pruning"].make_request(mode, 2.5, 5, -1, -1, last_1_drop=75, last_2_drop=50)
    charted = chart.schedule_chart(label, request)
    if family_name == "infinity":
        builder, budget = _core("infinity.model").InfinityTransformer, "2K" if "2K" in label else "1M"
        cond = types.SimpleNamespace(max_seqlen=_core("infinity.family").CHART_TEXT_TOKENS)  # a prompt of that length
    else:
        builder, budget, cond = _core("hart.model").HARTTransformer, "2K" if "2K" in label else None, None
    with torch.device("meta"):
        model = builder(model_config)
    schedule = family.schedule_for_size(model, None, None, budget)  # what the sampler picks for a square image
    assert schedule.scales == make_schedule().scales
    plan = families.resolve_pruning(family, request, schedule, model.config, cond)
    assert charted["config"] == plan.to_dict()
    predicted = cost.predicted_speedup(family.arch_spec(model.config, cond), list(schedule.scales), plan)
    assert charted["speedup"] == pytest.approx(predicted, rel=1e-12)


def test_schedule_chart_data():
    chart = sys.modules[PACK.__name__ + ".nodes.chart"]
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    data = routes.chart_from_query({"preset": "paper", "chart_for": "Infinity-2B 1024px"})
    scales = data["scales"]
    assert [s["w"] for s in scales] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert [s["skipped"] for s in scales][-2:] == [True, True] and scales[8]["cache"]
    # scale 9 (32x32): layers 3..27 forward 615 tokens, the other 7 layers all 1024
    assert scales[9]["forwarded"] == pytest.approx((25 * 615 + 7 * 1024) / 32)
    assert 4.0 < data["speedup"] < 4.5
    hart = routes.chart_from_query({"preset": "paper", "chart_for": "HART-0.7B 1024px"})
    assert 1.8 < hart["speedup"] < 2.1
    hart_2k = routes.chart_from_query({"preset": "2k", "chart_for": "HART-0.7B 2K"})
    assert [s["w"] for s in hart_2k["scales"]][-3:] == [64, 91, 128] and hart_2k["scales"][12]["cache"]
    assert hart_2k["speedup"] > hart["speedup"]
    bad = routes.chart_from_query({"preset": "custom", "last_1_drop": "50", "cache_from_end": "1"})
    assert "cache scale 1 from the end" in bad["error"]
    assert "unknown chart model" in chart.schedule_chart("SDXL", None)["error"]


def test_folder_listing_and_resolution(tmp_path):
    compat = sys.modules[PACK.__name__ + ".nodes.compat"]
    (tmp_path / "infinity").mkdir()
    (tmp_path / "infinity" / "infinity_2b_reg.pth").write_bytes(b"x")
    shards = tmp_path / "infinity" / "infinity_8b_weights"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text("{}")
    (shards / "model-00001-of-00001.safetensors").write_bytes(b"x")
    (tmp_path / "text" / "flan-t5-xl").mkdir(parents=True)
    (tmp_path / "text" / "flan-t5-xl" / "config.json").write_text("{}")
    (tmp_path / "text" / "notes.txt").write_text("not a model")
    compat.set_model_dirs({"infinity": [tmp_path / "infinity"], "text_encoders": [tmp_path / "text"]})
    try:
        assert compat.list_entries(("infinity",), "file") == [
            "infinity_2b_reg.pth", "infinity_8b_weights/model-00001-of-00001.safetensors"]
        assert compat.list_entries(("infinity",), "dir") == ["infinity_8b_weights"]
        assert compat.list_entries(("text_encoders",), "dir") == ["flan-t5-xl"]
        assert compat.resolve(("infinity",), "infinity_8b_weights") == shards
        from fastvar_core.errors import CheckpointError

        with pytest.raises(Exception) as info:
            compat.resolve(("infinity",), "missing.pth")
        assert type(info.value).__name__ == CheckpointError.__name__
        assert "'missing.pth' was not found in the model folders ['infinity']" in str(info.value)
    finally:
        compat.set_model_dirs({})


def test_family_mismatch_is_a_clear_error():
    objects = sys.modules[PACK.__name__ + ".nodes.objects"]
    with pytest.raises(Exception, match="Decode: input 'latent' holds a latent made by Infinity, but 'vae' holds a VAE of HART"):
        objects.check_inputs("Decode", {"latent": ("infinity", "a latent made by {}"), "vae": ("hart", "a VAE of {}")})


def test_hart_sampler_sizes():
    from types import SimpleNamespace

    generation = sys.modules[PACK.__name__ + ".nodes.generation"]
    hart = SimpleNamespace(family="hart", module=SimpleNamespace(config=SimpleNamespace(
        patch_nums=[1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64])))
    pick = generation.pick_schedule
    assert pick(hart, 1024, 1024, "from width/height", "auto").final_size == (64, 64)
    assert pick(hart, 1440, 720, "from width/height", "auto").final_size == (45, 91)
    assert pick(hart, 1024, 1024, "2:1", "1M (1024px)").image_size == (720, 1456)
    assert pick(hart, 1024, 1024, "1:1", "2K (zero-shot)").image_size == (2048, 2048)
    with pytest.raises(Exception, match="pixel budget '0.25M' is not available for HART"):
        pick(hart, 512, 512, "1:1", "0.25M (512px)")


class Cancelled(Exception):
    """Stands in for ComfyUI's interrupt exception."""


def test_decode_reports_every_tile_and_cancel_stops_between_tiles(monkeypatch):
    """FastVAR Decode: progress after each tile, and Cancel (the interrupt check) stops the tiled decode."""
    from pathlib import Path

    import torch
    from conftest import PARITY

    from fastvar_core.infinity.vae import load_infinity_vae

    generation = sys.modules[PACK.__name__ + ".nodes.generation"]
    objects = sys.modules[PACK.__name__ + ".nodes.objects"]
    compat = sys.modules[PACK.__name__ + ".nodes.compat"]
    vae_module = pack_copy(load_infinity_vae)(Path(PARITY / "infinity" / "checkpoints" / "infinity_vae_d32_tiny.pth"))
    latent = torch.randint(0, 2, (1, 32, 24, 24)).float() * 2 - 1
    vae = objects.Part("infinity", vae_module, "tiny", compat.patcher(vae_module, compat.VAE))
    made = objects.Latent("infinity", types.SimpleNamespace(latent=latent))

    seen, checks = [], []
    monkeypatch.setattr(compat.Progress, "update", lambda self, step, preview=None, total=None: seen.append((step, total)))
    monkeypatch.setattr(compat, "check_interrupt", lambda: checks.append(len(seen)))
    (image,) = generation.FastVARDecode().decode(vae, made, "off")
    assert seen == [(1, 1)] and image.shape == (1, 384, 384, 3)
    seen.clear()
    tiled = generation.families.decode("infinity", vae_module, latent, 12, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 9) for k in range(1, 10)]  # 3 x 3 tiles of 12 with overlap 6 over 24 positions
    assert (tiled - image).abs().mean() < 0.05

    def cancel_after_two():
        if len(seen) >= 2:
            raise Cancelled

    seen.clear()
    monkeypatch.setattr(generation.families, "decode", _with_tile(generation.families.decode, 12))
    monkeypatch.setattr(compat, "check_interrupt", cancel_after_two)
    with pytest.raises(Cancelled):
        generation.FastVARDecode().decode(vae, made, "on")
    assert seen == [(1, 9), (2, 9)]  # stopped after the second of nine tiles


def _with_tile(decode, tile):
    def run(family, vae, latent, tiling, callback=None):
        return decode(family, vae, latent, tile if tiling == "on" else tiling, callback=callback)

    return run


def pack_copy(function):
    """The same function from the pack's own copy of fastvar_core (the nodes import that copy)."""
    module = sys.modules[PACK.__name__ + "." + function.__module__]
    return getattr(module, function.__name__)


@pytest.mark.parametrize("node_id, name", [("FastVAR_Pruning", "first_layer"), ("FastVAR_Pruning", "last_layer"),
                                           ("FastVAR_TokenMap", "layer")])
def test_layer_widgets_span_the_released_models(node_id, name):
    """Issue #15: the layer widgets went to 128 and clamped silently; they span the deepest release (Infinity-8B,
    40 layers) and say each model's range."""
    options = MAPPINGS[node_id].INPUT_TYPES()["required"][name][1]
    assert (options["min"], options["max"], options["default"]) == (-1, 39, -1)
    assert "Layers of each model: Infinity-2B 0-31, Infinity-8B 0-39, HART-0.7B 0-23" in options["tooltip"]
