"""The memory check through a real ComfyUI server: load a transformer file with Load Infinity Model, once per
weight_dtype, and read the server process's memory from /proc while it runs.

    FV_E2E_HOME=/path/to/.fv-e2e python -m tools.server_memory_check /tmp/infinity_2b_random.pth default fp8_e4m3fn

The file comes from ``python -m tools.memory_check write``. Each weight_dtype gets its own server, started by the
comfy-e2e harness (``../shared/tools/comfy-e2e/run_e2e.sh``, its environment under ``FV_E2E_HOME``; ``--cpu``, API prompt: the loader, compute bfloat16,
feeding a core PreviewAny so that it runs). Printed per run: the server's resident memory when idle before the
prompt, the growth it settled at, and the peaks of its resident and of its anonymous memory (sampled every 0.2 s;
a memory-mapped read counts the file's pages in the resident size until the map is dropped).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "tools" / "comfy-e2e" / "run_e2e.sh"
GIB = 2**30


def status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in text.splitlines())
            if k in ("VmRSS", "RssAnon", "VmHWM")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: Path, weight_dtype: str, work: Path) -> str:
    models = work / "models" / "infinity"
    models.mkdir(parents=True, exist_ok=True)
    (models / model.name).unlink(missing_ok=True)
    (models / model.name).symlink_to(model.resolve())
    prompt = work / f"load_{weight_dtype}.json"
    prompt.write_text(json.dumps({
        "1": {"class_type": "FastVAR_LoadInfinityModel", "inputs": {
            "model_name": model.name, "dtype": "bfloat16", "attention": "auto", "weight_dtype": weight_dtype}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}))
    port = free_port()
    log = work / f"e2e_{weight_dtype}.log"
    with open(log, "w") as out:
        harness = subprocess.Popen(["bash", str(HARNESS), str(ROOT), str(prompt), "--models", str(work / "models"),
                                    "--name", "ComfyUI-FastVAR", "--no-browser", "--timeout", "1800", "--port",
                                    str(port), "--out", str(work / f"run_{weight_dtype}")], stdout=out, stderr=out)
        samples: list[tuple[float, dict[str, int]]] = []
        pid = None
        while harness.poll() is None:  # the server's pid, from the harness's own log line
            if pid is None:
                found = re.search(r"server: pid (\d+)", log.read_text())
                pid = int(found.group(1)) if found else None
            if pid is not None and (s := status(pid)) is not None and len(s) == 3:  # an exiting process has none
                samples.append((time.monotonic(), s))
            time.sleep(0.2)
    text = log.read_text()
    if "RESULT: PASS" not in text or not samples:
        tail = "\n".join(text.splitlines()[-15:])
        return f"{weight_dtype}: the run failed:\n{tail}"
    queued = re.search(r"\[e2e\s+([\d.]+)s\] api: running", text)
    started = re.search(r"\[e2e\s+([\d.]+)s\] server: pid", text)
    # Idle: the last sample before the prompt was queued (harness clock: seconds since its start).
    offset = float(queued.group(1)) - float(started.group(1)) if queued and started else 0.0
    idle = [s for t, s in samples if t - samples[0][0] < offset] or [samples[0][1]]
    base, last = idle[-1], samples[-1][1]
    peak_rss = max(s["VmRSS"] for _, s in samples)
    peak_anon = max(s["RssAnon"] for _, s in samples)
    return (f"{weight_dtype}: idle {base['VmRSS'] / GIB:.2f} GiB; settled +{(last['VmRSS'] - base['VmRSS']) / GIB:.2f} "
            f"GiB (anonymous +{(last['RssAnon'] - base['RssAnon']) / GIB:.2f}); peak resident "
            f"+{(peak_rss - base['VmRSS']) / GIB:.2f}, peak anonymous +{(peak_anon - base['RssAnon']) / GIB:.2f}")


def main(argv: list[str]) -> int:
    model, *dtypes = argv
    with tempfile.TemporaryDirectory(prefix="fastvar-server-memory-") as work:
        for weight_dtype in dtypes or ["default", "fp8_e4m3fn"]:
            print(run(Path(model), weight_dtype, Path(work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
