"""ComfyUI-FastVAR: Infinity and HART text-to-image models with FastVAR cached token pruning.

Import-safe without ComfyUI: the node modules reach ComfyUI services only through nodes/compat.py.
"""

WEB_DIRECTORY = "./web"

# ComfyUI imports this folder as a package. pytest also imports this file while collecting tests/, and
# where the checkout's folder name is no Python identifier (a clone in "ComfyUI-FastVAR") it does so
# without a parent package; the nodes are not needed there.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
