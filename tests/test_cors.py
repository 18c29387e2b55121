"""Tests for gateway.cors: origin normalisation, the origin check and the CORS headers."""

from __future__ import annotations

import pytest

from gateway.cors import CorsPolicy, OriginCheck, normalise_origin

POLICY = CorsPolicy(
    ["https://shop.example", "HTTPS://Blog.Example:443/", "http://localhost:3000", "http://[::1]"]
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://shop.example", "https://shop.example"),
        ("HTTPS://SHOP.Example", "https://shop.example"),
        ("https://shop.example:443", "https://shop.example"),
        ("https://shop.example:0443", "https://shop.example"),
        ("http://shop.example:80", "http://shop.example"),
        ("http://shop.example:443", "http://shop.example:443"),
        ("https://shop.example:80", "https://shop.example:80"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[0:0::1]:8080", "http://[::1]:8080"),
        ("http://[2001:DB8::1]", "http://[2001:db8::1]"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        ("https://my_host.example", "https://my_host.example"),
        ("https://shop.example.", "https://shop.example."),
    ],
)
def test_normalise_origin(text: str, expected: str) -> None:
    assert normalise_origin(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "*",
        "shop.example",
        "ftp://shop.example",
        "chrome-extension://abcdef",
        "https://",
        "https://shop.example/",
        "https://shop.example/path",
        "https://shop.example?q",
        "https://shop.example#f",
        "https://user@shop.example",
        "https://shop.example:",
        "https://shop.example:65536",
        "https://shop.example:123456",
        "https://shop..example",
        "https://.shop.example",
        "https://b\u00fccher.example",
        "https://shop.\u212aexample",  # Kelvin sign, which lower-cases to "k"
        "https://[::1",
        "https://[not:v6:::]",
        "https://[1.2.3.4]",
        "https://shop.example\r\nSet-Cookie: x=1",
        " https://shop.example",
        "https://shop.example, https://evil.example",
    ],
)
def test_normalise_origin_refuses(text: str) -> None:
    assert normalise_origin(text) is None


def test_origins_are_normalised_and_deduplicated() -> None:
    policy = CorsPolicy(
        [" https://Shop.Example/ ", "https://shop.example:443", "", "http://[::1]:80"]
    )
    assert policy.origins == ("https://shop.example", "http://[::1]")
    assert CorsPolicy([]).origins == ()
    assert CorsPolicy([""]).origins == ()


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        (["*"], "must name its origins"),
        (["https://shop.example", " * "], "must name its origins"),
        (["null"], '"null" is not supported'),
        (["shop.example"], "invalid allowed origin 'shop.example'"),
        (["https://shop.example/app"], "invalid allowed origin 'https://shop.example/app'"),
        (["https://b\u00fccher.example"], "punycode"),
        (["ftp://files.example"], "invalid allowed origin 'ftp://files.example'"),
    ],
)
def test_bad_origins_are_named(origins: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CorsPolicy(origins)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_age": -1}, "max_age"),
        ({"max_age": True}, "max_age"),
        ({"allow_methods": ("POST", "BAD METHOD")}, "allow_methods entry 'BAD METHOD'"),
        ({"allow_methods": "POST"}, "not the string"),
        ({"allow_headers": ("Content-Type\r\nX: y",)}, "allow_headers entry"),
        ({"expose_headers": ("",)}, "expose_headers entry"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CorsPolicy(["https://shop.example"], **kwargs)  # type: ignore[arg-type]


# (Origin, Host, scheme, expected)
CHECKS: list[tuple[str | None, str | None, str, OriginCheck]] = [
    # No Origin: curl, servers, same-origin GET.
    (None, "gw.example", "https", OriginCheck.NONE),
    (None, None, "http", OriginCheck.NONE),
    # Same origin, including default ports spelled out on either side.
    ("https://gw.example", "gw.example", "https", OriginCheck.SAME),
    ("https://gw.example", "gw.example:443", "https", OriginCheck.SAME),
    ("https://gw.example:443", "gw.example", "https", OriginCheck.SAME),
    ("https://GW.example", "gw.EXAMPLE", "HTTPS", OriginCheck.SAME),
    ("http://gw.example:8080", "gw.example:8080", "http", OriginCheck.SAME),
    ("http://[::1]:8080", "[::1]:8080", "http", OriginCheck.SAME),
    # Not the same origin: scheme or port differ, or no Host to compare with.
    ("http://gw.example", "gw.example", "https", OriginCheck.REFUSED),
    ("https://gw.example", "gw.example", "http", OriginCheck.REFUSED),
    ("https://gw.example:8443", "gw.example", "https", OriginCheck.REFUSED),
    ("https://gw.example", None, "https", OriginCheck.REFUSED),
    ("https://gw.example", "gw.example/evil", "https", OriginCheck.REFUSED),
    # Listed cross origins, as browsers send them and in other spellings.
    ("https://shop.example", "gw.example", "https", OriginCheck.ALLOWED),
    ("https://blog.example", "gw.example", "https", OriginCheck.ALLOWED),
    ("HTTPS://Shop.Example:443", "gw.example", "https", OriginCheck.ALLOWED),
    ("http://localhost:3000", "localhost:8080", "http", OriginCheck.ALLOWED),
    ("http://[::1]", "gw.example", "https", OriginCheck.ALLOWED),
    ("https://shop.example", None, "https", OriginCheck.ALLOWED),
    # Everything else.
    ("https://evil.example", "gw.example", "https", OriginCheck.REFUSED),
    ("http://shop.example", "gw.example", "https", OriginCheck.REFUSED),
    ("https://shop.example:8443", "gw.example", "https", OriginCheck.REFUSED),
    ("https://shop.example.evil.example", "gw.example", "https", OriginCheck.REFUSED),
    ("http://localhost:3001", "gw.example", "https", OriginCheck.REFUSED),
    ("null", "gw.example", "https", OriginCheck.REFUSED),
    ("null", "null", "https", OriginCheck.REFUSED),
    ("", "gw.example", "https", OriginCheck.REFUSED),
    ("https://shop.example/", "gw.example", "https", OriginCheck.REFUSED),
    ("https://shop.example, https://evil.example", "gw.example", "https", OriginCheck.REFUSED),
]


@pytest.mark.parametrize(("origin", "host", "scheme", "expected"), CHECKS)
def test_check(origin: str | None, host: str | None, scheme: str, expected: OriginCheck) -> None:
    assert POLICY.check(origin, host, scheme) is expected


def test_origin_check_values() -> None:
    assert [c.value for c in OriginCheck] == ["none", "same", "allowed", "refused"]
    assert f"{OriginCheck.ALLOWED}" == "allowed"  # a str, for logs and metric labels


def test_null_is_refused_even_when_the_request_is_same_origin_looking() -> None:
    assert CorsPolicy([]).check("null", "gw.example", "https") is OriginCheck.REFUSED


def test_response_headers() -> None:
    headers = POLICY.response_headers("https://shop.example")
    assert dict(headers) == {
        "Access-Control-Allow-Origin": "https://shop.example",
        "Vary": "Origin",
        "Access-Control-Expose-Headers": "Retry-After, X-Request-Id",
    }
    assert "Access-Control-Allow-Credentials" not in headers
    # Precomputed: the same mapping every time, and read-only.
    assert POLICY.response_headers("https://shop.example") is headers
    with pytest.raises(TypeError):
        headers["Vary"] = "*"  # type: ignore[index]


def test_response_headers_for_another_spelling_name_the_listed_origin() -> None:
    headers = POLICY.response_headers("HTTPS://BLOG.EXAMPLE:443")
    assert headers["Access-Control-Allow-Origin"] == "https://blog.example"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "", "garbage"])
