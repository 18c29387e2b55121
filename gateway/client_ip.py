"""The client's address: the TCP peer, or what trusted proxies say about the hops before them."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

# Parsed addresses are cached: the same proxies and clients come back request after request.
PARSE_CACHE_SIZE = 8192

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Real proxy chains are a handful of hops long; this bounds the work a request can cause.
MAX_HOPS = 32
# Only this many characters at the right of each header line are read: the hops we can use
# sit there, and 32 hops of "[IPv6]:port" fit in about 1.6 kB.
MAX_HEADER_CHARS = 4096
# Longer than any address with brackets, zone id and port: not worth parsing.
_MAX_ADDRESS_CHARS = 128

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")

# An optional RFC 7239 forwarded-pair, token "=" ( token / quoted-string ), with the RFC 7230
# character classes, between optional whitespace: it always matches, perhaps the empty string.
# Unquoted values also take ":[]" because some proxies write for=[2001:db8::1]:80 unquoted.
_TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"
_FORWARDED_PAIR = re.compile(
    rf"[ \t]*(?:([{_TCHAR}]+)=(?:([{_TCHAR}:\[\]]+)"
    r'|"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\t \x21-\x7e\x80-\U0010ffff])*)")'
    r")?[ \t]*"
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings (a bare address is a /32 or /128); blank entries are skipped."""
    networks: list[IPNetwork] = []
    for entry in cidrs:
        text = entry.strip()
        if not text:
            continue
        try:
            # strict: "10.0.0.1/8" is more likely a typo than a wish to trust a /8.
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(f"invalid network {entry!r}: {exc}") from exc
    return tuple(networks)


