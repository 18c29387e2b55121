"""The settings' documentation, generated from their declarations: the table, `--help`.

The table sits in the README (or a docs/ page) between `BEGIN` and `END`;
`python -m gateway.settings_docs --write` (`make settings-table`) regenerates it there, and
a test fails when it differs from `settings_table()`.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from gateway.config import DECLARATIONS, Declaration, env_name

BEGIN = "<!-- settings: begin -->"
END = "<!-- settings: end -->"
# Where the table may be: the README, or a page of docs/ (relative to the repository).
DOCUMENTS = ("README.md", "docs/*.md")
_LINK_RE = re.compile(r"\[([^\]]+)\]\([^)]+\)")


def env_names(d: Declaration) -> tuple[str, ...]:
    """The variables a setting is read from."""
    return tuple(env_name(n) for n in d.names)


def settings_table() -> str:
    """Every setting as a markdown table: variable, meaning, default."""
    rows = ["| env | meaning | default |", "|---|---|---|"]
    for d in DECLARATIONS:
        names = " / ".join(f"`{n}`" for n in env_names(d))
        rows.append(f"| {names} | {d.help} | {d.default} |")
    return "\n".join(rows) + "\n"


def plain(markdown: str) -> str:
    """A help text as a terminal shows it: no backticks, a link as its text."""
    return _LINK_RE.sub(r"\1", markdown).replace("`", "")


def settings_help(width: int = 79) -> str:
    """Every setting for `--help`: the variable, its default, its help text wrapped."""
    indent = " " * 6
    lines = ["settings (GATEWAY_* variables; in the --config file, the name in lower case):"]
    for d in DECLARATIONS:
        names = " / ".join(env_names(d))
        default = plain(d.default)
        # A value is shown as it would be set; a phrase ("unset", "required") in brackets.
        if d.default.startswith("`"):
            lines.append(f"  {names}={default}")
        else:
            lines.append(f"  {names} ({default})")
        lines += textwrap.wrap(
            plain(d.help), width, initial_indent=indent, subsequent_indent=indent
        )
    return "\n".join(lines)


def table_in(text: str) -> str | None:
    """The table between the markers of a document, None when it has no markers."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        return None
    return text[begin + len(BEGIN) : end].strip("\n") + "\n"


def with_table(text: str) -> str:
    """A document with the table between its markers regenerated."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {BEGIN} ... {END} markers")
    return f"{text[: begin + len(BEGIN)]}\n\n{settings_table()}\n{text[end:]}"


def documents(root: Path) -> list[Path]:
    """The documents under `root` that hold the table's markers."""
    found = [p for pattern in DOCUMENTS for p in sorted(root.glob(pattern))]
    return [p for p in found if table_in(p.read_text(encoding="utf-8")) is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or with `--write` regenerate it in the documents that hold it."""
    parser = argparse.ArgumentParser(prog="python -m gateway.settings_docs")
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"regenerate the table between the markers in {' and '.join(DOCUMENTS)}",
    )
    parser.add_argument("--root", default=".", help="the repository (default: .)")
    args = parser.parse_args(argv)
    if not args.write:
        print(settings_table(), end="")
        return 0
    paths = documents(Path(args.root))
    if not paths:
        print(f"no document holds the markers {BEGIN} ... {END}", file=sys.stderr)
        return 1
    for path in paths:
        text = path.read_text(encoding="utf-8")
        path.write_text(with_table(text), encoding="utf-8")
        print(f"wrote the settings table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