def test_response_headers_refuse_unlisted(origin: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        POLICY.response_headers(origin)


def test_lists() -> None:
    assert POLICY.lists("https://shop.example")
    assert POLICY.lists("HTTPS://BLOG.EXAMPLE:443")
    for origin in ("https://evil.example", "null", "", "garbage"):
        assert not POLICY.lists(origin)


def test_response_headers_without_exposed_headers() -> None:
    policy = CorsPolicy(["https://shop.example"], expose_headers=())
    assert "Access-Control-Expose-Headers" not in policy.response_headers("https://shop.example")


def test_preflight_headers() -> None:
    headers = POLICY.preflight_headers("https://shop.example", "POST", "content-type")
    assert headers is not None
    assert dict(headers) == {
        "Access-Control-Allow-Origin": "https://shop.example",
        "Vary": "Origin",
        "Access-Control-Expose-Headers": "Retry-After, X-Request-Id",
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type",
        "Access-Control-Max-Age": "86400",
    }


def test_preflight_settings() -> None:
    policy = CorsPolicy(
        ["https://shop.example"],
        max_age=600,
        allow_methods=("post", "PUT", "POST"),
        allow_headers=("Content-Type", "X-Custom", "content-type"),
        expose_headers=(),
    )
    headers = policy.preflight_headers("https://shop.example", "PUT", "x-custom")
    assert headers is not None
    assert dict(headers) == {
        "Access-Control-Allow-Origin": "https://shop.example",
        "Vary": "Origin",
        "Access-Control-Allow-Methods": "POST, PUT",
        "Access-Control-Allow-Headers": "Content-Type, X-Custom",
        "Access-Control-Max-Age": "600",
    }


@pytest.mark.parametrize(
    ("origin", "method", "request_headers", "allowed"),
    [
        ("https://shop.example", "POST", None, True),
        ("https://shop.example", "POST", "", True),
        ("https://shop.example", "POST", "content-type", True),
        ("https://shop.example", "POST", "Content-Type", True),
        ("https://shop.example", "POST", " content-type , ", True),
        ("https://shop.example", "post", "content-type", True),
        ("https://shop.example", "OPTIONS", None, True),
        ("https://blog.example", "POST", "content-type", True),
        ("HTTPS://SHOP.EXAMPLE", "POST", "content-type", True),
        # Method not allowed, or missing (then it is not a preflight).
        ("https://shop.example", "PUT", None, False),
        ("https://shop.example", "DELETE", "content-type", False),
        ("https://shop.example", "GET", None, False),
        ("https://shop.example", None, "content-type", False),
        ("https://shop.example", "", None, False),
        # Any requested header not allowed refuses the whole preflight.
        ("https://shop.example", "POST", "x-api-key", False),
        ("https://shop.example", "POST", "content-type, x-api-key", False),
        ("https://shop.example", "POST", "content-type,authorization", False),
        ("https://shop.example", "POST", "content-type-x", False),
        # Origin not listed.
        ("https://evil.example", "POST", "content-type", False),
        ("null", "POST", None, False),
    ],
)
def test_preflight_table(
    origin: str, method: str | None, request_headers: str | None, allowed: bool
) -> None:
    headers = POLICY.preflight_headers(origin, method, request_headers)
    assert (headers is not None) is allowed


def test_preflight_is_precomputed() -> None:
    first = POLICY.preflight_headers("https://shop.example", "POST", None)
    second = POLICY.preflight_headers("https://shop.example", "OPTIONS", "content-type")
    assert first is not None
    assert first is second


def test_no_methods_refuses_every_preflight() -> None:
    policy = CorsPolicy(["https://shop.example"], allow_methods=())
    assert policy.preflight_headers("https://shop.example", "POST", None) is None
