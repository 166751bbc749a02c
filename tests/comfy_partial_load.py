"""Run by tests/test_memory.py with the e2e environment's Python inside a ComfyUI checkout (argv: ComfyUI folder,
tiny Infinity checkpoint): a lowvram partial load and an unload of an Infinity transformer through ComfyUI's real
ModelPatcher, printing where every tensor of ours sits as JSON. Not collected by pytest (no test_ prefix).

The CPU has no second device, so "meta" stands in for the GPU: the partial load moves tensors there (their values
are dropped, which this check does not need). Tensors cannot be copied back out of meta, so the carrier's
``to(cpu)``, which ComfyUI's unload calls, allocates them empty on the CPU instead (``to_empty``)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import start  # noqa: E402

comfy_dir, checkpoint = sys.argv[1], sys.argv[2]
pack = start(comfy_dir)
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

compat = sys.modules[f"{pack.__name__}.nodes.compat"]
families = sys.modules[f"{pack.__name__}.fastvar_core.families"]
assert compat.comfy_patcher is not None, "ComfyUI's modules were not found"

GPU, CPU = torch.device("meta"), torch.device("cpu")
compat.devices = lambda kind: (GPU, CPU)
ops = compat.operations(None, torch.float32, GPU)
model = families.get_family("infinity").load_model(checkpoint, device=CPU, dtype=torch.float32, operations=ops)
patcher = compat.patcher(model, compat.DIFFUSION)
carrier = patcher.model
moved_back = []
plain_to = carrier.to


def to(*args, **kwargs):  # ComfyUI's unload: model.to(offload device)
    device = torch.device(args[0] if args else kwargs["device"])
    moved_back.append(str(device))
    if device == CPU:
        return carrier.to_empty(device=CPU)
    return plain_to(*args, **kwargs)


carrier.to = to


def where():
    cast, own = {}, {}
    for name, m in carrier.named_modules():
        target = cast if hasattr(m, "comfy_cast_weights") else own
        for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            target[f"{name}.{key}"] = t.device.type
    return cast, own


size = mm.module_size(carrier)
patcher.load(GPU, lowvram_model_memory=size // 3)  # what load_models_gpu does when a third of the weights fit
cast_loaded, own_loaded = where()
lowvram = bool(carrier.model_lowvram)
clone_keeps_callback = patcher.clone().get_all_callbacks("on_load_after") == patcher.get_all_callbacks("on_load_after")
patcher.detach()  # what unload_all_models / free_memory do
cast_unloaded, own_unloaded = where()
print(json.dumps({"lowvram": lowvram, "cast_loaded": cast_loaded, "own_loaded": own_loaded,
                  "cast_unloaded": cast_unloaded, "own_unloaded": own_unloaded, "moved_back": moved_back,
                  "clone_keeps_callback": clone_keeps_callback}))
