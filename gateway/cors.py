"""Cross-origin policy: which browser origins may call the gateway, and the CORS headers."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

_DEFAULT_PORTS = {"http": 80, "https": 443}
# scheme "://" host [ ":" port ]: a DNS name (underscores occur in real names, a trailing dot
# makes a distinct origin), an IPv4 address (matched as a name) or a bracketed IPv6 address.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE | re.ASCII,
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class OriginCheck(enum.StrEnum):
    """What the Origin header of a request says about it."""

    NONE = "none"  # no Origin: not a browser, or a same-origin GET; allowed, no CORS headers
    SAME = "same"  # the request's own scheme://host; allowed, no CORS headers needed
    ALLOWED = "allowed"  # a listed cross origin; allowed, with CORS headers
    REFUSED = "refused"  # anything else, "null" included


def normalise_origin(text: str) -> str | None:
    """The serialised origin ("https://shop.example", default port dropped), or None."""
    match = _ORIGIN.fullmatch(text)
    if match is None:
        return None
    scheme = match["scheme"].lower()
    host = match["host"].lower()
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    port = match["port"]
    if port is None:
        return f"{scheme}://{host}"
    number = int(port)
    if number > 65535:
        return None
    if number == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{number}"


def _header_list(kind: str, names: Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated header or method names (they end up in response headers)."""
    if isinstance(names, str):
        raise ValueError(f"{kind} must be a sequence of names, not the string {names!r}")
    result: list[str] = []
    seen: set[str] = set()
    for name in names:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid {kind} entry {name!r}")
        if name.lower() not in seen:
            seen.add(name.lower())
            result.append(name)
    return tuple(result)


class CorsPolicy:
    """Allowed origins and the CORS response headers for each, computed once at start-up.

    There is no "*": a public endpoint that accepts writes must name the origins it serves.
    "null" (sandboxed iframes, file: pages, some redirects) is shared by unrelated documents,
    so it is always refused. No credentials header is sent: the gateway uses no cookies.
    """

    __slots__ = ("_allow_headers", "_allow_methods", "_preflight", "_response", "origins")

    def __init__(
        self,
        allowed_origins: Iterable[str],
        *,
        max_age: int = 86400,
        allow_methods: Sequence[str] = ("POST", "OPTIONS"),
        allow_headers: Sequence[str] = ("Content-Type",),
        expose_headers: Sequence[str] = ("Retry-After", "X-Request-Id"),
    ) -> None:
        origins: list[str] = []
        for entry in allowed_origins:
            text = entry.strip()
            if not text:
                continue
            if text == "*":
                raise ValueError(
                    'allowed origin "*" is not supported: a public endpoint must name its origins'
                )
            if text.lower() == "null":
                raise ValueError(
                    'allowed origin "null" is not supported: unrelated documents share it'
                )
            # One trailing slash is forgiven: it is how origins are often copied from a browser.
            origin = normalise_origin(text.removesuffix("/"))
            if origin is None:
                raise ValueError(
                    f"invalid allowed origin {entry!r}: expected scheme://host[:port] with "
                    "scheme http or https and an ASCII (punycode) host"
                )
            if origin not in origins:
                origins.append(origin)
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
            raise ValueError(f"max_age must be a whole number of seconds >= 0, not {max_age!r}")
        methods = tuple(m.upper() for m in _header_list("allow_methods", allow_methods))
        headers = _header_list("allow_headers", allow_headers)
        exposed = _header_list("expose_headers", expose_headers)

        self.origins: tuple[str, ...] = tuple(origins)
        self._allow_methods = frozenset(methods)
        self._allow_headers = frozenset(h.lower() for h in headers)
        self._response: dict[str, Mapping[str, str]] = {}
        self._preflight: dict[str, Mapping[str, str]] = {}
        for origin in self.origins:
            response = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if exposed:
                response["Access-Control-Expose-Headers"] = ", ".join(exposed)
            preflight = dict(response)
            preflight["Access-Control-Allow-Methods"] = ", ".join(methods)
            if headers:
                preflight["Access-Control-Allow-Headers"] = ", ".join(headers)
            preflight["Access-Control-Max-Age"] = str(max_age)
            self._response[origin] = MappingProxyType(response)
            self._preflight[origin] = MappingProxyType(preflight)

    def _listed(self, origin: str) -> str | None:
        """The listed origin that `origin` denotes, if any; exact browser spelling is one lookup."""
        if origin in self._response:
            return origin
        normalised = normalise_origin(origin)
        return normalised if normalised in self._response else None

    def lists(self, origin: str) -> bool:
        """Whether `origin` is one of the allowed cross origins (same-origin is not listed)."""
        return self._listed(origin) is not None

    def check(self, origin: str | None, host: str | None, scheme: str) -> OriginCheck:
        """Classify a request by its Origin header, its Host header and its public scheme.

        `scheme` must be the scheme the browser used (from a trusted proxy's X-Forwarded-Proto
        when TLS ends at the proxy), or same-origin requests will look cross-origin.
        """
        if origin is None:
            return OriginCheck.NONE
        if origin in self._response:
            return OriginCheck.ALLOWED
        # Browsers omit default ports in both headers, so this is usually an exact match.
        if host is not None and origin == f"{scheme}://{host}":
            return OriginCheck.SAME
        normalised = normalise_origin(origin)
        if normalised is None:
            return OriginCheck.REFUSED
        if normalised in self._response:
            return OriginCheck.ALLOWED
        if host is not None and normalised == normalise_origin(f"{scheme}://{host}"):
            return OriginCheck.SAME
        return OriginCheck.REFUSED

    def response_headers(self, origin: str) -> Mapping[str, str]:
        """The CORS headers for a response to an allowed cross origin (ValueError otherwise)."""
        listed = self._listed(origin)
        if listed is None:
            raise ValueError(f"origin {origin!r} is not allowed")
        return self._response[listed]

    def preflight_headers(
        self, origin: str, request_method: str | None, request_headers: str | None
    ) -> Mapping[str, str] | None:
        """The headers answering a preflight, or None if the origin, the method
        (Access-Control-Request-Method) or any requested header name is not allowed."""
        listed = self._listed(origin)
        if listed is None or request_method is None:
            return None
        if request_method.strip().upper() not in self._allow_methods:
            return None
        if request_headers:
            for name in request_headers.split(","):
                name = name.strip().lower()
                if name and name not in self._allow_headers:
                    return None
        return self._preflight[listed]
