"""The command line end to end on the tiny official-format checkpoints and text encoders.

`python -m fastvar_core generate` for both families (PNG of the schedule's size), `convert`, one
`error:` line and exit status 2 for every bad input (no traceback unless --debug), Ctrl-C stopping
sampling within one scale (status 130), and a rerun after an interrupt equal to a fresh process.
Subprocess runs are kept few and short; the error matrix calls ``cli.main`` in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS, PARITY, ROOT
from PIL import Image
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from fastvar_core import cli
from fastvar_core.checkpoint import flatten_tensors
from fastvar_core.errors import CheckpointError
from tools.tiny_models import write_tiny_d56_vae

INF_PTH = PARITY / "infinity" / "checkpoints" / "infinity_tiny.pth"
INF_VAE = PARITY / "infinity" / "checkpoints" / "infinity_vae_d32_tiny.pth"
HART_RELEASE = PARITY / "hart" / "checkpoint"
T5 = MODELS / "tiny-flan-t5-xl"
QWEN = MODELS / "tiny-qwen2-vl-1.5b-instruct"
# 701 tokens with the tiny T5 tokenizer: more than Infinity's 512, so it is truncated with a warning.
LONG_PROMPT = " ".join(["a red fox in the snow"] * 100)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}  # the tests' thread count
# in-process runs of the long prompt warn on purpose (the subprocess test checks how the CLI shows it)
pytestmark = pytest.mark.filterwarnings("ignore:prompt 0 is 701 tokens long:UserWarning")


def infinity_args(out: Path, *extra: str, model: Path = INF_PTH, vae: Path = INF_VAE, text: Path = T5) -> list[str]:
    return ["generate", "--family", "infinity", "--model", str(model), "--vae", str(vae), "--text-encoder",
            str(text), "--prompt", LONG_PROMPT, "--budget", "0.06M", "--seed", "5", "--out", str(out), *extra]


def hart_args(out: Path, *extra: str, model: Path = HART_RELEASE, text: Path = QWEN) -> list[str]:
    return ["generate", "--family", "hart", "--model", str(model), "--text-encoder", str(text),
            "--prompt", "a red fox", "--seed", "5", "--out", str(out), *extra]


def run_cli(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvar_core", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def short_hart(tmp_path_factory) -> Path:
    """The tiny HART release with a 6-scale schedule up to 8x8 tokens (128 px): same weights, short run."""
    release = tmp_path_factory.mktemp("hart") / "hart-tiny-128px"
    (release / "llm").mkdir(parents=True)
    config = json.loads((HART_RELEASE / "llm" / "config.json").read_text())
    config["patch_nums"] = [1, 2, 3, 4, 6, 8]
    (release / "llm" / "config.json").write_text(json.dumps(config))
    (release / "llm" / "ema_model.bin").symlink_to(HART_RELEASE / "llm" / "ema_model.bin")
    (release / "tokenizer").symlink_to(HART_RELEASE / "tokenizer")
    return release


@pytest.fixture(scope="module")
def fresh_infinity_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One Infinity generation by a fresh process: 0.06M (7 scales, 256 px), paper pruning, seed 5."""
    out = tmp_path_factory.mktemp("fresh") / "fox.png"
    return run_cli(infinity_args(out)), out


# ------------------------------------------------------------------------------------------------
# generate, both families


def test_generate_infinity(fresh_infinity_run):
    proc, out = fresh_infinity_run
    assert proc.returncode == 0, proc.stderr
    assert pixels(out).shape == (256, 256, 3)
    assert "pruning paper: sampling" in proc.stdout and str(out) in proc.stdout
    assert "schedule: infinity 0.06M h/w=1.0: 7 scales, 256x256 px" in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    # the over-long prompt: truncated as upstream does, reported in one line without a source excerpt
    assert warnings == ["warning: prompt 0 is 701 tokens long (with </s>), more than the T5 limit of 512: "
                        "its last 189 tokens were dropped."]
    assert "Traceback" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_generate_hart(short_hart, tmp_path):
    out = tmp_path / "hart.png"
    proc = run_cli(hart_args(out, model=short_hart))
    assert proc.returncode == 0, proc.stderr
    assert "schedule: hart 1M h/w=1.0: 6 scales, 128x128 px" in proc.stderr
    assert pixels(out).shape == (128, 128, 3)
    assert f"-> {out}" in proc.stdout and "Traceback" not in proc.stderr


