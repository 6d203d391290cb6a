"""The front page's links: every relative link in README.md names a file of the repository
(the pages under docs/ are checked by `mkdocs build --strict`, which scripts/test.sh runs)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def relative_links(markdown: str) -> list[str]:
    return [m.group(1) for m in LINK.finditer(markdown) if "://" not in m.group(1)]


def test_link_pattern_finds_relative_links_only() -> None:
    text = "[a](docs/a.md) [b](https://example.org/x) [c](docs/c.md#part)"
    assert relative_links(text) == ["docs/a.md", "docs/c.md"]


def test_readme_links_resolve() -> None:
    links = relative_links((REPO / "README.md").read_text())
    assert "docs/configuration.md" in links
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_page_is_in_the_site_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    absent = [p for p in pages if f": {p}" not in nav]
    assert not absent, f"mkdocs.yml nav lacks: {absent}"
