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


# Tiled against untiled decode, images in [0, 1] (docs/architecture.md, Decoding).
TILED_MAX_DIFF, TILED_MEAN_DIFF = 0.1, 0.01  # measured 0.044 / 0.0056


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


def test_decode_auto_tiles_to_fit_comfyuis_free_memory(monkeypatch):
    """FastVAR Decode "auto": ComfyUI's free memory on the VAE's device picks the tile, capped by the unpruned
    sampler's working memory; outside ComfyUI the rule."""
    from pathlib import Path

    import torch
    from conftest import PARITY

    from fastvar_core.infinity.vae import load_infinity_vae

    generation = sys.modules[PACK.__name__ + ".nodes.generation"]
    objects = sys.modules[PACK.__name__ + ".nodes.objects"]
    compat = sys.modules[PACK.__name__ + ".nodes.compat"]
    vae_module = pack_copy(load_infinity_vae)(Path(PARITY / "infinity" / "checkpoints" / "infinity_vae_d32_tiny.pth"))
    latent = torch.randint(0, 2, (1, 32, 40, 40)).float() * 2 - 1
    vae = objects.Part("infinity", vae_module, "tiny", compat.patcher(vae_module, compat.VAE))
    made = objects.Latent("infinity", types.SimpleNamespace(latent=latent))
    seen, asked = [], []
    monkeypatch.setattr(compat.Progress, "update", lambda self, step, preview=None, total=None: seen.append((step, total)))
    monkeypatch.setattr(compat, "free_memory", lambda device: asked.append(device) or free)
    images = []
    for free, tiles in ((None, 1), (10**12, 1), (0, 4)):  # 0 bytes: 32-cell tiles, 2 x 2 over 40 cells
        seen.clear()
        (image,) = generation.FastVARDecode().decode(vae, made, "auto")
        assert image.shape == (1, 640, 640, 3) and seen[-1] == (tiles, tiles)
        images.append(image)
    assert asked == [torch.device("cpu")] * 3
    assert torch.equal(images[0], images[1])
    # the latent carries what sampling it unpruned needed: the decode never asks for more, however much is free
    for free, sampling, tiles in ((10**12, 0, 4), (0, 10**12, 4), (10**12, 10**12, 1)):
        seen.clear()
        capped = objects.Latent("infinity", types.SimpleNamespace(latent=latent), sampling_bytes=sampling)
        generation.FastVARDecode().decode(vae, capped, "auto")
        assert seen[-1] == (tiles, tiles), (free, sampling)
    diff = (images[2] - images[0]).abs()  # the tiled decode within the tolerance docs/architecture.md states
    assert diff.max().item() <= TILED_MAX_DIFF and diff.mean().item() <= TILED_MEAN_DIFF


def _with_tile(decode, tile):
    def run(family, vae, latent, tiling, callback=None, budget=None):
        return decode(family, vae, latent, tile if tiling == "on" else tiling, callback=callback, budget=budget)

    return run


def pack_copy(function):
    """The same function from the pack's own copy of fastvar_core (the nodes import that copy)."""
    module = sys.modules[PACK.__name__ + "." + function.__module__]
    return getattr(module, function.__name__)


def test_chart_selector_is_optional_display_only():
    """chart_for is optional (the frontend keeps it out of the prompt); old saved values are still accepted and
    never reach the request."""
    node = MAPPINGS["FastVAR_Pruning"]
    types_ = node.INPUT_TYPES()
    assert "chart_for" not in types_["required"]
    choices, options = types_["optional"]["chart_for"]
    assert choices[0] == options["default"] == "the connected sampler" and "Infinity-8B 1024px" in choices
    args = _pruning_args(preset="paper")
    (with_old,) = node().build(chart_for="Infinity-8B 1024px", **args)
    (without,) = node().build(**args)
    assert with_old is without


