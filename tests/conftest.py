"""Shared test fixtures: where the reference material lives, CPU determinism."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASTVAR_SHARED", ROOT.parent / "shared")).resolve()
PARITY = SHARED / "parity"
MODELS = SHARED / "models"


class StopSampling(Exception):
    """A caller's own exception, raised from a progress callback to stop sampling."""

# The parity references were made with 2 CPU threads; results move at the 1e-6 level with the count.
torch.set_num_threads(2)

if os.environ.get("FASTVAR_MUTANT"):  # the parity self-check (make parity-mutants) injects one fault
    import mutants

    mutants.install(os.environ["FASTVAR_MUTANT"])


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference folder {SHARED} is missing: clone the project with ../shared beside it")
    return SHARED


def pytest_terminal_summary(terminalreporter):
    """List every sampled-output mismatch the parity rule tolerated as a near-tie (docs/parity.md)."""
    from parity_rule import TOLERATED

    if TOLERATED:
        terminalreporter.section("parity: tolerated near-ties")
        for tie in TOLERATED:
            terminalreporter.write_line(str(tie))
