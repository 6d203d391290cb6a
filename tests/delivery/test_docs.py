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


def test_mermaid_diagrams_become_elements_the_site_script_draws() -> None:
    """The site renders a ```mermaid fence as an element of class "mermaid" (Mermaid's script
    draws those), not as highlighted code."""
    import markdown
    from mkdocs.config import load_config

    config = load_config(str(REPO / "mkdocs.yml"))
    md = markdown.Markdown(
        extensions=config["markdown_extensions"], extension_configs=config["mdx_configs"]
    )
    html = md.convert((REPO / "docs" / "recipes" / "s3.md").read_text())
    assert '<pre class="mermaid"><code>' in html and "flowchart" in html.split("mermaid", 1)[1]
    assert any("mermaid" in str(js) for js in config["extra_javascript"])