@pytest.mark.parametrize("preset, moved", [
    ("paper", dict(last_1_drop=35, last_4_drop=80, cache_from_end=9, speed_target=7.5)),
    ("2k", dict(last_6_drop=10)),
    ("fast", dict(cache_from_end=3)),
    ("speed target", dict(last_2_drop=55, cache_from_end=2)),
    ("custom", dict(speed_target=9.0)),
    ("off", dict(first_layer=4, last_layer=9, last_1_drop=50)),
])
def test_a_slider_the_preset_ignores_changes_nothing_the_sampler_gets(preset, moved):
    """Moving a widget the preset ignores gives the same request object, hence the same plan for the sampler."""
    node = MAPPINGS["FastVAR_Pruning"]
    generation = sys.modules[PACK.__name__ + ".nodes.generation"]
    assert set(moved) <= set(generation.ignored_widgets(preset))
    (before,) = node().build(**_pruning_args(preset=preset))
    (after,) = node().build(**_pruning_args(preset=preset, **moved))
    assert after is before
    families, schedules = _core("families"), _core("schedules")
    for schedule in (schedules.infinity_schedule(1.0, "1M"), schedules.infinity_schedule(0.5, "2K")):
        plans = [families.resolve_pruning("infinity", r, schedule, _core("infinity.config").INFINITY_2B)
                 for r in (before, after)]
        assert plans[0].to_dict() == plans[1].to_dict()


def test_a_slider_the_preset_reads_still_changes_the_request():
    node = MAPPINGS["FastVAR_Pruning"]
    assert node().build(**_pruning_args(preset="custom", last_1_drop=50))[0] != node().build(
        **_pruning_args(preset="custom", last_1_drop=55))[0]
    assert node().build(**_pruning_args(preset="speed target", speed_target=3.0))[0].speed_target == 3.0
    assert node().build(**_pruning_args(preset="paper", first_layer=5))[0].layer_start == 5


def test_chart_reports_what_the_preset_uses_per_scale():
    """Under a preset the chart says which widgets are ignored and the values the preset uses instead."""
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    data = routes.chart_from_query({"preset": "paper", "chart_for": "Infinity-2B 1024px", "last_1_drop": "30"})
    assert data["uses"] == {"drop_from_end": {1: 100, 2: 100, 3: 50, 4: 40}, "cache_from_end": 5}
    assert {"last_1_drop", "cache_from_end", "speed_target"} <= set(data["ignored"])
    assert "first_layer" not in data["ignored"]
    hart = routes.chart_from_query({"preset": "2k", "chart_for": "HART-0.7B 2K"})
    assert hart["uses"] == {"drop_from_end": {1: 75, 2: 50, 3: 50}, "cache_from_end": 4}
    custom = routes.chart_from_query({"preset": "custom", "last_2_drop": "40", "cache_from_end": "4",
                                      "chart_for": "Infinity-2B 1024px"})
    assert custom["ignored"] == ["speed_target"]


def test_greyed_widgets_show_what_the_preset_uses_not_their_own_value():
    """An ignored widget's label names what the preset runs instead of the slider's own (unread) value."""
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    data = routes.chart_from_query({"preset": "paper", "chart_for": "Infinity-2B 1024px", "last_1_drop": "30",
                                    "last_5_drop": "35"})
    assert data["ignored_labels"] == {
        "speed_target": "speed_target: paper uses its own ratios",
        "last_1_drop": "last_1_drop: paper skips this scale", "last_2_drop": "last_2_drop: paper skips this scale",
        "last_3_drop": "last_3_drop: paper uses 50 %", "last_4_drop": "last_4_drop: paper uses 40 %",
        "last_5_drop": "last_5_drop: paper uses 0 %", "last_6_drop": "last_6_drop: paper uses 0 %",
        "cache_from_end": "cache_from_end: paper uses 5"}
    off = routes.chart_from_query({"preset": "off", "chart_for": "Infinity-2B 1024px"})["ignored_labels"]
    assert off["first_layer"] == "first_layer: off prunes nothing"
    assert off["last_3_drop"] == "last_3_drop: off prunes nothing"
    custom = routes.chart_from_query({"preset": "custom", "chart_for": "Infinity-2B 1024px"})["ignored_labels"]
    assert custom == {"speed_target": "speed_target: custom uses the sliders"}
    target = routes.chart_from_query({"preset": "speed target", "speed_target": "3", "chart_for": "Infinity-2B 1024px"})
    assert "speed_target" not in target["ignored_labels"]
    assert target["ignored_labels"]["cache_from_end"].startswith("cache_from_end: speed target ")


