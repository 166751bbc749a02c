"""Run by tests/test_memory.py with the e2e environment's Python inside a ComfyUI checkout (argv: ComfyUI folder,
the shared folder): the nodes generate twice per family (text encode, sample, decode) under ComfyUI's real model
management with ``--cpu``, then ``unload_all_models`` runs. Prints what the manager held and where our tensors sat
as JSON. Not collected by pytest (no test_ prefix).

With ``--cpu`` ComfyUI's load and offload devices are both the CPU, so an unload would move nothing one could see.
After the two runs every patcher's offload device is set to "meta", standing in for the CPU of a GPU machine: the
unload then visibly takes the tensors off the load device (their values are dropped; nothing runs after it)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import start  # noqa: E402

comfy_dir, shared = sys.argv[1], Path(sys.argv[2])
pack = start(comfy_dir)
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

compat = sys.modules[f"{pack.__name__}.nodes.compat"]
loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
generation = sys.modules[f"{pack.__name__}.nodes.generation"]
assert compat.mm is mm, "the pack did not pick up ComfyUI's model management"

for name, folder in {"hart": shared / "parity" / "hart", "text_encoders": shared / "models",
                     "infinity": shared / "parity" / "infinity" / "checkpoints"}.items():
    folder_paths.add_model_folder_path(name, str(folder))

loads: dict[int, int] = {}  # id(patcher) -> ModelPatcher.load calls: the weights moved to the load device
plain_load = comfy.model_patcher.ModelPatcher.load


def counted_load(self, *args, **kwargs):
    loads[id(self)] = loads.get(id(self), 0) + 1
    return plain_load(self, *args, **kwargs)


comfy.model_patcher.ModelPatcher.load = counted_load

hart = {"model": loaders.LoadHARTModel().load("checkpoint", "float32", "auto")["result"][0],
        "vae": loaders.LoadHARTVAE().load("checkpoint")["result"][0],
        "text_encoder": loaders.LoadQwen2TextEncoder().load("tiny-qwen2-vl-1.5b-instruct", "float32")["result"][0]}
infinity = {"model": loaders.LoadInfinityModel().load("infinity_tiny.pth", "float32", "auto", "fp8_e4m3fn")["result"][0],
            "vae": loaders.LoadInfinityVAE().load("infinity_vae_d32_tiny.pth")["result"][0],
            "text_encoder": loaders.LoadT5TextEncoder().load("tiny-flan-t5-xl", "same folder", "float32")["result"][0]}
parts = {f"{fam}.{role}": part for fam, roles in (("hart", hart), ("infinity", infinity)) for role, part in roles.items()}


def generate(p: dict, cfg: float) -> torch.Tensor:
    positive, _ = generation.TextEncode().encode(p["text_encoder"], "a red fox in the snow", "")
    (pruning,) = generation.FastVARPruning().build("paper", 2.0, 5, -1, -1, "Infinity-2B 1024px")
    latent, _ = generation.FastVARSampler().sample(
        p["model"], positive, seed=3, width=1024, height=1024, aspect_ratio="from width/height", pixel_budget="auto",
        cfg=cfg, tau=0.5, top_k=0, top_p=0.0, batch_size=1, pruning=pruning)["result"]
    (image,) = generation.FastVARDecode().decode(p["vae"], latent, "auto")
    return image


def held() -> list[str]:
    """Our parts ComfyUI's manager holds, by name."""
    managed = [m.model for m in mm.current_loaded_models]
    return sorted(name for name, part in parts.items() if any(part.patcher is m for m in managed))


def devices(part) -> list[str]:
    return sorted({t.device.type for t in list(part.module.parameters()) + list(part.module.buffers())})


first = {fam: generate(p, cfg) for fam, p, cfg in (("hart", hart, 4.5), ("infinity", infinity, 3.0))}
held_first, loads_first = held(), {name: loads.get(id(part.patcher), 0) for name, part in parts.items()}
second = {fam: generate(p, cfg) for fam, p, cfg in (("hart", hart, 4.5), ("infinity", infinity, 3.0))}
held_second, loads_second = held(), {name: loads.get(id(part.patcher), 0) for name, part in parts.items()}
fp8_linears = sorted({str(m.weight.dtype).removeprefix("torch.") for m in infinity["model"].module.modules()
                      if isinstance(m, torch.nn.Linear)})
cast_linears = all(getattr(m, "comfy_cast_weights", None) is not None for m in infinity["model"].module.modules()
                   if isinstance(m, torch.nn.Linear))
on_load_device = {name: devices(part) for name, part in parts.items()}

for part in parts.values():
    part.patcher.offload_device = torch.device("meta")
mm.unload_all_models()

print(json.dumps({
    "held_first": held_first, "held_second": held_second, "held_after_unload": held(),
    "loads_first": loads_first, "loads_second": loads_second,
    "same_images": {fam: bool(torch.equal(first[fam], second[fam])) for fam in first},
    "image_shapes": {fam: list(first[fam].shape) for fam in first},
    "fp8_linear_dtypes": fp8_linears, "fp8_linears_cast": cast_linears,
    "devices_loaded": on_load_device, "devices_unloaded": {name: devices(part) for name, part in parts.items()},
}))
