"""Every relative link and image in README.md and docs/*.md resolves to a file or folder of the repository, and
every #anchor to a heading of the page it points into (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target), ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    ids, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def _links(doc: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(doc.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_heading_ids_follow_github():
    text = "# A b\n## Speed: the recipe's `UNet2DModel`\n## Peers (`benchmarks/peers.py`)\n## A b\n```\n# not one\n```\n"
    assert heading_ids(text) == {"a-b", "speed-the-recipes-unet2dmodel", "peers-benchmarkspeerspy", "a-b-1"}


def test_the_documents_have_links():
    assert len(_links(ROOT / "README.md")) >= 10  # the checks below would pass vacuously on a parse that finds none


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `doc` whose file (inside `root`) or heading is missing."""
    broken = []
    for target in _links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if path and (not file.exists() or (file != root and root not in file.parents)):
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(root)}")
    return broken


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# There\n")
    (tmp_path / "doc.md").write_text("## Here\n[ok](#here) [ok](other.md#there) [gone](no-such.md) ![img](gone.png) "
                                     "[x](other.md#nowhere) [y](#nowhere) `[code](x.md)` [web](https://x)\n")
    found = [b.split(": ")[0] for b in broken_links(tmp_path / "doc.md", tmp_path.resolve())]
    assert found == ["no-such.md", "gone.png", "other.md#nowhere", "#nowhere"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
