"""Every ``page.md#anchor`` link in the docs names a heading of that page, as GitHub makes
anchors of headings: lower case, punctuation dropped, spaces as hyphens, ``-1`` after a
repeated one. (``test_reference.py`` checks that the linked files exist.)"""

from __future__ import annotations

import re

from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*)#([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
MARKUP = re.compile(r"`|\*\*|\[([^\]]*)\]\([^)]*\)")


def anchors(page) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else HEADING.match(line)
        if heading:
            text = MARKUP.sub(lambda link: link.group(1) or "", heading.group(1))
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_anchor_in_the_docs_names_a_heading():
    broken = []
    for page in PAGES:
        for target, anchor in LINK.findall(page.read_text()):
            linked = (page.parent / target) if target else page
            if "://" in target or linked.suffix != ".md" or not linked.exists():
                continue  # another site, or a missing file (test_reference.py reports it)
            if anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)} -> {target}#{anchor}")
    assert not broken, broken
