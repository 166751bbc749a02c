"""ComfyUI-FastVAR: Infinity and HART text-to-image models with FastVAR cached token pruning.

Import-safe without ComfyUI: the node modules reach ComfyUI services only through nodes/compat.py.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
