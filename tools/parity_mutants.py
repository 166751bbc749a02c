"""The parity self-check: every injected fault of tests/mutants.py must fail a parity test.

    make parity-mutants        (or: .venv/bin/python tools/parity_mutants.py [--no-control])

First a control run without any fault must pass (otherwise a failure would prove nothing), then each
family's parity tests run once per mutant, stopping at the first failing test: a mutant counts as
caught only when the parity tests of every family catch it. Prints `mutants caught N/N` and exits 0
only when every mutant was caught.
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

PARITY_TESTS = {"infinity": "tests/test_infinity_parity.py", "hart": "tests/test_hart_parity.py"}
ALL_PARITY_TESTS = tuple(PARITY_TESTS.values())


def run_parity(mutant: str | None, stop_first: bool, tests=ALL_PARITY_TESTS) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k != "FASTVAR_MUTANT"}
    if mutant:
        env["FASTVAR_MUTANT"] = mutant
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *tests]
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
        missed = []
        for family, test_file in PARITY_TESTS.items():
            code, out, seconds = run_parity(name, stop_first=True, tests=(test_file,))
            failed = re.findall(r"^FAILED (\S+)", out, flags=re.MULTILINE)
            if code == 1 and failed:
                print(f"caught   {name} [{family}]: {failed[0]} ({seconds:.0f} s)", flush=True)
            else:
                missed.append(family)
                print(f"MISSED   {name} [{family}]: pytest exit {code} ({seconds:.0f} s)\n{out[-2000:]}", flush=True)
        caught += not missed
    print(f"mutants caught {caught}/{len(MUTANTS)}")
    return 0 if caught == len(MUTANTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
