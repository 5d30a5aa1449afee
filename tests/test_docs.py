"""The documentation's links and nav, without building the site (`make docs` does that, with --strict).

Every relative link in README.md and docs/ must point to a file that exists (GitHub renders both), every page in
docs/ must be in mkdocs.yml's nav (no orphaned page), and every file a page includes with pymdownx.snippets must
exist.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SNIPPET = re.compile(r"^-{1,3}8<-{1,3} \"([^\"]+)\"", re.MULTILINE)


def pages() -> list[Path]:
    """Every Markdown page of the site: docs/ without its build hooks."""
    return sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.relative_to(DOCS).parts)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where a bracket is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """The link and image targets of a Markdown text that are paths in the repository (no URL, no bare anchor)."""
    out = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ...; an anchor in the same page
        out.append(target.split("#", 1)[0])
    return out


def nav_pages(node) -> set[str]:
    """Every page path in a parsed mkdocs.yml nav, at any depth."""
    if isinstance(node, str):
        return {node}
    if isinstance(node, list):
        return set().union(*(nav_pages(n) for n in node)) if node else set()
    if isinstance(node, dict):
        return set().union(*(nav_pages(v) for v in node.values())) if node else set()
    return set()


def test_link_parser_finds_what_github_renders():
    text = (
        'See [a](docs/a.md) and ![img](../results/x.png "title"), [web](https://x.org), [top](#here), '
        "[part](b.md#sec), `[not](a link)`.\n```\n[not](either.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "../results/x.png", "b.md"]


@pytest.mark.parametrize("page", [ROOT / "README.md", *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).resolve().exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages()}
    assert not on_disk - nav, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - nav)}"
    assert not nav - on_disk, f"mkdocs.yml's nav names pages that do not exist: {sorted(nav - on_disk)}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_included_files_exist(page):
    missing = [s for s in SNIPPET.findall(page.read_text()) if not (ROOT / s).exists()]
    assert not missing, f"{page.relative_to(ROOT)} includes files that do not exist: {missing}"
