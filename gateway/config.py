"""Settings: one frozen dataclass built once from a TOML file and `GATEWAY_*` variables.

No other module reads `os.environ`; the environ mapping is injected so tests and
the command line build settings the same way. An environment variable wins over
the file. A bad value raises `ConfigError` whose message names the setting.

Each setting is declared once, on its field (`setting`): name, parser, default, help text
and whether it is a secret. Reading, `describe` (check-config) and the documentation
(`gateway.settings_docs`: the README's table, `--help`) all come from `DECLARATIONS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import tomllib
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote_plus, urlsplit

ENV_PREFIX = "GATEWAY_"

REGION_BASES: Mapping[str, str] = {
    "default": "https://api.ap3api.com",
    "au": "https://api.au.ap3api.com",
    "eu": "https://api.eu.ap3api.com",
}
ACTIVITIES_PATH = "/v1/activities/create"
REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)

# Ortto's own limits (activities guide): a request above them is refused by Ortto.
ORTTO_MAX_BODY_BYTES = 2 * 1024 * 1024
ORTTO_MAX_ACTIVITIES = 100
ORTTO_MAX_ACTIVITY_BYTES = 16_000  # "16 kB" per activity; the decimal reading is the safe one
ORTTO_MAX_ATTRIBUTES = 15

SUBSCRIPTION_FIELDS = frozenset({"bol::p", "bol::sp", "str::s-ctx", "str::u-ctx"})
DEFAULT_PERSON_FIELDS = ("str::email", "str::first", "str::last")
FIELD_TYPES = frozenset({"str", "txt", "int", "bol", "dtz", "tme", "phn", "geo", "sst", "obj"})
FIELD_NAME_RE = re.compile(
    r"^(str|txt|int|bol|dtz|tme|phn|geo|sst|obj):([a-z0-9-]*):([a-z0-9][a-z0-9_.-]{0,99})$"
)
ACTIVITY_ID_RE = re.compile(r"^act:[a-z0-9-]*:[a-z0-9][a-z0-9_.-]{0,99}$")

_RATE_RE = re.compile(r"^([1-9][0-9]{0,8})/([1-9][0-9]{0,6})([smhd])$")
_SECONDS_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^([0-9]+)\s*(|b|kb|kib|mb|mib|gb|gib)$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


class ConfigError(Exception):
    """A setting has a bad value; the message names it and is one line."""


# An error message quotes a bad value only up to this length: a key (or identity secret,
# at least 32 characters) pasted into the wrong setting must not be echoed to a terminal
# or a log. A longer value is shown as `mask` shows a secret, comparable but useless.
SHOWN_CHARS = 30
# Secrets shorter than this are not searched for in messages (they would mask words).
MIN_MASKED_CHARS = 4


def _shown(text: object) -> str:
    """A bad value for an error message: quoted when short and printable, else masked."""
    text = str(text)
    if len(text) <= SHOWN_CHARS and text.isprintable():
        return repr(text)
    return mask(text)


def _one_line(value: str) -> str:
    """A secret without the one line ending a file (or a secret mounted as a variable)
    ends with; anything more is left for `_secret_problem` to refuse."""
    if value.endswith("\r\n"):
        return value[:-2]
    return value.removesuffix("\n")


_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _secret_problem(value: str, *, ascii_only: bool = False) -> str | None:
    """What makes a secret unusable (whitespace, control characters), without the value.

    A line break inside a key makes every request fail (aiohttp refuses the header); a
    space around it is an editor's slip that would make it a different secret. Neither is
    fixed silently: the operator is told which setting to correct.
    """
    for i, c in enumerate(value):
        if c in _LINE_BREAKS:
            what = "a line break"
        elif c.isspace():
            what = "whitespace"
        elif unicodedata.category(c)[0] == "C":
            what = "a control character"
        elif ascii_only and not c.isascii():
            what = "a non-ASCII character"
        else:
            continue
        place = "at the start" if i == 0 else "at the end" if i == len(value) - 1 else "inside"
        return (
            f"has {what} {place}; a secret must be one line of printable characters "
            "(the value is not shown)"
        )
    return None


def _secret(value: str, where: str, *, ascii_only: bool = False) -> str:
    """`value` if it is a usable secret, else ConfigError naming `where`, never the value."""
    problem = _secret_problem(value, ascii_only=ascii_only)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return value


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` events in any window of `window` seconds."""

    count: int
    window: float
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listener address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ActivitySpec:
    """One activity browsers may send, with optional declared attributes and limits."""

    activity_id: str
    attributes: frozenset[str] | None = None  # None: any well-formed attribute name
    person_limit: Rate | None = None
    ip_limit: Rate | None = None
    person_fields: frozenset[str] | None = None  # None: the global allowlist
    strict: bool | None = None  # None: the global setting
    signed_identity: bool | None = None  # None: the global setting
    # True: a browser may name Ortto's person_id without a signed identity (see README).
    person_id: bool = False


