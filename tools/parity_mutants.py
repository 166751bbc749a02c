"""The parity self-check: every injected fault of tests/mutants.py must fail a parity test.

    make parity-mutants        (or: .venv/bin/python tools/parity_mutants.py [--no-control])

First a control run without any fault must pass (otherwise a failure would prove nothing), then the
parity tests run once per mutant, stopping at the first failing test. Prints `mutants caught N/N` and
exits 0 only when every mutant was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mutants import MUTANTS  # noqa: E402

PARITY_TESTS = ["tests/test_infinity_parity.py", "tests/test_hart_parity.py"]


def run_parity(mutant: str | None, stop_first: bool) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k != "FASTVAR_MUTANT"}
    if mutant:
        env["FASTVAR_MUTANT"] = mutant
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *PARITY_TESTS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-control", action="store_true", help="skip the fault-free control run")
    args = parser.parse_args()
    if not args.no_control:
        code, out, seconds = run_parity(None, stop_first=False)
        if code != 0:
            print(out[-4000:])
            print(f"control run without a fault failed (exit {code}, {seconds:.0f} s): fix the parity tests first")
            return 1
        print(f"control: parity tests pass without a fault ({seconds:.0f} s)", flush=True)
    caught = 0
    for name in MUTANTS:
        code, out, seconds = run_parity(name, stop_first=True)
        failed = re.findall(r"^FAILED (\S+)", out, flags=re.MULTILINE)
        if code == 1 and failed:
            caught += 1
            reason = re.search(r"^FAILED \S+ - (.*)$", out, flags=re.MULTILINE)
            print(f"caught   {name}: {failed[0]} ({seconds:.0f} s)" + (f"\n         {reason.group(1)[:200]}" if reason else ""),
                  flush=True)
        else:
            print(f"MISSED   {name}: pytest exit {code} ({seconds:.0f} s)\n{out[-2000:]}", flush=True)
    print(f"mutants caught {caught}/{len(MUTANTS)}")
    return 0 if caught == len(MUTANTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
