"""What the scripts run with the comfy-e2e environment's Python (comfy_partial_load.py, comfy_managed_run.py)
share: ComfyUI's modules started as ``main.py --cpu`` starts them, and the pack loaded the way ComfyUI loads
it. Not collected by pytest (no test_ prefix)."""

import sys
from pathlib import Path


def start(comfy_dir: str):
    """Import ComfyUI's modules from ``comfy_dir`` with ``--cpu`` parsed and return the loaded pack."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, str(Path(__file__).parent))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (reads the arguments: the devices and VRAM state)
    from pack import load_pack

    return load_pack()
