"""ComfyUI node classes of the pack (filled in by the node modules)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
