"""The browser shim as served: minified, its content-hash version, SRI hash and loader snippet.

Pure: no aiohttp. The handler serves `/ortto-relay.js` (revalidated hourly) and the immutable
`/ortto-relay.<version>.js`; `ortto-gateway shim` prints the loader snippet for a site.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).parent / "static"
SHIM_PATH = STATIC / "ortto-relay.js"
LOADER_PATH = STATIC / "loader.html"
# Hex digits of the SHA-256 in the versioned file name and the ETag: enough to never collide
# between two releases, short enough to read.
VERSION_CHARS = 20


@dataclass(frozen=True)
class ShimFile:
    """The shim's bytes and the names derived from their hash."""

    body: bytes

    @classmethod
    def load(cls, path: Path = SHIM_PATH) -> ShimFile:
        """The shim as served: its source minified."""
        return cls(minify(path.read_text(encoding="utf-8")).encode("utf-8"))

    @property
    def version(self) -> str:
        """The content hash in `ortto-relay.<version>.js` (and the ETag)."""
        return hashlib.sha256(self.body).hexdigest()[:VERSION_CHARS]

    @property
    def file_name(self) -> str:
        return f"ortto-relay.{self.version}.js"

    @property
    def integrity(self) -> str:
        """The Subresource Integrity value for a `<script integrity=...>`."""
        return "sha384-" + base64.b64encode(hashlib.sha384(self.body).digest()).decode("ascii")


def loader_snippet(src: str, attributes: dict[str, str], template: Path = LOADER_PATH) -> str:
    """The inline loader stub that loads `src` asynchronously with these script attributes."""
    text = template.read_text(encoding="utf-8")
    return (
        text.replace("{{SRC}}", json.dumps(src))
        .replace("{{ATTRIBUTES}}", json.dumps(attributes, separators=(", ", ": ")))
        .rstrip("\n")
    )


def pinned_snippet(shim: ShimFile, prefix: str) -> str:
    """The loader for the immutable versioned URL under `prefix`, with its SRI hash."""
    src = prefix.rstrip("/") + "/" + shim.file_name
    return loader_snippet(src, {"integrity": shim.integrity, "crossorigin": "anonymous"})


# The shim's source, token by token: comments, string literals, regular-expression literals
# (a `/` where an operand is expected), whitespace, words and any other character. Template
# literals are refused: their `${...}` would need a real parser.
_TOKENS = re.compile(
    r"""(?P<comment>/\*.*?\*/|//[^\n]*)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<space>\s+)
    |(?P<regex>/(?:[^/\\\n\[]|\\.|\[(?:[^\]\\\n]|\\.)*\])+/[a-z]*)
    |(?P<word>[A-Za-z0-9_$]+)
    |(?P<char>.)""",
    re.VERBOSE | re.DOTALL,
)
# After these (or at the start) a `/` begins a regular expression; elsewhere it divides.
_BEFORE_REGEX = frozenset("(,=:[!&|?{};") | {"", "return", "typeof"}
_WORDISH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
# A line break after these never ends a statement: an expression or list goes on. Not
# `+ -` (`a++` ends one), `/` (a regular expression's end), `) ] }` (a call or block can
# end a statement).
_JOINS_AFTER = frozenset("{([,;:=&|?!<>*%^~")
# ... nor before these, which cannot begin one (not `.`: `1\n.5` is two numbers).
_JOINS_BEFORE = frozenset(")]},;?:")


def minify(source: str) -> str:
    """The source without comments (but its `/*!` first line) and without the whitespace that
    separates nothing; a line break stays one, so automatic semicolons are unchanged, except
    where none can be inserted: after a token that cannot end a statement (`_JOINS_AFTER`)
    or before one that cannot begin one (`_JOINS_BEFORE`)."""
    out: list[str] = []
    space = ""  # the whitespace and comments since the last token kept
    last = ""  # the last token kept, to tell a regular expression from a division
    pos = 0
    while pos < len(source):
        match = _TOKENS.match(source, pos)
        assert match is not None  # `char` matches anything
        kind, text = match.lastgroup, match.group()
        if kind == "char" and text == "`":
            raise ValueError("the shim must not use template literals")
        if kind == "regex" and last not in _BEFORE_REGEX:
            kind, text = "char", "/"  # a division
        pos += len(text)
        if kind == "comment" and not text.startswith("/*!"):
            space += "\n" if "\n" in text or text.startswith("//") else " "
            continue
        if kind == "space":
            space += text
            continue
        if out and space:
            prev, first = out[-1][-1], text[0]
            if "\n" in space and not (prev in _JOINS_AFTER or first in _JOINS_BEFORE):
                out.append("\n")
            elif (prev in _WORDISH and first in _WORDISH) or (prev in "+-" and first in "+-"):
                out.append(" ")
        space = ""
        out.append(text)
        last = "a" if kind in ("string", "regex") else text  # a literal is an operand
    return "".join(out) + "\n"
