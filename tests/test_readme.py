"""The documentation says what the code does: docs/configuration.md is generated from the
settings (docs/gen_configuration.py), and the README keeps its two commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

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
