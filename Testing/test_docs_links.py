"""The documentation holds together: every relative link in README.md and docs/*.md leads to a file of the
repository (and to a heading, for a link with #anchor), every docs page is reachable from the front page and opens
by saying who needs it, and the front page stays short enough to read in five minutes."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import REPOSITORY

FRONT_PAGE = REPOSITORY / "README.md"
DOCS = sorted((REPOSITORY / "docs").glob("*.md"))
FRONT_PAGE_LIMIT = 12_000  # bytes: "at most 12 KB" read the strict way (issue 31)

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_TARGET = re.compile(r"""<(?:a|img)\b[^>]*?\s(?:href|src)=["']([^"']+)["']""", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"""<[^>]+\s(?:id|name)=["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (a '# comment' in a bash block is no heading, a link there none)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every #anchor a link into ``page`` may use: heading slugs (repeats get -1, -2, ...) and HTML ids/names."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def link_targets(page: Path) -> list[str]:
    """The targets of the page's inline links and images, reference definitions and HTML href/src attributes."""
    targets = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        targets += HTML_TARGET.findall(line) + REFERENCE_DEFINITION.findall(line)
        targets += INLINE_LINK.findall(CODE_SPAN.sub("code", line))  # `[a](b)` in a code span is no link
    return targets


def broken_links(page: Path, root: Path) -> list[str]:
    """One line per relative link of ``page`` that leads nowhere inside ``root`` (external URLs are not checked)."""
    problems = []
    for target in link_targets(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, anchor = unquote(target).partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if path_part.startswith("/") or not destination.is_relative_to(root.resolve()):
            problems.append(f"{page.name}: {target} leads outside the repository")
        elif not destination.exists():
            problems.append(f"{page.name}: {target} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{page.name}: {target} names no heading of {destination.name}")
    return problems


@pytest.mark.parametrize("page", [FRONT_PAGE, *DOCS], ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page, REPOSITORY), "\n".join(broken_links(page, REPOSITORY))


def test_the_front_page_is_at_most_12_kb():
    size = len(FRONT_PAGE.read_bytes())
    assert size <= FRONT_PAGE_LIMIT, f"README.md is {size} bytes; move detail to a page under docs/ and link it"


def test_every_docs_page_is_linked_from_the_front_page_and_says_who_needs_it():
    linked = {(FRONT_PAGE.parent / unquote(t).partition("#")[0]).resolve() for t in link_targets(FRONT_PAGE)}
    assert DOCS, "no docs/*.md found"
    for page in DOCS:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(REPOSITORY)}"
        blocks = [b.strip() for b in page.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        assert blocks[0].startswith("# ") and "\n" not in blocks[0], f"{page.name} must open with one title line"
        assert blocks[1][0].isalpha(), f"{page.name}: the title must be followed by a paragraph on who needs the page"


def test_the_checker_finds_each_kind_of_broken_link(tmp_path):
    """The checks above can fail: a page with one good and five broken links of every kind."""
    (tmp_path / "docs").mkdir()
    other = "# Other page\n\n## Speed, memory (`--mode`)\n\n## Speed, memory (`--mode`)\n"
    (tmp_path / "docs" / "other.md").write_text(other)
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Quick start\n\n"
        "[good](other.md#speed-memory---mode) [again](other.md#speed-memory---mode-1) [here](#quick-start)\n"
        "[external](https://example.org/missing) `[in code](missing-in-code.md)`\n"
        "```bash\n# not a heading\n[in a fence](missing-in-fence.md)\n```\n"
        "[gone](missing.md) ![picture](../missing.png) [bad anchor](other.md#no-such-heading)\n"
        "[here, wrong](#not-a-heading) [outside](../../shared/data.md)\n"
    )
    problems = broken_links(page, tmp_path)
    assert problems == [
        "page.md: missing.md does not exist",
        "page.md: ../missing.png does not exist",
        "page.md: other.md#no-such-heading names no heading of other.md",
        "page.md: #not-a-heading names no heading of page.md",
        "page.md: ../../shared/data.md leads outside the repository",
    ]
    assert anchors(page) == {"page", "quick-start"}
