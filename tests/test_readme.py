"""The documentation says what the code does: docs/configuration.md is generated from the
settings (docs/gen_configuration.py), the README keeps its two commands, and every relative
link between README, docs/ and bench/README.md reaches a file and a heading that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from tactful.settings import Settings

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
ROW = re.compile(r"^\| `(TACTFUL_\w+)` \| `([^`]*)` \|", re.MULTILINE)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_configuration", DOCS / "gen_configuration.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_shows_the_current_settings_table():
    page = (DOCS / "configuration.md").read_text()
    assert page == _generator().render(), "docs/configuration.md is stale: run `make docs`"


def test_every_documented_default_is_a_setting_tactful_accepts():
    page = (DOCS / "configuration.md").read_text()
    rows = ROW.findall(page)
    assert len(rows) >= 60
    for variable, default in rows:
        Settings.from_env({variable: default})  # unknown or malformed: SettingsError


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme


MARKDOWN = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)")


def _anchors(page: Path) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", CODE_BLOCK.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_files_and_headings_that_exist(page: Path):
    for target, anchor in LINK.findall(CODE_BLOCK.sub("", page.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        linked = page.parent / target if target else page
        assert linked.exists(), f"{page.name} links to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to missing {target}#{anchor}"
