"""The README's configuration table is generated from the settings: keep them in step."""

from __future__ import annotations

from pathlib import Path

from tactful.settings import settings_table


def test_readme_shows_the_current_settings_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert settings_table() in readme, "run `python -m tactful settings` and paste into README"
    assert "make serve" in readme and "make test" in readme