# -- parsers: each takes the raw value and returns the typed one or raises ValueError


def is_ascii_digits(text: str) -> bool:
    """Digits 0-9 only: `str.isdigit` also takes "²" (which `int` refuses) and other
    scripts' digits (which `int` reads), from a client, a file or Ortto's headers alike."""
    return text.isascii() and text.isdigit()


def parse_rate(text: str) -> Rate:
    """`N/DURATION` as `10/1d`, `100/1h`, `3/2s`; strict: no spaces, no zero."""
    m = _RATE_RE.match(text.strip())
    if not m:
        raise ValueError(f"expected N/DURATION such as 10/1d or 100/1h, got {_shown(text)}")
    count, amount, unit = int(m[1]), int(m[2]), m[3]
    return Rate(count, amount * _UNIT_SECONDS[unit], f"{count}/{amount}{unit}")


def parse_seconds(text: str) -> float:
    """A duration: `250ms`, `2s`, `1.5`, `5m`; a bare number is seconds."""
    m = _SECONDS_RE.match(text.strip())
    if not m:
        raise ValueError(f"expected a duration such as 250ms, 2s or 5m, got {_shown(text)}")
    return float(m[1]) * _UNIT_SECONDS[m[2] or "s"]


def parse_size(text: str) -> int:
    """A byte size: `65536`, `64KiB`, `2MB`."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"expected a size such as 65536, 64KiB or 1GiB, got {_shown(text)}")
    return int(m[1]) * _SIZE_UNITS[m[2].lower()]


def parse_host_port(text: str) -> HostPort:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not is_ascii_digits(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:8080, got {_shown(text)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return HostPort(host or "0.0.0.0", int(port))


def parse_list(value: str | list[Any]) -> tuple[str, ...]:
    """A comma list (env) or a TOML array of strings."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        items = value
    else:
        items = value.split(",")
    return tuple(item.strip() for item in items if item.strip())


# A console token shorter than this is refused: the login form is the only thing between
# the network and replaying, purging and sending activities.
MIN_CONSOLE_TOKEN_CHARS = 24


def _console_token(text: str) -> str:
    token = text.strip()
    if len(token) < MIN_CONSOLE_TOKEN_CHARS or any(c.isspace() or ord(c) < 32 for c in token):
        raise ValueError(
            f"needs at least {MIN_CONSOLE_TOKEN_CHARS} characters and no spaces or control "
            "characters (e.g. `openssl rand -hex 24`)"
        )
    return token


def _host_names(value: str | list[Any]) -> tuple[str, ...]:
    names = tuple(name.lower().rstrip(".") for name in parse_list(value))
    for name in names:
        if not name or any(c in name for c in "/:@ ") or not name.isascii():
            raise ValueError(f"expected host names such as ops.example.com, got {_shown(name)}")
    return names


def parse_bool(text: str) -> bool:
    """`true/false`, `1/0`, `yes/no`, `on/off`."""
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {_shown(text)}")


def _positive_int(text: str) -> int:
    if not is_ascii_digits(text.strip()) or int(text) < 1:
        raise ValueError(f"expected a positive integer, got {_shown(text)}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a positive number, got {_shown(text)}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number, got {_shown(text)}")
    return value


def _region(text: str) -> str:
    if text not in REGION_BASES:
        raise ValueError(f"expected one of {', '.join(REGION_BASES)}, got {_shown(text)}")
    return text


def _url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {_shown(text)}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a base URL without query, fragment or credentials")
    return text.strip().rstrip("/")


# How a Redis Cluster URL's `?keys=` lays out the limiter's keys (gateway.limits.redis):
# spread per person and per IP (the default), or one slot per activity.
CLUSTER_KEYS = ("spread", "per-activity")