def test_batch_writes_numbered_images(short_hart, tmp_path):
    assert cli.main(hart_args(tmp_path / "b.png", "--batch", "2", model=short_hart)) == 0
    assert [pixels(tmp_path / f"b_{i}.png").shape for i in range(2)] == [(128, 128, 3)] * 2


# ------------------------------------------------------------------------------------------------
# interrupts


def test_interrupted_run_then_rerun_equals_a_fresh_process(fresh_infinity_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C at scale 2 (KeyboardInterrupt from the progress callback): status 130, nothing written;
    the next run in the same process gives the fresh process's image, pixel for pixel."""
    _, fresh = fresh_infinity_run
    steps = []

    def ctrl_c_bar(label):
        def callback(step, total, preview=None):
            steps.append(step)
            if step == 2:
                raise KeyboardInterrupt

        return callback

    with monkeypatch.context() as m:
        m.setattr(cli, "_progress_bar", ctrl_c_bar)
        assert cli.main(infinity_args(tmp_path / "cancelled.png")) == 130
    assert steps == [1, 2] and not (tmp_path / "cancelled.png").exists()
    assert "interrupted: sampling stopped and its caches were freed" in capsys.readouterr().err
    assert cli.main(infinity_args(tmp_path / "again.png")) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(fresh))


def test_ctrl_c_stops_a_real_process_within_one_scale(tmp_path):
    """SIGINT to `generate` (the full 14-scale HART run) once scale 2 is done: at most the scale in
    progress when the signal arrives finishes, then exit 130 with every cache freed."""
    out = tmp_path / "never.png"
    # a runner started in the background (`cmd &`) ignores SIGINT, and so would the child: restore the
    # default so that Python installs its Ctrl-C handler as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "fastvar_core", *hart_args(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = bytearray()
    seen = threading.Event()

    def pump():
        while chunk := proc.stderr.read1(256):
            stderr.extend(chunk)
            if b"scale 2/14" in stderr:
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert seen.wait(120), f"no progress seen: {bytes(stderr).decode(errors='replace')}"
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        done_at_signal = max(int(s) for s in re.findall(rb"scale (\d+)/14", bytes(stderr)))
        code = proc.wait(timeout=60)
        stopped = time.perf_counter() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = bytes(stderr).decode(errors="replace")
    assert code == 130, text
    assert "interrupted: sampling stopped and its caches were freed" in text and "Traceback" not in text
    last_scale = max(int(s) for s in re.findall(r"scale (\d+)/14", text))
    assert last_scale <= done_at_signal + 1, f"sampling went on from scale {done_at_signal} to {last_scale}"
    assert stopped < 30 and not out.exists()


# ------------------------------------------------------------------------------------------------
# one clear error per bad input


