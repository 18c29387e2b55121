"""The settings' documentation: the table in the README (or docs/) and `--help`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DECLARATIONS
from gateway.settings_docs import (
    BEGIN,
    DOCUMENTS,
    END,
    documents,
    main,
    plain,
    settings_help,
    settings_table,
    table_in,
    with_table,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_documented_table_is_the_generated_one() -> None:
    candidates = [p for pattern in DOCUMENTS for p in sorted(ROOT.glob(pattern))]
    for path in candidates:  # a lone or misplaced marker would hide the table from the check
        text = path.read_text(encoding="utf-8")
        if BEGIN in text or END in text:
            assert table_in(text) is not None, f"{path.name}: {BEGIN} must come before {END}"
    found = documents(ROOT)
    assert found, f"no {' or '.join(DOCUMENTS)} holds {BEGIN} ... {END}"
    for path in found:
        assert table_in(path.read_text(encoding="utf-8")) == settings_table(), (
            f"{path.relative_to(ROOT)}: the settings table is stale; run `make settings-table`"
        )


def test_the_table_has_one_row_per_declaration() -> None:
    rows = settings_table().splitlines()[2:]
    assert len(rows) == len(DECLARATIONS)
    assert rows[0].startswith("| `GATEWAY_CONFIG` |")
    assert "| `GATEWAY_API_KEY` / `GATEWAY_API_KEY_FILE` |" in settings_table()
    assert all(row.count(" | ") == 2 for row in rows)  # no help text breaks the columns


def test_with_table_replaces_only_what_lies_between_the_markers() -> None:
    text = f"# Settings\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n"
    new = with_table(text)
    assert new.startswith(f"# Settings\n\n{BEGIN}\n\n| env |")
    assert new.endswith(f"|\n\n{END}\n\nafter\n")
    assert table_in(new) == settings_table()
    assert with_table(new) == new
    with pytest.raises(ValueError, match="markers"):
        with_table("no table here")


def test_write_finds_the_table_in_the_readme_or_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README.md").write_text("# Gateway\n\nsee docs/configuration.md\n")
    assert main(["--write", "--root", str(tmp_path)]) == 1
    assert "no document holds" in capsys.readouterr().err
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "configuration.md"
    page.write_text(f"# Configuration\n\n{BEGIN}\n{END}\n")
    assert main(["--write", "--root", str(tmp_path)]) == 0
    assert table_in(page.read_text()) == settings_table()
    assert (tmp_path / "README.md").read_text() == "# Gateway\n\nsee docs/configuration.md\n"


def test_print_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == settings_table()


def test_help_lists_each_setting_in_plain_text() -> None:
    text = settings_help()
    assert "`" not in text
    assert "  GATEWAY_LISTEN=127.0.0.1:8080\n      public listener host:port\n" in text
    assert "  GATEWAY_UPSTREAM_URL (unset)\n" in text
    assert "  GATEWAY_API_KEY / GATEWAY_API_KEY_FILE (required for serve)\n" in text
    assert all(len(line) <= 79 for line in text.splitlines())


def test_plain_keeps_a_links_text() -> None:
    assert plain("see [docs/console.md](docs/console.md) at `/console`") == (
        "see docs/console.md at /console"
    )
