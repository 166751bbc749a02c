"""Lay tiny official-format checkpoints out like ComfyUI's models/ folder (`python -m tools.tiny_models DEST`,
`make e2e-models DIR=DEST`).

The shipped workflows name the real release files; this writes small stand-ins under exactly those
names, so the workflows run end to end in a real ComfyUI on a CPU:

* Infinity-2B, its VAE, flan-t5-xl, HART and Qwen2: copied from the reference material in ../shared;
* Infinity-8B (sharded folder, 56-bit patchify head) and its 14-bit stride-8 VAE: random weights
  written here in the official layouts (no tiny 8B reference exists).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastvar_core.errors import ConfigError
from fastvar_core.infinity.loader import official_key
from fastvar_core.infinity.vae import BSQVAEConfig, InfinityVAE

from . import command
from .randomized import SHAPES, build_transformer

PACK_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    path = Path(os.environ.get("FASTVAR_SHARED", PACK_ROOT.parent / "shared"))
    if not (path / "parity").is_dir():
        raise ConfigError(f"reference folder '{path}' not found: set FASTVAR_SHARED to the shared/ folder")
    return path


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def write_tiny_8b(folder: Path, seed: int = 0) -> None:
    """A random Infinity-8B-layout transformer: 8 block chunks, 56-bit head, 2 safetensors shards + index."""
    shape = SHAPES["infinity-8b"].with_overrides(depth=8, width=256, heads=2)
    model = build_transformer(shape, seed=seed)
    state = {official_key(k, model.config): v.contiguous() for k, v in model.state_dict().items()}  # 8 chunks
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_tiny_d56_vae(path: Path, seed: int = 1) -> None:
    """A random 14-bit, stride-8 BSQ VAE decoder saved like infinity_vae_d56_f8_14_patchify.pth."""
    torch.manual_seed(seed)
    vae = InfinityVAE(BSQVAEConfig(codebook_dim=14, base_ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=3,
                                   patch_size=8, has_encoder=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"vae": vae.state_dict()}, path)


def lay_out(dest: str | os.PathLike) -> list[Path]:
    """Write every model file the shipped workflows name under ``dest``; return what was written."""
    shared, dest = shared_dir(), Path(dest)
    inf = shared / "parity" / "infinity" / "checkpoints"
    hart, models = shared / "parity" / "hart" / "checkpoint", shared / "models"
    plan = [
        (inf / "infinity_tiny.pth", dest / "infinity" / "infinity_2b_reg.pth"),
        (inf / "infinity_vae_d32_tiny.pth", dest / "vae" / "infinity_vae_d32reg.pth"),
        # Hugging Face folders go into the pack's own folders, whose listings show every file (ComfyUI's
        # text_encoders folder hides config and tokenizer files); models/text_encoders works as well.
        (models / "tiny-flan-t5-xl", dest / "infinity" / "flan-t5-xl"),
        (hart / "llm", dest / "hart" / "hart-0.7b-1024px" / "llm"),
        (hart / "tokenizer", dest / "hart" / "hart-0.7b-1024px" / "tokenizer"),
        (models / "tiny-qwen2-vl-1.5b-instruct", dest / "hart" / "Qwen2-VL-1.5B-Instruct"),
    ]
    for src, dst in plan:
        _copy(src, dst)
    write_tiny_8b(dest / "infinity" / "infinity_8b_weights")
    write_tiny_d56_vae(dest / "vae" / "infinity_vae_d56_f8_14_patchify.pth")
    return [dst for _, dst in plan] + [dest / "infinity" / "infinity_8b_weights",
                                        dest / "vae" / "infinity_vae_d56_f8_14_patchify.pth"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="the models folder to write (ComfyUI's models/ layout)")


def run(args: argparse.Namespace) -> int:
    for path in lay_out(args.dest):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command.main("python -m tools.tiny_models", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