def _redis_url(text: str) -> str:
    text = _one_line(text)
    problem = _secret_problem(text)  # it may hold a password
    if problem:
        raise ValueError(problem)
    scheme = text.partition("://")[0]
    if scheme in ("redis+cluster", "rediss+cluster"):
        query = parse_qs(urlsplit(text).query, keep_blank_values=True)
        keys = query.get("keys", [CLUSTER_KEYS[0]])
        if len(keys) != 1 or keys[0] not in CLUSTER_KEYS:
            raise ValueError(f"a cluster URL's ?keys= is one of {', '.join(CLUSTER_KEYS)}")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_shown(text)}")
        return text

    return parse


def _cidrs(value: str | list[Any]) -> tuple[str, ...]:
    items = parse_list(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{_shown(item)} is not an IP network such as 10.0.0.0/8") from None
    return items


def _origins(value: str | list[Any]) -> tuple[str, ...]:
    items = parse_list(value)
    for item in items:
        parts = urlsplit(item)
        if item == "*" or parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"{_shown(item)} is not an origin such as https://www.example.com")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ValueError(f"{_shown(item)} is not an origin: no path, query or fragment")
    return items


def _field_names(value: str | list[Any]) -> frozenset[str]:
    names = parse_list(value)
    for name in names:
        if not FIELD_NAME_RE.fullmatch(name):
            raise ValueError(
                f"{_shown(name)} is not a field name such as str::first or str:cm:plan"
            )
    return frozenset(names)


def _activity_id(text: str) -> str:
    if not ACTIVITY_ID_RE.fullmatch(text):
        raise ValueError(f"{_shown(text)} is not an activity id such as act:cm:logged-in")
    return text


Delivery = Literal["queue", "sync"]
LimiterOnError = Literal["local", "open", "closed"]
# How a setting holds a secret, so check-config, errors and logs mask it: "value" is one
# (each item of a list is one); "url" holds passwords in its userinfo or query.
Masked = Literal["value", "url"]
T = TypeVar("T")

# -- declarations: each setting is declared once, on its Settings field, with how it is
# read and documented; the parsing tables, check-config, the README's table and `--help`
# all come from `DECLARATIONS`.

_DECLARED = "gateway.declaration"


@dataclass(frozen=True, slots=True)
class Declaration:
    """One setting as operators see it: its name, how it is read, how it is documented."""

    name: str  # the file key; in the environment GATEWAY_ and the name in upper case
    help: str  # one line of markdown: the README's table and `--help` show it
    default: str  # the default as documented (markdown); "" until derived from the field
    parser: Callable[[Any], Any] | None = None  # None: read by its own function in `_load`
    field: str | None = None  # the Settings field it sets; None for `config`
    takes_list: bool = False  # a TOML array is read as well as a comma list
    masked: Masked | None = None
    also: tuple[str, ...] = ()  # other names read into the same field, documented with it
    env_only: bool = False  # names the file, so it is read only from the environment

    @property
    def names(self) -> tuple[str, ...]:
        """Every name it is read under: its own and `also`."""
        return (self.name, *self.also)


def declared(
    help: str,
    parser: Callable[[Any], Any] | None = None,
    *,
    name: str = "",
    shown: str = "",
    takes_list: bool = False,
    masked: Masked | None = None,
    also: tuple[str, ...] = (),
) -> dict[str, Declaration]:
    """A field's metadata declaring the setting; the name defaults to the field's, the
    documented default (`shown`) to the field's default written as an operator would."""
    declaration = Declaration(name, help, shown, parser, None, takes_list, masked, also)
    return {_DECLARED: declaration}