def test_chart_says_when_the_speed_target_is_out_of_reach():
    """Issue #15 item 6: the chart, like the sampler's info, says what an unreachable speed target reached."""
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    short = routes.chart_from_query({"preset": "speed target", "speed_target": "9.5", "chart_for": "HART-0.7B 1024px"})
    assert short["note"].startswith(f"speed target 9.5x is out of reach: reached {short['speedup']:.2f}x")
    reached = routes.chart_from_query({"preset": "speed target", "speed_target": "3", "chart_for": "Infinity-2B 1024px"})
    assert reached["note"] == "" and reached["speedup"] >= 3


def test_ui_facts_come_from_the_families():
    """The frontend greys tau and the negative prompt and offers the pixel budgets from each loader's Family."""
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    facts = routes.ui_facts()
    hart, infinity = facts["loaders"]["FastVAR_LoadHARTModel"], facts["loaders"]["FastVAR_LoadInfinityModel"]
    assert hart == {"label": "HART", "has_tau": False, "negative_prompt": False,
                    "pixel_budgets": ["auto", "1M (1024px)", "2K (zero-shot)"]}
    assert infinity["has_tau"] and infinity["negative_prompt"]
    assert infinity["pixel_budgets"] == list(MAPPINGS["FastVAR_Sampler"].INPUT_TYPES()["required"]["pixel_budget"][0])
    assert facts["loaders"]["FastVAR_LoadQwen2TextEncoder"]["negative_prompt"] is False
    assert "FastVAR_Sampler" not in facts["loaders"]
    tail = [f"last_{k}_drop" for k in range(1, 7)]
    assert facts["pruning_ignored"]["paper"] == ["speed_target", *tail, "cache_from_end"]
    assert facts["pruning_ignored"]["off"] == ["speed_target", *tail, "cache_from_end", "first_layer", "last_layer"]


def _header_only_checkpoint(path, config):
    """A .safetensors file holding only the header of a released Infinity transformer of ``config``."""
    import json

    import torch

    loader = _core("infinity.loader")
    with torch.device("meta"):
        net = _core("infinity.model").InfinityTransformer(config)
    header = {loader.official_key(k, config): {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]}
              for k, v in net.state_dict().items()}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)