def test_error_is_one_line_without_traceback_and_debug_shows_it():
    args = ["generate", "--family", "infinity", "--model", str(HART_RELEASE / "llm"), "--vae", str(INF_VAE),
            "--text-encoder", str(T5), "--prompt", "x"]
    plain = run_cli(args)
    assert plain.returncode == 2
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert lines == [f"error: '{HART_RELEASE / 'llm'}' is a HART checkpoint folder (config model_type "
                     f"'hart_transformer_t2i'), not an Infinity transformer: load it with the HART loader."]
    debug = run_cli(["--debug", *args])
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "CheckpointError" in debug.stderr


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Broken and mismatched files, written once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.pth").touch()
    (d / "truncated.pth").write_bytes(INF_PTH.read_bytes()[: INF_PTH.stat().st_size // 2])
    (d / "garbage.pth").write_bytes(bytes(range(256)) * 64)
    (d / "a_folder.pth").mkdir()
    write_tiny_d56_vae(d / "infinity_vae_d56_f8_14_patchify.pth")
    (d / "t5_no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        (d / "t5_no_tokenizer" / name).symlink_to(T5 / name)
    _write_narrow_t5(d)
    (d / "pruning.json").write_text(json.dumps({"drop_ratios": {"9": 0.5}, "cache_scale": 3, "layers": [0, 2]}))
    (d / "out_folder").mkdir()
    return d


def _write_narrow_t5(d: Path) -> None:
    """A single-file T5 encoder 64 wide (Infinity needs 2048) and a tokenizer folder without config.json,
    so its config is detected from the shapes."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=512, d_model=64, d_kv=32, d_ff=64, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    state = T5EncoderModel(config).state_dict()
    save_file({k: v.contiguous().clone() for k, v in state.items() if k != "encoder.embed_tokens.weight"},
              str(d / "t5_narrow.safetensors"))
    (d / "t5_tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (d / "t5_tokenizer" / name).symlink_to(T5 / name)


# id -> (arguments given the bad-input folder, words of the one error line)
ERROR_CASES = {
    "empty_model_file": (lambda d: infinity_args(d / "o.png", model=d / "empty.pth"),
                         "'{d}/empty.pth' is empty (0 bytes): the download is incomplete."),
    "truncated_model": (lambda d: infinity_args(d / "o.png", model=d / "truncated.pth"),
                        "'{d}/truncated.pth' could not be read as a PyTorch checkpoint (RuntimeError: "),
    "corrupt_vae": (lambda d: infinity_args(d / "o.png", vae=d / "garbage.pth"),
                    "'{d}/garbage.pth' is not a weights-only PyTorch checkpoint"),
    "folder_for_a_file": (lambda d: infinity_args(d / "o.png", vae=d / "a_folder.pth"),
                          "'{d}/a_folder.pth' is a folder, but a single weight file"),
    "file_for_a_folder": (lambda d: hart_args(d / "o.png", text=QWEN / "config.json"),
                          f"'{QWEN / 'config.json'}' is a file, but HART's text model is a folder"),
    "hart_in_infinity_loader": (lambda d: infinity_args(d / "o.png", model=HART_RELEASE),
                                f"'{HART_RELEASE}' is a HART checkpoint folder"),
    "infinity_in_hart_loader": (lambda d: hart_args(d / "o.png", model=INF_PTH),
                                f"'{INF_PTH}' is a single weight file without a HART config.json beside it"),
    "vae_of_another_model": (lambda d: infinity_args(d / "o.png", vae=d / "infinity_vae_d56_f8_14_patchify.pth"),
                             f"model '{INF_PTH}' and VAE '{{d}}/infinity_vae_d56_f8_14_patchify.pth': VAE and "
                             f"transformer do not belong together: the transformer (custom) predicts 32 bits"),
    "text_encoder_of_wrong_width": (
        lambda d: infinity_args(d / "o.png", "--tokenizer", str(d / "t5_tokenizer"), text=d / "t5_narrow.safetensors"),
        f"text encoder '{{d}}/t5_narrow.safetensors' makes 64-wide features, but the model '{INF_PTH}' expects 2048"),
    "missing_tokenizer_file": (lambda d: infinity_args(d / "o.png", text=d / "t5_no_tokenizer"),
                               "'{d}/t5_no_tokenizer' has no T5 tokenizer file: expected 'tokenizer.json'"),
    "zero_width": (lambda d: infinity_args(d / "o.png", "--width", "0", "--height", "256"),
                   "width must be a positive number of pixels, got 0"),
    "impossible_aspect_ratio": (lambda d: infinity_args(d / "o.png", "--width", "4096", "--height", "64"),
                                "aspect ratio 4096x64 (height/width 0.0156) is outside the aspect templates"),
    "width_without_height": (lambda d: infinity_args(d / "o.png", "--width", "256"),
                             "give both width and height, or neither; got width=256, height=None"),
    "hart_small_size": (lambda d: hart_args(d / "o.png", "--width", "512", "--height", "512"),
                        "HART makes images of its trained size class (1024x1024 at this aspect ratio) or zero-shot 2K; "
                        "512x512 is smaller than either"),
    "pruning_names_missing_scale": (
        lambda d: infinity_args(d / "o.png", "--pruning", str(d / "pruning.json")),
        "pruning.drop_ratios: scale index 9 does not exist; this schedule has scales 0..6"),
    "pruning_neither_preset_nor_file": (lambda d: infinity_args(d / "o.png", "--pruning", "fastest"),
                                        "pruning must be off, paper, 2k, fast or a JSON file; 'fastest' is none of these"),
    "batch_zero": (lambda d: infinity_args(d / "o.png", "--batch", "0"),
                   "batch size must be an integer >= 1 (images per prompt), got 0"),
    "seed_beyond_64_bits": (lambda d: infinity_args(d / "o.png", "--seed", str(2**64)),
                            f"seed must be an integer in 0..{2**64 - 1}, got {2**64}"),
    "output_is_a_folder": (lambda d: infinity_args(d / "out_folder"),
                           "--out '{d}/out_folder' is a folder; expected an image file name"),
    "output_suffix_unknown": (lambda d: infinity_args(d / "o.imagefile"),
                              "--out '{d}/o.imagefile' has no image suffix PIL can write"),
    "unknown_device": (lambda d: infinity_args(d / "o.png", "--device", "gpu"), "device 'gpu' is not a torch device"),
    "hart_negative_prompt": (lambda d: hart_args(d / "o.png", "--negative", "blurry", model=HART_RELEASE / "llm"),
                             "HART has no negative prompt"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gives_one_error_line_and_status_2(bad_inputs, capsys, case):
    make_args, words = ERROR_CASES[case]
    assert cli.main(make_args(bad_inputs)) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert words.format(d=bad_inputs) in line
    assert "Traceback" not in err
    assert not list(bad_inputs.glob("o.*"))  # nothing was written


def test_unexpected_failure_is_one_line_status_1_and_debug_raises(monkeypatch, capsys, tmp_path):
    from fastvar_core import pipeline

    def broken_load(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line of detail")

    monkeypatch.setattr(pipeline.Pipeline, "load", broken_load)
    assert cli.main(infinity_args(tmp_path / "o.png")) == 1
    assert error_lines(capsys.readouterr().err) == [
        "error: unexpected RuntimeError: simulated bug (rerun with --debug for the traceback and report it)"]
    with pytest.raises(RuntimeError, match="simulated bug"):
        cli.main(["--debug", *infinity_args(tmp_path / "o.png")])


# ------------------------------------------------------------------------------------------------
# convert


def test_convert_official_pickle(tmp_path, capsys):
    out = tmp_path / "infinity_vae_d32_tiny.safetensors"
    assert cli.main(["convert", str(INF_VAE), str(out)]) == 0
    reference = flatten_tensors(torch.load(INF_VAE, map_location="cpu", weights_only=True))
    converted = read_safetensors(str(out))
    assert converted.keys() == reference.keys() and len(converted) > 100
    assert all(torch.equal(converted[k], v) and converted[k].dtype == v.dtype for k, v in reference.items())
    assert f"wrote {out}: {len(reference)} tensors, verified identical to {INF_VAE}" in capsys.readouterr().out


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_convert_refuses_a_malicious_pickle(tmp_path, capsys):
    pwned, evil, out = tmp_path / "pwned", tmp_path / "evil.pth", tmp_path / "evil.safetensors"
    torch.save({"w": torch.ones(2), "x": _Payload(pwned)}, evil)
    assert cli.main(["convert", str(evil), str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "needs an arbitrary Python pickle to load (it asks for builtins.getattr, pathlib.Path" in line
    assert "nothing in it was executed" in line
    assert cli.main(["convert", str(evil), str(out), "--allow-global", "argparse.Namespace"]) == 2
    assert cli.main(["convert", str(evil), str(out), "--allow-global", "builtins.getattr"]) == 2
    assert "would let the file run code" in capsys.readouterr().err
    assert not pwned.exists() and not out.exists()
    with pytest.raises(CheckpointError):  # --debug shows the exception itself
        cli.main(["--debug", "convert", str(evil), str(out)])
    assert not pwned.exists()
