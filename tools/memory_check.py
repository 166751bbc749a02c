"""Manual check of the memory report against a real load: process memory of a random-weight Infinity-2B.

Two steps, each under ``flock /tmp/bigmem.lock`` (about 9 GB of RAM at the peak):

    python -m tools.memory_check write /tmp/infinity_2b_random.pth
        writes the released 2B transformer's state dict at its real shapes, random bf16 values, as a flat
        torch pickle (the official .pth layout, in bfloat16: 4.4 GB instead of the official 8.8 GB fp32).
    cd /path/to/ComfyUI && /path/to/comfy/python /path/to/ComfyUI-FastVAR/tools/memory_check.py measure \\
            /tmp/infinity_2b_random.pth fp8_e4m3fn
        inside ComfyUI's modules started with ``--cpu``: loads the file through the loader node's function
        (``nodes.loaders.load_model_part``, compute bfloat16, the given weight_dtype), brings it to the load
        device with ``load_models_gpu`` and prints the process's resident memory before and after, next to
        the bytes the memory report predicts for that weight_dtype.

Without ComfyUI: ``write PATH DEPTH`` writes the 2B's widths with DEPTH blocks (a small file), and
``peak PATH [weight_dtype]`` loads it through Family.load_model as the loader node does and prints the
resident memory before and after and the load's peak.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss() -> dict[str, int]:
    """Resident memory of this process from /proc (bytes): total, anonymous, file-backed, and the peak."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def write(path: str, depth: str = "") -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from fastvar_core.families import get_family

    fam = get_family("infinity")
    config = fam.released_configs()["Infinity-2B"]
    if depth:  # the 2B's widths with fewer blocks: the load-peak check without a 4.4 GB file
        config = fam.with_sizes(config, depth=int(depth))
    with torch.device("meta"):
        model = fam.random_model(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, t in model.state_dict().items():
        state[key] = torch.empty(t.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) \
            if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
    torch.save(state, path)
    print(f"wrote {path}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} elements")


def measure(path: str, weight_dtype: str) -> None:
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(Path.cwd()))  # ComfyUI's folder
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm  # noqa: F401  (parses --cpu)

    spec = importlib.util.spec_from_file_location("comfyui_fastvar_check", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    loaders = sys.modules[f"{spec.name}.nodes.loaders"]
    compat = sys.modules[f"{spec.name}.nodes.compat"]
    memory = sys.modules[f"{spec.name}.fastvar_core.memory"]

    gc.collect()
    before = rss()
    part = loaders.load_model_part("infinity", path, "bfloat16", "auto", weight_dtype)
    compat.load_models([part.patcher], 0)
    gc.collect()
    after = rss()
    held = memory.tensor_bytes(part.module)
    predicted = memory.build_report("infinity-2b").part("transformer").weights[weight_dtype]
    gib = 2**30
    print(f"weight_dtype {weight_dtype}: predicted {predicted / gib:.2f} GiB, tensors held {held / gib:.2f} GiB, "
          f"RSS {before['VmRSS'] / gib:.2f} -> {after['VmRSS'] / gib:.2f} GiB "
          f"(+{(after['VmRSS'] - before['VmRSS']) / gib:.2f}; anonymous +{(after['RssAnon'] - before['RssAnon']) / gib:.2f}, "
          f"file +{(after['RssFile'] - before['RssFile']) / gib:.2f}), peak RSS {after['VmHWM'] / gib:.2f} GiB")


def peak(path: str, weight_dtype: str = "default") -> None:
    """Load ``path`` through Family.load_model (compute bfloat16, CPU) without ComfyUI, as the loader node
    does (fp8: CastOps, the Linear weights stored in fp8 straight from the file), and print resident memory
    before and after and the load's peak."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fastvar_core.families import get_family
    from fastvar_core.memory import tensor_bytes
    from fastvar_core.ops import WEIGHT_DTYPES, CastOps

    import threading
    import time

    storage = WEIGHT_DTYPES[weight_dtype]
    ops = CastOps if storage is not None else None
    gc.collect()
    before = rss()
    anon_peak, done = [before["RssAnon"]], threading.Event()

    def sample():  # VmHWM also counts file pages a memory-mapped read touches (reclaimable cache)
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], rss()["RssAnon"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = get_family("infinity").load_model(path, device="cpu", dtype=torch.bfloat16, operations=ops,
                                              weight_dtype=storage)
    gc.collect()
    done.set()
    sampler.join()
    after = rss()
    held = tensor_bytes(model)
    gib = 2**30
    print(f"weight_dtype {weight_dtype}: tensors held {held / gib:.3f} GiB, RSS {before['VmRSS'] / gib:.3f} -> "
          f"{after['VmRSS'] / gib:.3f} GiB (+{(after['VmRSS'] - before['VmRSS']) / gib:.3f}), peak RSS "
          f"{after['VmHWM'] / gib:.3f} GiB (+{(after['VmHWM'] - before['VmRSS']) / gib:.3f} over the start), "
          f"anonymous peak +{(anon_peak[0] - before['RssAnon']) / gib:.3f} GiB (sampled every 20 ms)")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"write": write, "measure": measure, "peak": peak}[command](*rest)
