"""Every image and every local file that the README and docs/ link to exists (a figure that a
page shows must be in the repository, regenerable or not)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")


def local_links(page: Path) -> list[tuple[bool, str]]:
    """(is an image, target) of the page's Markdown links to local files (no URLs, no
    in-page anchors; an anchor after a file name is dropped)."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are examples
    out = []
    for bang, target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        out.append((bool(bang), target.split("#", 1)[0]))
    return out


def test_the_pages_have_links_to_check():
    images = [t for page in PAGES for is_image, t in local_links(page) if is_image]
    assert len(PAGES) > 5 and len(images) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_linked_image_and_file_exists(page):
    missing = [target for _, target in local_links(page)
               if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
