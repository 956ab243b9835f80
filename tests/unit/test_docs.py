"""The product documents itself: every citation of docs/design.md points at a section of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/design\.md §(\d+(?:\.\d+)?)")


def _sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def _citations() -> list[tuple[str, str]]:
    found = []
    for folder in ("worker", "tests", "bench", "docs", "config"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".toml", ".lua") and path.is_file():
                for section in CITATION.findall(path.read_text(errors="replace")):
                    found.append((str(path.relative_to(ROOT)), section))
    for section in CITATION.findall((ROOT / "README.md").read_text()):
        found.append(("README.md", section))
    return found


def test_every_design_citation_resolves() -> None:
    citations = _citations()
    assert len(citations) >= 4  # the code does cite the design
    sections = _sections()
    assert [] == [(path, s) for path, s in citations if s not in sections]


def test_no_citation_of_a_design_file_outside_the_repository() -> None:
    """The brief the team works from is not part of the product: nothing cites it."""
    offenders = []
    for folder in ("worker", "tests", "bench", "docs", "config"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".toml", ".lua") and path.is_file():
                text = path.read_text(errors="replace")
                if re.search(r"(?<!docs/)\bDESIGN\.md", text):
                    offenders.append(str(path.relative_to(ROOT)))
    assert [] == offenders
