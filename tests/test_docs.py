"""Citations in code point at the repository's own notes (docs/*.md), and those notes have the sections cited.

Comments and docstrings cite the reference notes as ``docs/<name>.md §N.M`` (optionally ``§N.M-N.M``,
``, §N.M`` continuations and ``step K`` / ``item K`` for a numbered list entry of the section). Notes that
live outside the repository must not be cited: a user who clones the pack does not have them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Outside notes: a fact sheet's file name not preceded by docs/, or any .md file in a folder named reference.
# (Names and paths are split in this file's strings so that it passes its own checks.)
_SHEETS = ("infinity", "hart", "comfyui")
OUTSIDE = re.compile(r"\breference[/][\w.-]+\.md\b|(?<!docs/)(?<![\w-])(?:" + "|".join(_SHEETS) + r")\.md\b")
_SECTION = r"§\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:\s+(?:step|item)\s+\d+)?"
CITATION = re.compile(r"\bdocs/([\w-]+)\.md((?:(?:\s*,\s*|\s+and\s+|\s+)" + _SECTION + r")*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?(?:\s+(?:step|item)\s+(\d+))?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\s")
LIST_ITEM = re.compile(r"^\s*(\d+)\.\s")


def code_files() -> list[Path]:
    """Tracked (and new, not ignored) .py and .js files outside .venv; every such file if git is unavailable."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py", "*.js"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for ext in ("*.py", "*.js") for p in ROOT.rglob(ext)]
    skip = {".venv", ".git", "node_modules", "__pycache__"}
    return sorted(p for p in paths if p.is_file() and not skip & set(p.relative_to(ROOT).parts))


def sections(doc: Path) -> dict[str, list[str]]:
    """Section number -> the lines of that section (up to the next heading)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            current = out.setdefault(m[1], [])
        elif current is not None:
            current.append(line)
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def citation_problems(files: list[Path], root: Path = ROOT, docs: Path = DOCS) -> tuple[list[str], int]:
    """(problems as 'file:line: message', number of section references checked)."""
    problems, checked = [], 0
    cache: dict[str, dict[str, list[str]] | None] = {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(root).as_posix()
        for m in CITATION.finditer(text):
            name = m[1]
            if name not in cache:
                doc = docs / f"{name}.md"
                cache[name] = sections(doc) if doc.is_file() else None
            secs = cache[name]
            if secs is None:
                problems.append(f"{where}:{_line(text, m.start())}: docs/{name}.md does not exist")
                continue
            for ref in SECTION.finditer(m[2]):
                checked += 1
                for number in filter(None, (ref[1], ref[2])):
                    if number not in secs:
                        problems.append(f"{where}:{_line(text, m.start())}: docs/{name}.md has no section {number} "
                                        f"(cited as {ref[0]!r})")
                if ref[3] and ref[1] in secs and not any(
                        (item := LIST_ITEM.match(line)) and item[1] == ref[3] for line in secs[ref[1]]):
                    problems.append(f"{where}:{_line(text, m.start())}: docs/{name}.md §{ref[1]} has no numbered "
                                    f"entry {ref[3]} (cited as {ref[0]!r})")
    return problems, checked


def test_no_citation_of_notes_outside_the_repository():
    found = []
    for path in code_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in OUTSIDE.finditer(text):
            found.append(f"{path.relative_to(ROOT).as_posix()}:{_line(text, m.start())}: {m[0]!r}")
    assert not found, "cite docs/<name>.md (or the paper) instead of notes outside the repository:\n" + "\n".join(found)


def test_docs_citations_point_at_existing_sections():
    problems, checked = citation_problems(code_files())
    assert not problems, "broken citations of the reference notes:\n" + "\n".join(problems)
    assert checked >= 50, f"only {checked} section citations found: is the citation pattern still right?"


def test_the_checks_catch_bad_citations(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "# see docs/infinity" ".md §4.2 step 11, §99.1 and docs/nowhere" ".md §1\n"
        "# as in docs/hart" ".md §2.2 item 42\n"
        "# per reference" "/infinity" ".md §4.2, and hart" ".md §3\n",
        encoding="utf-8",
    )
    problems, checked = citation_problems([planted], root=tmp_path)
    assert checked == 3
    assert len(problems) == 3, problems
    assert "no section 99.1" in problems[0] and "nowhere.md does not exist" in problems[1]
    assert "no numbered entry 42" in problems[2]
    outside = [m[0] for m in OUTSIDE.finditer(planted.read_text(encoding="utf-8"))]
    assert outside == ["reference" "/infinity" ".md", "hart" ".md"]
