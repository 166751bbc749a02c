"""fastvar_core: next-scale-prediction text-to-image models (Infinity, HART) with FastVAR pruning.

Pure PyTorch; never imports ComfyUI.
"""

__version__ = "0.1.0"