def test_infinity_detects_the_release_from_the_file_header(tmp_path):
    family = _core("families").get_family("infinity")
    configs = _core("infinity.config")
    for name, config in (("2b.safetensors", configs.INFINITY_2B), ("8b.safetensors", configs.INFINITY_8B)):
        _header_only_checkpoint(tmp_path / name, config)
        assert family.detect_config(tmp_path / name) == config
    (tmp_path / "cut.safetensors").write_bytes(b"\x10")
    with pytest.raises(Exception, match="no readable safetensors header"):
        family.detect_config(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("loader, model, size", [
    ("FastVAR_LoadInfinityModel", "8b.safetensors", dict(width="1024", height="576", aspect_ratio="from width/height",
                                                          pixel_budget="auto")),
    ("FastVAR_LoadInfinityModel", "2b.safetensors", dict(width="1024", height="1024", aspect_ratio="16:9 (runs 7:4)",
                                                          pixel_budget="2K (zero-shot)")),
    ("FastVAR_LoadHARTModel", "hart-0.7b-1024px", dict(width="768", height="1024", aspect_ratio="from width/height",
                                                       pixel_budget="auto")),
])
@pytest.mark.parametrize("preset", ["paper", "fast", "speed target"])
def test_chart_of_the_connected_sampler_is_the_plan_the_sampler_runs(tmp_path, loader, model, size, preset):
    """With chart_for = the connected sampler, the chart's plan and FLOP ratio are those of the sampler's own
    model (detected from the loader's file) at the sampler's size."""
    import torch

    compat, routes = sys.modules[PACK.__name__ + ".nodes.compat"], sys.modules[PACK.__name__ + ".nodes.routes"]
    generation = sys.modules[PACK.__name__ + ".nodes.generation"]
    families, cost, configs = _core("families"), _core("cost"), _core("infinity.config")
    (tmp_path / "infinity").mkdir()
    (tmp_path / "hart" / "hart-0.7b-1024px").mkdir(parents=True)
    config = configs.INFINITY_8B if model.startswith("8b") else configs.INFINITY_2B
    _header_only_checkpoint(tmp_path / "infinity" / model, config)
    compat.set_model_dirs({"infinity": [tmp_path / "infinity"], "hart": [tmp_path / "hart"]})
    try:
        chart = routes.chart_from_query({"preset": preset, "speed_target": "2.5", "loader": loader, "model": model,
                                         **size})
    finally:
        compat.set_model_dirs({})
    family = families.get_family(MAPPINGS[loader].FAMILY)
    if family.name == "hart":
        config = _core("hart.config").HART_0_7B
        builder = _core("hart.model").HARTTransformer
    else:
        builder = _core("infinity.model").InfinityTransformer
    with torch.device("meta"):
        net = builder(config)
    part = types.SimpleNamespace(family=family.name, module=net)
    schedule = generation.pick_schedule(part, int(size["width"]), int(size["height"]), size["aspect_ratio"],
                                        size["pixel_budget"])
    request = MAPPINGS["FastVAR_Pruning"]().build(**_pruning_args(preset=preset, speed_target=2.5))[0]
    plan = families.resolve_pruning(family, request, schedule, net.config)  # what the sampler resolves
    h, w = schedule.image_size
    assert (chart["width"], chart["height"]) == (w, h)
    assert chart["config"] == plan.to_dict()
    speedup = cost.predicted_speedup(family.arch_spec(net.config), list(schedule.scales), plan)
    assert chart["speedup"] == pytest.approx(speedup, rel=1e-12)
    assert chart["speedup_text"] == f"{speedup:.1f}x fewer transformer FLOPs (cost-model prediction)"
    name = {"8b.safetensors": "Infinity-8B", "2b.safetensors": "Infinity-2B"}.get(model, "HART-0.7B")
    assert chart["model"] == f"{name} {w}x{h}"


def test_aspect_choice_gives_the_size_it_runs_and_no_sampler_falls_back():
    routes = sys.modules[PACK.__name__ + ".nodes.routes"]
    query = {"loader": "FastVAR_LoadInfinityModel", "width": "1024", "height": "1024", "pixel_budget": "auto"}
    assert routes.size_from_query({**query, "aspect_ratio": "16:9 (runs 7:4)"}) == {"width": 1344, "height": 768}
    assert routes.size_from_query({**query, "aspect_ratio": "9:16 (runs 4:7)"}) == {"width": 768, "height": 1344}
    assert routes.size_from_query({**query, "aspect_ratio": "1:1", "pixel_budget": "0.25M (512px)"}) == {
        "width": 512, "height": 512}
    assert routes.size_from_query({"aspect_ratio": "1:1"}) == {"error": "no model loader connected"}
    chart = routes.chart_from_query({"preset": "paper"})  # no sampler connected: the first released model
    assert chart["model"] == "Infinity-2B 1024px (no sampler connected)"


@pytest.mark.parametrize("node_id, name", [("FastVAR_Pruning", "first_layer"), ("FastVAR_Pruning", "last_layer"),
                                           ("FastVAR_TokenMap", "layer")])
def test_layer_widgets_span_the_released_models(node_id, name):
    """Issue #15: the layer widgets went to 128 and clamped silently; they span the deepest release (Infinity-8B,
    40 layers) and say each model's range."""
    options = MAPPINGS[node_id].INPUT_TYPES()["required"][name][1]
    assert (options["min"], options["max"], options["default"]) == (-1, 39, -1)
    assert "Layers of each model: Infinity-2B 0-31, Infinity-8B 0-39, HART-0.7B 0-23" in options["tooltip"]