def _as_ipv4(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network as the IPv4 network it covers, since lookups map addresses."""
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= _MAPPED_V4.prefixlen
        and network.subnet_of(_MAPPED_V4)
    ):
        address = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((address, network.prefixlen - _MAPPED_V4.prefixlen))
    return network


def _index(networks: Iterable[IPNetwork], bits: int) -> tuple[tuple[int, frozenset[int]], ...]:
    """Group networks by prefix length as (mask, network numbers) for set lookups."""
    by_prefix: dict[int, set[int]] = {}
    for network in networks:
        by_prefix.setdefault(network.prefixlen, set()).add(int(network.network_address))
    full = (1 << bits) - 1
    return tuple(
        (full ^ ((1 << (bits - prefixlen)) - 1), frozenset(numbers))
        for prefixlen, numbers in sorted(by_prefix.items())
    )


class TrustedProxies:
    """The networks whose forwarding headers are believed; membership costs one set lookup per
    distinct prefix length, and IPv4-mapped IPv6 addresses count as their IPv4 address.
    Answers are remembered per address (the peer is nearly always the same proxy)."""

    __slots__ = ("_known", "_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(_as_ipv4(n) for n in networks)
        self._v4 = _index((n for n in self.networks if n.version == 4), 32)
        self._v6 = _index((n for n in self.networks if n.version == 6), 128)
        self._known: dict[IPAddress, bool] = {}

    def __contains__(self, ip: IPAddress) -> bool:
        known = self._known.get(ip)
        if known is None:
            if len(self._known) >= PARSE_CACHE_SIZE:
                self._known.clear()
            known = self._known[ip] = self._lookup(ip)
        return known

    def _lookup(self, ip: IPAddress) -> bool:
        index = self._v4
        if isinstance(ip, ipaddress.IPv6Address):
            mapped = ip.ipv4_mapped
            if mapped is None:
                index = self._v6
            else:
                ip = mapped
        number = int(ip)
        return any(number & mask in numbers for mask, numbers in index)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"


def _valid_port(port: str) -> bool:
    """A decimal port, or an RFC 7239 obfuscated port such as "_abc"."""
    if port.startswith("_"):
        return len(port) > 1 and all(c.isascii() and (c.isalnum() or c in "._-") for c in port)
    return port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_ip(text: str) -> IPAddress | None:
    """Parse "1.2.3.4", "1.2.3.4:80", "::1", "[::1]:80" or "fe80::1%eth0"; None otherwise.

    IPv6 zone ids are dropped and IPv4-mapped IPv6 addresses become IPv4 addresses. Names,
    "unknown" and obfuscated RFC 7239 identifiers ("_hidden") are not addresses: None.
    """
    if len(text) > _MAX_ADDRESS_CHARS:
        return None
    host = text.strip()
    if host.startswith("["):
        host, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _valid_port(port[1:]))):
            return None
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not _valid_port(port):
            return None
    if "%" in host:
        if ":" not in host:  # zone ids exist only for IPv6
            return None
        host = host.partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _tail(value: str) -> tuple[str, bool]:
    """The part of a header line that is read, and whether its left end was cut off."""
    if len(value) > MAX_HEADER_CHARS:
        return value[-MAX_HEADER_CHARS:], True
    return value, False


def _x_forwarded_for_hops(values: Sequence[str]) -> Iterator[str | None]:
    """X-Forwarded-For entries right to left; None for an entry that was cut off."""
    for value in reversed(values):
        text, cut = _tail(value)
        entries: list[str | None] = list(text.rsplit(",", MAX_HOPS))
        # rsplit leaves the unsplit rest in entries[0] once MAX_HOPS is reached.
        if cut or len(entries) > MAX_HOPS:
            entries[0] = None
        yield from reversed(entries)


def _forwarded_for_values(line: str) -> list[str | None]:
    """The "for" value of each element of one Forwarded line; None where unusable.

    An element with a syntax error, a repeated parameter or no "for" is unusable. After an error
    the scan resumes at the next comma, so garbage a client put before the proxy's element does
    not hide that element; and a quoted-string left open by the client that swallows part of the
    proxy's element leaves that element malformed, hence unusable, never attributed to the client.
    """
    values: list[str | None] = []
    position, end = 0, len(line)
    while True:
        value: str | None = None
        valid = True
        names: set[str] = set()
        while True:
            pair = _FORWARDED_PAIR.match(line, position)
            assert pair is not None  # every part of the pattern is optional
            if pair[1] is not None:
                name = pair[1].lower()
                valid = valid and name not in names
                names.add(name)
                if name == "for":
                    quoted = pair[3]
                    value = pair[2] if quoted is None else _QUOTED_PAIR.sub(r"\1", quoted)
            position = pair.end()
            if position < end and line[position] == ";":
                position += 1
                continue
            break
        if position < end and line[position] != ",":
            valid = False
            comma = line.find(",", position)
            position = end if comma < 0 else comma
        values.append(value if valid else None)
        if position >= end:
            return values
        position += 1


def _forwarded_hops(values: Sequence[str]) -> Iterator[str | None]:
    """RFC 7239 "for" values right to left; None for unusable or cut-off elements."""
    for value in reversed(values):
        text, cut = _tail(value)
        elements = _forwarded_for_values(text)
        if cut:
            elements[0] = None
        yield from reversed(elements)


def resolve_client_ip(
    peer: str | None,
    x_forwarded_for: Sequence[str],
    forwarded: Sequence[str],
    trusted: TrustedProxies,
) -> IPAddress | None:
    """The client's address, believing forwarding headers only as far as trusted proxies vouch.

    `peer` is the TCP peer (None, e.g. for a unix socket, gives None). The header arguments are
    every line of each header, in order. If the peer is not a trusted proxy, it is the client
    and the headers are ignored: anyone can send them. Otherwise the hop list comes from
    X-Forwarded-For if the request has it, else from the "for" parameters of Forwarded (the two
    are never mixed), and is walked from the right, where the nearest proxy appended what it saw:

    - an address outside the trusted networks is the client;
    - a trusted address is a further proxy, so the walk goes on to its left;
    - an entry that is not an address ("unknown", "_hidden", garbage, a Forwarded element
      without "for" or with a syntax error) stops the walk, and the last trusted hop seen
      (or the peer) is the client. A trusted proxy vouches only for the hop it appended;
      everything left of that arrived with the request and was chosen by its sender, so such
      an entry must neither be used nor make the walk skip to an address further left;
    - if every hop is trusted, the left-most one is the client (an internal caller).

    At most MAX_HOPS hops and the last MAX_HEADER_CHARS characters of each header line are
    examined; reaching either limit stops the walk like an unusable entry does.

    The trusted proxy must append to (or overwrite) the header read here. In particular a
    proxy that sets only Forwarded must remove X-Forwarded-For, which is preferred when present.
    Returned addresses are normalised: an IPv4-mapped IPv6 address is returned as IPv4.
    """
    if peer is None:
        return None
    client = parse_ip(peer)
    if client is None or client not in trusted:
        return client
    if len(x_forwarded_for) == 1 and "," not in (only := x_forwarded_for[0]):
        # The usual case, one proxy in front: the walk below, for its single hop.
        nearest = parse_ip(only) if len(only) <= MAX_HEADER_CHARS else None
        return client if nearest is None else nearest
    hops = _x_forwarded_for_hops(x_forwarded_for) if x_forwarded_for else _forwarded_hops(forwarded)
    for hop in islice(hops, MAX_HOPS):
        address = None if hop is None else parse_ip(hop)
        if address is None:
            return client
        if address not in trusted:
            return address
        client = address
    return client


# One IPv6 client usually holds a whole /64 and can rotate through it at will.
LIMIT_V6_PREFIX = 64


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def ip_text(ip: IPAddress) -> str:
    """`str(ip)`, cached: formatting an address costs more than the lookup (profiled)."""
    return str(ip)


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def limit_key(ip: IPAddress | None) -> str:
    """The per-IP limit's key: the address, or for IPv6 its /64 (one subscriber's block)."""
    if ip is None:
        return ""
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, LIMIT_V6_PREFIX)))
    return str(ip)
