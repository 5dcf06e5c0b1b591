"""Every relative link in README.md and docs/*.md reaches a file, and its #anchor a heading."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), images too
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def _prose(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks, inline code spans removed (a link in code
    is an example, not a link)."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if not fence:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page: lower case, punctuation other than
    '-' and '_' dropped, spaces to '-'; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """``page``'s relative links whose file, or whose #anchor in a markdown file, does not exist."""
    text = page.read_text()
    bad = []
    for line in _prose(text):
        for target in _LINK.findall(line):
            if _EXTERNAL.match(target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{target}: no file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_docs_pages_exist():
    """The README links the topic pages; a page removed without its link fails above, this names
    the pages the README promises."""
    names = {p.name for p in PAGES}
    assert {"checking.md", "verdicts.md", "porting.md", "training.md", "data_parallel.md", "benchmarks.md",
            "extending.md", "engine.md", "results.md"} <= names


def test_planted_broken_links_are_found(tmp_path):
    """The checker itself: a missing file, a missing heading in another page and in its own page
    are each reported; a good file link, a good anchor, a link in code and a URL are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Data-parallel training: `torch` DDP\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A heading\n\n"
        "[ok](other.md) [ok](other.md#data-parallel-training-torch-ddp) [ok](#a-heading) "
        "[url](https://example.com/x.md#nowhere) `[code](missing_in_code.md)`\n"
        "```\n[fenced](missing_in_fence.md)\n```\n"
        "[gone](missing.md) [gone](other.md#no-such-heading) ![img](img/missing.png) [gone](#nowhere)\n")
    bad = broken_links(page)
    assert [b.split(":")[0] for b in bad] == ["missing.md", "other.md#no-such-heading", "img/missing.png",
                                              "#nowhere"], bad
