"""How the browser shim is served: minified, small, versioned, with its SRI hash."""

from __future__ import annotations

import base64
import gzip
import hashlib

import pytest

from gateway.cli import main
from gateway.shim import SHIM_PATH, ShimFile, loader_snippet, minify, pinned_snippet
from tests.conftest import GatewayFactory
from tests.servers import ROOT

# The budget for the shim as a browser downloads it.
MAX_GZIPPED_BYTES = 4000  # "under 4 KB" in either reading of a kilobyte


def test_minify_drops_comments_and_spacing_only() -> None:
    source = (
        "/*! licence */\n"
        "// a comment line\n"
        "const a = 1, b = a / 2; // trailing\n"
        "  /* block */ const re = /\\/+$/g, s = 'x  // not a comment', t = \"y /* no */\";\n"
        "let c = a - -b + +a;\n"
        "return typeof /x/.exec(s)\n"
    )
    assert minify(source) == (
        "/*! licence */\n"
        "const a=1,b=a/2;const re=/\\/+$/g,s='x  // not a comment',t=\"y /* no */\";"
        "let c=a- -b+ +a;return typeof/x/.exec(s)\n"
    )


@pytest.mark.parametrize(
    ("source", "minified"),
    [
        # A line break that could end a statement stays: after a call, a regular
        # expression, `++`, a word; before a word or `.`.
        ("f()\nx = 1\n", "f()\nx=1\n"),
        ("a = /x/\ng()\n", "a=/x/\ng()\n"),
        ("i++\nj\n", "i++\nj\n"),
        ("return\nx\n", "return\nx\n"),
        ("a\n.5\n", "a\n.5\n"),
        # One that cannot: after `{ ( [ , ; = && ?` and before `) ] } , ; ? :`.
        ("f(\na,\nb\n)\n", "f(a,b)\n"),
        ("if (x) {\ny = a &&\nb ?\nc\n: d\n}\n", "if(x){y=a&&b?c:d}\n"),
    ],
)
def test_minify_keeps_a_line_break_only_where_it_can_end_a_statement(
    source: str, minified: str
) -> None:
    assert minify(source) == minified


def test_minify_refuses_template_literals() -> None:
    with pytest.raises(ValueError, match="template literals"):
        minify("const a = `x`;")


def test_shim_gzipped_size_is_under_4_kb(capsys: pytest.CaptureFixture[str]) -> None:
    shim = ShimFile.load()
    size = len(gzip.compress(shim.body, 9))
    with capsys.disabled():
        print(
            f"\nortto-relay.js: {len(SHIM_PATH.read_bytes())} bytes of source, "
            f"{len(shim.body)} served, {size} gzipped"
        )
    assert size < MAX_GZIPPED_BYTES


def test_version_and_integrity_are_hashes_of_the_served_bytes() -> None:
    shim = ShimFile.load()
    assert shim.version == hashlib.sha256(shim.body).hexdigest()[:20]
    assert shim.file_name == f"ortto-relay.{shim.version}.js"
    digest = base64.b64encode(hashlib.sha384(shim.body).digest()).decode()
    assert shim.integrity == f"sha384-{digest}"


def test_loader_snippet_fills_the_source_and_attributes() -> None:
    snippet = loader_snippet("/x/ortto-relay.js", {"data-debug": "", "data-consent": "required"})
    assert snippet.startswith("<script>\n") and snippet.endswith("</script>")
    assert '"/x/ortto-relay.js", {"data-debug": "", "data-consent": "required"});' in snippet
    assert "{{" not in snippet


async def test_plain_and_versioned_urls(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    shim = ShimFile.load()
    plain = await client.get("/ortto-relay.js")
    assert plain.status == 200
    assert await plain.read() == shim.body
    assert plain.headers["Cache-Control"] == "public, max-age=3600"
    assert plain.headers["ETag"] == f'"{shim.version}"'
    assert plain.headers["Content-Type"] == "application/javascript; charset=utf-8"

    pinned = await client.get(f"/{shim.file_name}")
    assert pinned.status == 200
    assert await pinned.read() == shim.body
    assert pinned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert pinned.headers["ETag"] == f'"{shim.version}"'
    again = await client.get(f"/{shim.file_name}", headers={"If-None-Match": f'"{shim.version}"'})
    assert again.status == 304

    # A page pinned to an older version is sent to this one (relative: a proxy's prefix stays).
    old = await client.get("/ortto-relay.0123456789abcdef0123.js", allow_redirects=False)
    assert old.status == 302
    assert old.headers["Location"] == shim.file_name
    assert old.headers["Cache-Control"] == "no-cache"
    assert (await client.get("/ortto-relay.XYZ.js")).status == 404


def test_cli_prints_the_pinned_snippet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shim", "--prefix", "https://gw.example.com"], environ={}) == 0
    out = capsys.readouterr().out
    shim = ShimFile.load()
    assert out == pinned_snippet(shim, "https://gw.example.com") + "\n"
    assert f'"https://gw.example.com/{shim.file_name}"' in out
    assert f'"integrity": "{shim.integrity}", "crossorigin": "anonymous"' in out


def test_readme_snippet_is_current() -> None:
    """docs/shim.md's loader names the served file's versioned URL and SRI hash, so it never
    goes stale: after changing the shim, paste `ortto-gateway shim`'s output there."""
    readme = (ROOT / "docs" / "shim.md").read_text(encoding="utf-8")
    marker = "<!-- ortto-gateway shim: begin -->\n```html\n"
    begin = readme.index(marker) + len(marker)
    end = readme.index("\n```\n<!-- ortto-gateway shim: end -->")
    expected = pinned_snippet(ShimFile.load(), "/ortto/")
    assert readme[begin:end] == expected, "docs/shim.md is stale: paste `ortto-gateway shim` output"
