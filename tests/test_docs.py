"""The README is read by users who have only this repository: every file it links to is in it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_points_only_inside_the_repository():
    assert "../" not in README, "the README names a path outside the repository"


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)\)", README)
    assert "docs/architecture.md" in links
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert missing == []


def test_architecture_doc_names_every_stage():
    from edgekd.stages import STAGE_NAMES

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert [name for name in STAGE_NAMES if name not in text] == []
