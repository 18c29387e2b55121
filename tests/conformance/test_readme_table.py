"""The table in docs/http-interface.md (what the browser sends, what the gateway does, why)
and the corpus say the same: every case is cited by a row, every cited case exists, and a
row that refuses cites only cases the gateway refuses (and the other rows none)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conformance.corpus import load_cases

README = Path(__file__).resolve().parents[2] / "docs" / "http-interface.md"
HEADER = "| what the browser sends | what the gateway does | why | corpus cases |"


def table_rows() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    lines = text[text.index(HEADER) :].splitlines()[2:]  # past the header and the rule
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        # Cells split on " | " (a "|" inside backticks never has spaces on both sides).
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_every_row_has_its_four_cells_and_cites_real_cases() -> None:
    rows = table_rows()
    assert len(rows) >= 10
    names = {case.name for case in load_cases()}
    cited: set[str] = set()
    for row in rows:
        assert len(row) == 4, row
        for name in re.findall(r"`([^`]+)`", row[3]):
            assert name in names, f"README cites unknown case {name!r}"
            cited.add(name)
    assert names - cited == set(), "corpus cases no README row cites"


def test_refusing_rows_cite_refused_cases_and_only_those() -> None:
    expect = {case.name: case.gateway["expect"] for case in load_cases()}
    for sends, does, _why, cases in table_rows():
        refuses = bool(re.match(r"4\d\d\b", does))
        for name in re.findall(r"`([^`]+)`", cases):
            assert (expect[name] == "refuse") == refuses, (sends, name, expect[name])