def setting(
    default: T,
    help: str,
    parser: Callable[[Any], Any] | None = None,
    *,
    name: str = "",
    shown: str = "",
    takes_list: bool = False,
    masked: Masked | None = None,
    also: tuple[str, ...] = (),
) -> T:
    """A Settings field with its default and its declaration (see `declared`); a secret
    is left out of `repr`."""
    metadata = declared(
        help, parser, name=name, shown=shown, takes_list=takes_list, masked=masked, also=also
    )
    return field(default=default, repr=masked is None, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every setting of the gateway; defaults are safe for one machine."""

    listen: HostPort = setting(
        HostPort("127.0.0.1", 8080), "public listener `host:port`", parse_host_port
    )
    metrics_listen: HostPort = setting(
        HostPort("127.0.0.1", 9108),
        "Prometheus `/metrics` listener (never the public one)",
        parse_host_port,
    )
    api_key: str = setting(
        "",
        "Ortto private key (the file form for container secrets)",
        shown="required for `serve`",
        masked="value",
        also=("api_key_file",),
    )
    region: str = setting("default", "`default`, `au` or `eu`", _region)
    upstream_url: str | None = setting(
        None, "base URL that replaces the region's (sandbox, staging)", _url
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "comma list of origins allowed by CORS (`https://www.example.com`)",
        _origins,
        shown="empty: same-origin only",
        takes_list=True,
    )
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.1/32", "::1/128"),
        "comma list of CIDRs whose forwarding headers are believed",
        _cidrs,
        takes_list=True,
    )
    activities: Mapping[str, ActivitySpec] = field(
        default_factory=dict,
        metadata=declared(
            "comma list of activity ids browsers may send", shown="empty: refuse all"
        ),
    )
    person_limit: Rate = setting(
        Rate(10, 86400.0, "10/1d"), "per person per activity, `N/DURATION`", parse_rate
    )
    ip_limit: Rate = setting(
        Rate(100, 3600.0, "100/1h"), "per client IP per activity, `N/DURATION`", parse_rate
    )
    person_fields: frozenset[str] = setting(
        frozenset(DEFAULT_PERSON_FIELDS),
        "person fields a browser may set",
        _field_names,
        takes_list=True,
    )
    max_body_bytes: int = setting(
        64 * 1024, "largest request body (never above Ortto's 2 MB)", parse_size
    )
    spool_path: str = setting("./data/spool.sqlite3", "durable queue file (SQLite)", str)
    spool_max_rows: int = setting(
        1_000_000, "spool bound in rows; when full, new requests get 503", _positive_int
    )
    spool_max_bytes: int = setting(
        1024**3, "spool bound in bytes; when full, new requests get 503", parse_size
    )
    spool_commit: str = setting(
        "auto",
        "where spool commits run: `auto`, `loop` or `thread` (see Delivery)",
        _choice("auto", "loop", "thread"),
    )
    redis_url: str | None = setting(
        None,
        "shared limiter state for several workers or hosts",
        _redis_url,
        shown="unset: in-process",
        masked="url",
    )
    redis_prefix: str = setting(
        "ortto-gw", "key prefix in Redis, so several sites can share one", str
    )
    limiter_on_error: LimiterOnError = setting(
        "local",
        "when Redis fails: `local`, `open` or `closed` (see Scaling out)",
        _choice("local", "open", "closed"),
    )
    limiter_max_keys: int = setting(
        1_000_000,
        "bound of the in-process limiter (least recently used keys are evicted)",
        _positive_int,
    )
    limiter_timeout: float = setting(
        0.5, "longest wait for Redis before the on-error policy applies", parse_seconds
    )
    upstream_rate: float = setting(
        10.0,
        "requests per second to Ortto (10 Professional, 30 Business): the whole account's, "
        "shared by every worker and host through Redis when `GATEWAY_REDIS_URL` is set",
        _positive_float,
    )
    upstream_rate_fallback: float | None = setting(
        None,
        "this process's own share of the rate, used without Redis or while Redis fails "
        "(set it to the rate divided by the number of processes)",
        _positive_float,
        shown="unset: `GATEWAY_UPSTREAM_RATE`",
    )
    upstream_concurrency: int = setting(4, "batches in flight to Ortto at once", _positive_int)
    upstream_timeout: float = setting(10.0, "time to wait for Ortto's answer", parse_seconds)
    delivery: Delivery = setting(
        "queue",
        "`queue` (202 after a durable write) or `sync` (wait for Ortto, relay its answer)",
        _choice("queue", "sync"),
    )
    batch_max_wait: float = setting(
        0.25, "how long a batch may wait to fill before it is sent", parse_seconds
    )
    drain_timeout: float = setting(
        10.0, "on SIGTERM, how long to keep delivering before exiting", parse_seconds
    )
    log_level: str = setting(
        "INFO",
        "`DEBUG`, `INFO`, `WARNING`, `ERROR`",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    strict: bool = setting(
        False,
        "`true`: a 400 for any part of an activity the gateway would otherwise drop with a "
        "warning (see What browsers may send)",
        parse_bool,
    )
    identity_secrets: tuple[str, ...] = setting(
        (),
        "comma list of HMAC secrets (≥ 32 chars) for signed identities; the first signs, "
        "all verify",
        name="identity_secret",
        shown="unset",
        takes_list=True,
        masked="value",
    )
    identity_required: bool = setting(
        False,
        "every activity needs a signed identity (else per activity: `signed_identity = true`)",
        parse_bool,
    )
    ip_anonymize: bool = setting(
        False,
        "forward the client address truncated to /24 (IPv4) or /48 (IPv6)",
        parse_bool,
    )
    read_timeout: float = setting(
        15.0,
        "a request's headers and its body must each arrive within this (slow clients are cut "
        "off); also the idle keep-alive timeout",
        parse_seconds,
    )
    max_concurrent: int = setting(
        1024, "requests handled at once; more get 503 with `Retry-After`", _positive_int
    )
    max_body_readers: int = setting(
        256,
        "requests whose body is still arriving 1 s after their headers, waiting apart from "
        "`GATEWAY_MAX_CONCURRENT`; more get 503 with `Retry-After`",
        _positive_int,
    )
    console: bool = setting(
        True,
        "serve the operator console at `/console` on the metrics listener "
        "([console.md](console.md))",
        parse_bool,
    )
    console_token: str | None = setting(
        None,
        "a token the console asks for, at least 24 characters (needed when the metrics "
        "listener is not on loopback; without it the console is off there)",
        _console_token,
        masked="value",
    )
    console_hosts: tuple[str, ...] = setting(
        (),
        "comma list of host names the console may be reached by (an IP address or "
        "`localhost` always may): any other `Host` is refused, against DNS rebinding",
        _host_names,
        shown="empty: IP addresses and `localhost`",
        takes_list=True,
    )
    console_personal: bool = setting(
        False,
        "show full emails and person ids in the console instead of short hashes",
        parse_bool,
    )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value: each declared secret, the passwords of a declared URL.

        What `check-config` masks and what is masked in any text that may echo one.
        """
        found: list[str] = []
        for d in FIELD_DECLARATIONS:
            value = getattr(self, d.field or "")
            if d.masked == "value":
                found += value if isinstance(value, tuple) else [value]
            elif d.masked == "url" and value:
                found += redis_passwords(value)
        return tuple(dict.fromkeys(s for s in found if s))

    @property
    def upstream_rate_share(self) -> float:
        """This process's rate when it paces itself (no Redis, or Redis failing)."""
        return self.upstream_rate_fallback or self.upstream_rate

    @property
    def upstream_base(self) -> str:
        """The base URL requests go to: the override, else the region's."""
        return (self.upstream_url or REGION_BASES[self.region]).rstrip("/")

    @property
    def upstream_endpoint(self) -> str:
        """`{base}/v1/activities/create`."""
        return self.upstream_base + ACTIVITIES_PATH

    def person_rate(self, spec: ActivitySpec) -> Rate:
        """The per-person limit that applies to an activity."""
        return spec.person_limit or self.person_limit

    def ip_rate(self, spec: ActivitySpec) -> Rate:
        """The per-IP limit that applies to an activity."""
        return spec.ip_limit or self.ip_limit

    def is_strict(self, spec: ActivitySpec) -> bool:
        """Whether undeclared attributes are refused (else dropped) for an activity."""
        return self.strict if spec.strict is None else spec.strict

    def needs_identity(self, spec: ActivitySpec) -> bool:
        """Whether an activity must carry a signed identity token."""
        return self.identity_required if spec.signed_identity is None else spec.signed_identity

    def allowed_person_fields(self, spec: ActivitySpec) -> frozenset[str]:
        """The person fields an activity may carry: its own list (even an empty one), else
        the global allowlist."""
        return self.person_fields if spec.person_fields is None else spec.person_fields


def _documented(value: Any, parser: Callable[[Any], Any] | None) -> str:
    """A default as the README writes it: in the units an operator would type."""
    if value is None:
        return "unset"
    if isinstance(value, tuple | frozenset) and not value:
        return "empty"
    if isinstance(value, bool):
        text = str(value).lower()
    elif parser is parse_size:
        text = next(
            f"{value // n}{unit}"
            for unit, n in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("", 1))
            if value % n == 0
        )
    elif parser is parse_seconds:
        text = f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
    elif isinstance(value, frozenset):
        text = ",".join(sorted(value))
    elif isinstance(value, tuple):
        text = ",".join(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"`{text}`"


def _field_declarations() -> tuple[Declaration, ...]:
    out = []
    for f in dataclasses.fields(Settings):
        d = f.metadata[_DECLARED]
        default = d.default or _documented(f.default, d.parser)
        out.append(dataclasses.replace(d, name=d.name or f.name, field=f.name, default=default))
    return tuple(out)


# Every setting, in the order documented: the file first, then Settings' fields.
FIELD_DECLARATIONS = _field_declarations()
DECLARATIONS = (
    Declaration(
        "config",
        "the TOML settings file (or `--config FILE`); a variable only, never a key in the file",
        "unset",
        env_only=True,
    ),
    *FIELD_DECLARATIONS,
)
# Setting name -> parser for string values (from env or TOML strings).
_PARSERS = {d.name: d.parser for d in DECLARATIONS if d.parser}
_LIST_SETTINGS = {d.name for d in DECLARATIONS if d.takes_list}
# Names read in the file; a variable may name `config` too, which names the file.
_FILE_KEYS = {n for d in DECLARATIONS if not d.env_only for n in d.names}
_ENV_KEYS = {n for d in DECLARATIONS for n in d.names}
# Secrets shorter than this are refused: an HMAC key must not be guessable.
MIN_IDENTITY_SECRET_CHARS = 32


def env_name(name: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + name.upper()


def _parse_value(name: str, value: Any, where: str) -> Any:
    parser = _PARSERS[name]
    if isinstance(value, bool) and parser is parse_bool:
        return value
    if isinstance(value, bool) or (
        not isinstance(value, str) and not (name in _LIST_SETTINGS and isinstance(value, list))
    ):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        else:
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    try:
        return parser(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _parse_spec(activity_id: str, raw: Any, where: str) -> ActivitySpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of settings for the activity")
    unknown = set(raw) - {
        "attributes",
        "person_limit",
        "ip_limit",
        "person_fields",
        "strict",
        "signed_identity",
        "person_id",
    }
    if unknown:
        raise ConfigError(f"{where}: unknown key {_shown(sorted(unknown)[0])}")
    attributes = None
    if "attributes" in raw:
        attributes = _parse_value_with(_field_names, raw["attributes"], f"{where}.attributes")
    person_fields = None
    if "person_fields" in raw:
        person_fields = _parse_value_with(
            _field_names, raw["person_fields"], f"{where}.person_fields"
        )
    return ActivitySpec(
        activity_id=activity_id,
        attributes=attributes,
        person_limit=_parse_value("person_limit", raw["person_limit"], f"{where}.person_limit")
        if "person_limit" in raw
        else None,
        ip_limit=_parse_value("ip_limit", raw["ip_limit"], f"{where}.ip_limit")
        if "ip_limit" in raw
        else None,
        person_fields=person_fields,
        strict=_flag(raw, "strict", where),
        signed_identity=_flag(raw, "signed_identity", where),
        person_id=bool(_flag(raw, "person_id", where)),
    )


def _flag(raw: dict[str, Any], name: str, where: str) -> bool | None:
    value = raw.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"{where}.{name}: expected true or false")


def _parse_value_with(parser: Callable[[Any], Any], value: Any, where: str) -> Any:
    try:
        return parser(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_settings(
    environ: Mapping[str, str],
    config_file: str | None = None,
    *,
    require_api_key: bool = True,
) -> Settings:
    """Build settings from the file (`config_file` or `GATEWAY_CONFIG`) and the environ.

    A `ConfigError` never quotes a secret: values are quoted only when short (`_shown`),
    and any secret the settings give is masked in the message, wherever it was put.
    """
    path = config_file or environ.get(env_name("config"))
    data = _read_file(path) if path else {}
    try:
        return _load(environ, data, path, require_api_key)
    except ConfigError as exc:
        message = str(exc)
        for secret in sorted(_given_secrets(environ, data), key=len, reverse=True):
            message = message.replace(secret, "****")
        raise ConfigError(message) from None


def _given_secrets(environ: Mapping[str, str], data: Mapping[str, Any]) -> set[str]:
    """Every secret the environ and the file give, as written, before any validation."""
    found: list[str] = []
    for d in DECLARATIONS:
        for raw in (environ.get(env_name(d.name)), data.get(d.name)):
            if d.masked == "value" and isinstance(raw, str):
                found += [raw, *raw.split(","), *raw.split()]
            elif d.masked == "value" and isinstance(raw, list):
                found += [v for v in raw if isinstance(v, str)]
            elif d.masked == "url" and isinstance(raw, str):
                found += redis_passwords(raw.strip())
    key_file = environ.get(env_name("api_key_file")) or data.get("api_key_file")
    if isinstance(key_file, str):
        try:
            content = Path(key_file).read_text(encoding="utf-8", errors="replace")
        except (OSError, ValueError):
            content = ""
        found += [content, *content.split()]
    return {s for v in found if len(s := v.strip()) >= MIN_MASKED_CHARS}


def _load(
    environ: Mapping[str, str], data: dict[str, Any], path: str | None, require_api_key: bool
) -> Settings:
    file_label = f"{path}" if path else ""
    for key in data:
        if key not in _FILE_KEYS:
            raise ConfigError(f"{file_label}: unknown setting {_shown(key)}")
    for key in environ:
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() not in _ENV_KEYS:
            raise ConfigError(f"{key}: unknown setting (check the spelling)")

    values: dict[str, Any] = {}
    for name in _PARSERS:
        env_key = env_name(name)
        if env_key in environ:
            raw = environ[env_key]
            if name in {"upstream_url", "redis_url"} and not raw.strip():
                continue
            values[name] = _parse_value(name, raw, env_key)
        elif name in data:
            values[name] = _parse_value(name, data[name], f"{name} (in {file_label})")

    values["api_key"] = _api_key(environ, data, file_label)
    if require_api_key and not values["api_key"]:
        raise ConfigError(
            "GATEWAY_API_KEY: required (or GATEWAY_API_KEY_FILE); the Ortto private key"
        )
    values["activities"] = _activities(environ, data, file_label)
    values["identity_secrets"] = _identity_secrets(environ, data, file_label)
    if values.get("identity_required") and not values["identity_secrets"]:
        raise ConfigError(
            f"{env_name('identity_required')}: needs GATEWAY_IDENTITY_SECRET to check tokens"
        )
    if (
        any(spec.signed_identity for spec in values["activities"].values())
        and not values["identity_secrets"]
    ):
        raise ConfigError("activities: signed_identity needs GATEWAY_IDENTITY_SECRET")

    max_body = values.get("max_body_bytes", Settings.max_body_bytes)
    if max_body > ORTTO_MAX_BODY_BYTES:
        raise ConfigError(
            f"{env_name('max_body_bytes')}: at most {ORTTO_MAX_BODY_BYTES} (Ortto's 2 MB), "
            f"got {max_body}"
        )
    if values.get("redis_url") and not values["redis_url"].startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{env_name('redis_url')}: expected a URL starting with one of "
            + ", ".join(REDIS_SCHEMES)
        )
    if "{" in values.get("redis_prefix", "") or "}" in values.get("redis_prefix", ""):
        raise ConfigError(f"{env_name('redis_prefix')}: must not contain {{ or }}")
    return Settings(**values)


def _api_key(environ: Mapping[str, str], data: Mapping[str, Any], file_label: str) -> str:
    env_key = env_name("api_key")
    if environ.get(env_key):
        return _secret(_one_line(environ[env_key]), env_key, ascii_only=True)
    key_file = environ.get(env_name("api_key_file")) or data.get("api_key_file")
    if key_file:
        where = env_name("api_key_file")
        if not isinstance(key_file, str):
            raise ConfigError(f"{where}: expected a path")
        return read_key_file(key_file, where)
    raw = data.get("api_key", "")
    if not isinstance(raw, str):
        raise ConfigError(f"api_key (in {file_label}): expected a string")
    return _secret(raw, f"api_key (in {file_label})", ascii_only=True) if raw else ""


def read_key_file(path: str, where: str) -> str:
    """The key a file holds: one line; its line ending, if any, is not part of the key.

    The path is not quoted in errors: a key given where its file was expected would be.
    """
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the file it names: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{where}: the file is not UTF-8 text") from None
    key = _one_line(content)
    problem = _secret_problem(key, ascii_only=True)
    if problem:
        raise ConfigError(f"{where}: the key in the file {problem}")
    return key


def _identity_secrets(
    environ: Mapping[str, str], data: Mapping[str, Any], file_label: str
) -> tuple[str, ...]:
    """The identity secrets: the first signs, every one verifies (key rotation)."""
    env_key = env_name("identity_secret")
    raw: Any = environ.get(env_key, data.get("identity_secret", ""))
    where = env_key if env_key in environ else f"identity_secret (in {file_label})"
    try:
        secrets = parse_list(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for secret in secrets:
        _secret(secret, where)
        if len(secret) < MIN_IDENTITY_SECRET_CHARS:
            raise ConfigError(
                f"{where}: each secret needs at least {MIN_IDENTITY_SECRET_CHARS} characters"
            )
    return secrets


def _activities(
    environ: Mapping[str, str], data: Mapping[str, Any], file_label: str
) -> dict[str, ActivitySpec]:
    raw = data.get("activities", {})
    specs: dict[str, ActivitySpec] = {}
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"activities (in {file_label}): expected a list or a table")
    for activity_id, entry in raw.items():
        where = f"activities.{_shown(activity_id)} (in {file_label})"
        _parse_value_with(_activity_id, activity_id, where)
        specs[activity_id] = _parse_spec(activity_id, entry, where)
    env_key = env_name("activities")
    if env_key in environ:
        enabled = {}
        for activity_id in parse_list(environ[env_key]):
            _parse_value_with(_activity_id, activity_id, env_key)
            enabled[activity_id] = specs.get(activity_id, ActivitySpec(activity_id))
        specs = enabled
    return specs


def mask(secret: str) -> str:
    """A secret as `****(40 chars, sha256:1a2b3c4d)`: comparable, yet useless to an attacker."""
    if not secret:
        return "(unset)"
    digest = hashlib.sha256(secret.encode()).hexdigest()[:8]
    return f"****({len(secret)} chars, sha256:{digest})"


def _mask_url(url: str) -> str:
    """A Redis URL with its password masked, in the userinfo or a `password` query parameter.

    redis-py reads `?password=` as well as `user:pw@`, so both are secrets. The URL is
    edited as text, not rebuilt, so everything else is shown exactly as configured.
    """
    parts = urlsplit(url)
    head, question, tail = url.partition("?")
    if parts.password:
        head = head.replace(f":{parts.password}@", ":****@")
    query, hash_, fragment = tail.partition("#")
    query = "&".join(_mask_query_item(item) for item in query.split("&"))
    return head + question + query + hash_ + fragment


def redis_passwords(url: str) -> list[str]:
    """The passwords a Redis URL holds: in its userinfo and in `password=` parameters."""
    parts = urlsplit(url)
    found = [unquote_plus(parts.password)] if parts.password else []
    if parts.password:
        found.append(parts.password)  # as written, percent-encoded or not
    for item in url.partition("?")[2].partition("#")[0].split("&"):
        name, _, value = item.partition("=")
        if value and unquote_plus(name) == "password":
            found += [value, unquote_plus(value)]
    return found


def _mask_query_item(item: str) -> str:
    """One `name=value` of a query string, the value masked when the name is `password`."""
    name, _, value = item.partition("=")
    if value and unquote_plus(name) == "password":
        return f"{name}=****"
    return item


def describe(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain values, secrets masked (for `check-config`)."""
    out: dict[str, Any] = {}
    for d in FIELD_DECLARATIONS:
        name = d.field or ""
        value = getattr(settings, name)
        if d.masked == "value" and isinstance(value, tuple):
            value = [mask(v) for v in value]
        elif d.masked == "value":
            value = mask(value or "")
        elif d.masked == "url" and value:
            value = _mask_url(value)
        elif name == "activities":
            value = {
                k: {
                    "attributes": sorted(s.attributes) if s.attributes is not None else "any",
                    "person_limit": str(settings.person_rate(s)),
                    "ip_limit": str(settings.ip_rate(s)),
                    "person_fields": sorted(settings.allowed_person_fields(s)),
                    "strict": settings.is_strict(s),
                    "signed_identity": settings.needs_identity(s),
                    "person_id": s.person_id,
                }
                for k, s in value.items()
            }
        elif isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Rate | HostPort):
            value = str(value)
        out[name] = value
    out["upstream_endpoint"] = settings.upstream_endpoint
    # A secret given in the wrong setting as well (a key as the Redis prefix) stays masked.
    secrets = [s for s in settings.secrets if len(s) >= MIN_MASKED_CHARS]
    return {k: without_secrets(v, secrets) for k, v in out.items()} if secrets else out


def without_secrets(value: Any, secrets: Sequence[str]) -> Any:
    """A JSON value with every secret in its strings (keys too) masked: `****`."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "****")
        return value
    if isinstance(value, list):
        return [without_secrets(v, secrets) for v in value]
    if isinstance(value, dict):
        return {without_secrets(k, secrets): without_secrets(v, secrets) for k, v in value.items()}
    return value
