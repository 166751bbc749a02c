"""Runtime vs tooling (issue #13): what a node or a library user imports never pulls in tools/ or charting.

Each check imports in a fresh interpreter that could import tools/ (the repository root is on its path),
then reports which modules got loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

DRAWING = ("matplotlib", "PIL.ImageDraw", "PIL.ImageFont")


def loaded_modules(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints a JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def is_tooling(name: str, pack: str = "") -> bool:
    """tools/ imported as a top-level package, or as the pack's subpackage."""
    return name.split(".")[0] == "tools" or bool(pack) and name.startswith(f"{pack}.tools")


def test_every_runtime_module_imports_without_tools_or_drawing_code():
    found = loaded_modules(f"""
import importlib, json, pkgutil, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import fastvar_core
from pack import load_pack
pack = load_pack()
walked = []
for package in (fastvar_core, importlib.import_module(pack.__name__ + ".nodes")):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith(".__main__"):  # importing it would run the CLI
            importlib.import_module(info.name)
            walked.append(info.name)
print(json.dumps({{"pack": pack.__name__, "walked": walked, "loaded": sorted(sys.modules)}}))
""")
    pack = found["pack"]
    assert {"fastvar_core.cli", "fastvar_core.pipeline", "fastvar_core.pruning_request", "fastvar_core.infinity.sampler",
            "fastvar_core.hart.sampler", f"{pack}.nodes.generation", f"{pack}.nodes.loaders"} <= set(found["walked"])
    assert [m for m in found["loaded"] if is_tooling(m, pack)] == []
    assert [m for m in found["loaded"] if m.startswith(DRAWING)] == []


def test_the_cli_parser_loads_no_tools_and_no_drawing_code():
    found = loaded_modules("""
import json, sys
import fastvar_core.cli
usage = fastvar_core.cli.build_parser().format_usage()
print(json.dumps({"usage": usage, "loaded": sorted(sys.modules)}))
""")
    assert "{generate,memory,convert}" in found["usage"]  # demo, bench and e2e-models are tools/ entry points
    assert [m for m in found["loaded"] if is_tooling(m) or m.startswith(DRAWING)] == []
