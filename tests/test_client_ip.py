"""Tests for gateway.client_ip: address parsing, trusted networks and the forwarding walk."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import client_ip
from gateway.client_ip import (
    MAX_HEADER_CHARS,
    MAX_HOPS,
    IPAddress,
    TrustedProxies,
    parse_ip,
    parse_networks,
    resolve_client_ip,
)

TRUSTED = TrustedProxies(
    parse_networks(["127.0.0.1", "::1", "10.0.0.0/8", "192.168.0.0/16", "2001:db8:ffff::/48"])
)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("  203.0.113.7\t", "203.0.113.7"),
        ("203.0.113.7:4711", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:4711", "2001:db8::7"),
        ("[2001:db8::7]:_obfport", "2001:db8::7"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%25eth0]:80", "fe80::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("[::ffff:cb00:7107]:80", "203.0.113.7"),
        ("::1", "::1"),
    ],
)
def test_parse_ip_accepts(text: str, expected: str) -> None:
    assert parse_ip(text) == ip(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "unknown",
        "_hidden",
        "example.com",
        "1.2.3",
        "01.2.3.4",  # leading zeros: octal to some parsers, so ambiguous
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.4:",
        "1.2.3.4:99999",
        "1.2.3.4:abc",
        "1.2.3.4:\u0661",  # a non-ASCII digit
        "1.2.3.4%eth0",
        "[2001:db8::7",
        "[2001:db8::7]80",
        "[2001:db8::7]:",
        "2001:db8::7:::",
        "\u0661.2.3.4",
        "1" * 1000,
    ],
)
def test_parse_ip_refuses(text: str) -> None:
    assert parse_ip(text) is None


def test_parse_ip_mapped_becomes_ipv4() -> None:
    assert isinstance(parse_ip("::ffff:10.1.2.3"), ipaddress.IPv4Address)


def test_parse_networks() -> None:
    assert parse_networks(["10.0.0.0/8", " 127.0.0.1 ", "::1", "", "  "]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv6Network("::1/128"),
    )


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "not-an-ip", "10.0.0.0/33", "1.2.3.4:80", "*"])
def test_parse_networks_names_the_bad_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_networks(["127.0.0.1/32", bad])
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("10.255.0.1", True),
        ("11.0.0.1", False),
        ("192.168.3.4", True),
        ("::1", True),
        ("::2", False),
        ("2001:db8:ffff:1::9", True),
        ("2001:db8:fffe::9", False),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped counts as IPv4
        ("::ffff:11.1.2.3", False),
        ("fe80::1%eth0", False),
    ],
)
def test_trusted_membership(address: str, inside: bool) -> None:
    assert (ip(address) in TRUSTED) is inside


def test_trusted_mapped_network_matches_ipv4() -> None:
    trusted = TrustedProxies(parse_networks(["::ffff:10.0.0.0/104"]))
    assert trusted.networks == (ipaddress.IPv4Network("10.0.0.0/8"),)
    assert ip("10.9.8.7") in trusted
    assert ip("::ffff:10.9.8.7") in trusted
    assert ip("11.0.0.1") not in trusted


def test_trusted_edges() -> None:
    assert ip("127.0.0.1") not in TrustedProxies([])
    everything_v4 = TrustedProxies(parse_networks(["0.0.0.0/0"]))
    assert ip("203.0.113.7") in everything_v4
    assert ip("2001:db8::1") not in everything_v4
    assert "10.0.0.0/8" in repr(TRUSTED)


_NETWORKS = st.one_of(
    st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)
_ADDRESSES = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
)


@given(st.lists(_NETWORKS, max_size=6), _ADDRESSES)
def test_trusted_agrees_with_ipaddress(
    networks: list[client_ip.IPNetwork], address: IPAddress
) -> None:
    probe = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        probe = address.ipv4_mapped
    expected = any(probe.version == n.version and probe in n for n in networks)
    assert (address in TrustedProxies(networks)) is expected


# (peer, X-Forwarded-For lines, Forwarded lines, expected client)
TRUTH_TABLE: list[tuple[str | None, list[str], list[str], str | None]] = [
    # An untrusted peer is the client whatever it claims.
    ("203.0.113.9", ["1.2.3.4"], [], "203.0.113.9"),
    ("203.0.113.9", [], ["for=1.2.3.4"], "203.0.113.9"),
    ("2001:db8::9", ["1.2.3.4"], [], "2001:db8::9"),
    # A trusted peer without headers: a local caller.
    ("127.0.0.1", [], [], "127.0.0.1"),
    # One proxy.
    ("127.0.0.1", ["203.0.113.7"], [], "203.0.113.7"),
    ("::1", ["203.0.113.7"], [], "203.0.113.7"),
    ("127.0.0.1", ["203.0.113.7:5555"], [], "203.0.113.7"),
    # The client's own X-Forwarded-For is left of what the proxy appended.
    ("127.0.0.1", ["1.1.1.1, 203.0.113.7"], [], "203.0.113.7"),
    ("127.0.0.1", ["10.0.0.1, 203.0.113.7"], [], "203.0.113.7"),
    # Several trusted proxies.
    ("10.0.0.1", ["1.1.1.1, 203.0.113.7, 10.0.0.5, 192.168.1.1"], [], "203.0.113.7"),
    ("10.0.0.1", ["203.0.113.7,10.0.0.5,10.0.0.6"], [], "203.0.113.7"),
    # Every hop trusted: the left-most is the client.
    ("10.0.0.1", ["10.0.0.9, 10.0.0.5"], [], "10.0.0.9"),
    ("127.0.0.1", ["127.0.0.1"], [], "127.0.0.1"),
    # Garbage stops the walk at the last trusted hop, never skipping further left.
    ("127.0.0.1", ["1.1.1.1, garbage"], [], "127.0.0.1"),
    ("127.0.0.1", ["1.1.1.1, unknown, 10.0.0.5"], [], "10.0.0.5"),
    ("127.0.0.1", ["1.1.1.1, , 10.0.0.5"], [], "10.0.0.5"),
    ("127.0.0.1", ["1.1.1.1, 10.0.0.5,"], [], "127.0.0.1"),
    ("127.0.0.1", [""], [], "127.0.0.1"),
    ("127.0.0.1", ["1.1.1.1, 01.2.3.4, 10.0.0.5"], [], "10.0.0.5"),
    # Garbage left of the client does not matter.
    ("127.0.0.1", ["garbage, 203.0.113.7"], [], "203.0.113.7"),
    # IPv6 in X-Forwarded-For, bare, bracketed, with port or zone.
    ("127.0.0.1", ["2001:db8::7"], [], "2001:db8::7"),
    ("127.0.0.1", ["[2001:db8::7]:4711"], [], "2001:db8::7"),
    ("127.0.0.1", ["fe80::7%eth0"], [], "fe80::7"),
    ("::1", ["2001:db8::7, 2001:db8:ffff::1"], [], "2001:db8::7"),
    # Several header lines are one list, in order.
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7", "10.0.0.5"], [], "203.0.113.7"),
    ("10.0.0.1", ["203.0.113.7", "10.0.0.5, 10.0.0.6"], [], "203.0.113.7"),
    ("10.0.0.1", ["198.51.100.1", "203.0.113.7"], [], "203.0.113.7"),
    # IPv4-mapped addresses are IPv4, as peers and as hops.
    ("::ffff:127.0.0.1", ["203.0.113.7"], [], "203.0.113.7"),
    ("::ffff:203.0.113.9", ["1.2.3.4"], [], "203.0.113.9"),
    ("127.0.0.1", ["::ffff:203.0.113.7"], [], "203.0.113.7"),
    ("127.0.0.1", ["203.0.113.7, ::ffff:10.0.0.5"], [], "203.0.113.7"),
    # Forwarded (RFC 7239).
    ("127.0.0.1", [], ["for=203.0.113.7"], "203.0.113.7"),
    ("127.0.0.1", [], ['for="203.0.113.7:4711"'], "203.0.113.7"),
    ("127.0.0.1", [], ['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
    ("127.0.0.1", [], ['for="[2001:db8:cafe::17]"'], "2001:db8:cafe::17"),
    ("127.0.0.1", [], ["for=[2001:db8:cafe::17]"], "2001:db8:cafe::17"),
    ("127.0.0.1", [], ['For="\\203.0.113.7"'], "203.0.113.7"),
    ("127.0.0.1", [], ["proto=https;for=203.0.113.7;by=10.0.0.1"], "203.0.113.7"),
    ("127.0.0.1", [], ["for=203.0.113.7 ; proto=https"], "203.0.113.7"),
    (
        "10.0.0.1",
        [],
        ["for=198.51.100.1;proto=https, for=203.0.113.7;by=10.0.0.1, for=10.0.0.5"],
        "203.0.113.7",
    ),
    ("10.0.0.1", [], ["for=198.51.100.1", "for=203.0.113.7", "for=10.0.0.5"], "203.0.113.7"),
    ("10.0.0.1", [], ["for=10.0.0.9, for=10.0.0.5"], "10.0.0.9"),
    # Obfuscated, unknown or missing "for" stops the walk.
    ("127.0.0.1", [], ["for=_hidden"], "127.0.0.1"),
    ("127.0.0.1", [], ["for=203.0.113.1, for=_hidden, for=10.0.0.5"], "10.0.0.5"),
    ("127.0.0.1", [], ["for=unknown"], "127.0.0.1"),
    ("127.0.0.1", [], ["for=203.0.113.7, proto=https"], "127.0.0.1"),
    ("127.0.0.1", [], [""], "127.0.0.1"),
    ("127.0.0.1", [], ["for=203.0.113.7;for=198.51.100.1"], "127.0.0.1"),
    ("127.0.0.1", [], ["for=203.0.113.7 proto=https"], "127.0.0.1"),
    # A client's syntax errors do not hide the proxy's element ...
    ("127.0.0.1", [], ['for="1.1.1.1, for=203.0.113.7'], "203.0.113.7"),
    ("127.0.0.1", [], ["junk!!, for=203.0.113.7"], "203.0.113.7"),
    # ... and a quote left open to swallow the proxy's element never yields the client's value.
    ("127.0.0.1", [], ['for=1.1.1.1;x=", for="[2001:db8::5]"'], "127.0.0.1"),
    ("127.0.0.1", [], ['for=1.1.1.1;x="\\, for="[2001:db8::5]:80"'], "127.0.0.1"),
    # X-Forwarded-For wins when both are present; the two are never mixed.
    ("127.0.0.1", ["203.0.113.7"], ["for=198.51.100.1"], "203.0.113.7"),
    ("127.0.0.1", ["10.0.0.5"], ["for=198.51.100.1"], "10.0.0.5"),
    # No usable peer.
    (None, ["203.0.113.7"], [], None),
    ("not-an-address", ["203.0.113.7"], [], None),
]


@pytest.mark.parametrize(("peer", "xff", "forwarded", "expected"), TRUTH_TABLE)
def test_resolve_client_ip(
    peer: str | None, xff: list[str], forwarded: list[str], expected: str | None
) -> None:
    result = resolve_client_ip(peer, xff, forwarded, TRUSTED)
    if expected is None:
        assert result is None
    else:
        assert result == ip(expected)
        assert type(result) is type(ip(expected))  # mapped addresses come back as IPv4


def test_resolve_accepts_tuples() -> None:
    assert resolve_client_ip("127.0.0.1", ("203.0.113.7",), (), TRUSTED) == ip("203.0.113.7")


def test_hop_cap() -> None:
    within = "203.0.113.7, " + ", ".join(["10.0.0.5"] * (MAX_HOPS - 1))
    beyond = "203.0.113.7, " + ", ".join(["10.0.0.5"] * MAX_HOPS)
    assert resolve_client_ip("127.0.0.1", [within], [], TRUSTED) == ip("203.0.113.7")
    assert resolve_client_ip("127.0.0.1", [beyond], [], TRUSTED) == ip("10.0.0.5")
    lines = ["203.0.113.7", *["10.0.0.5"] * MAX_HOPS]
    assert resolve_client_ip("127.0.0.1", lines, [], TRUSTED) == ip("10.0.0.5")
    elements = ["for=203.0.113.7", *["for=10.0.0.5"] * MAX_HOPS]
    assert resolve_client_ip("127.0.0.1", [], [", ".join(elements)], TRUSTED) == ip("10.0.0.5")


def test_cut_line_never_yields_a_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cutting "111.2.3.4" to "1.2.3.4" (or "xfor=" to "for=") must not invent an address.
    line = "111.2.3.4,10.0.0.5,10.0.0.6"
    monkeypatch.setattr(client_ip, "MAX_HEADER_CHARS", len(line) - 2)
    assert resolve_client_ip("127.0.0.1", [line], [], TRUSTED) == ip("10.0.0.5")
    element = "xfor=198.51.100.1, for=10.0.0.5"
    monkeypatch.setattr(client_ip, "MAX_HEADER_CHARS", len(element) - 1)
    assert resolve_client_ip("127.0.0.1", [], [element], TRUSTED) == ip("10.0.0.5")


@pytest.mark.parametrize(
    ("xff", "forwarded", "expected"),
    [
        (["1.1.1.1, " * 200_000 + "203.0.113.7"], [], "203.0.113.7"),
        (["1.1.1.1"] * 100_000 + ["203.0.113.7"], [], "203.0.113.7"),
        (["9" * 1_000_000], [], "127.0.0.1"),
        ([], ["for=1.1.1.1;proto=https, " * 100_000 + "for=203.0.113.7"], "203.0.113.7"),
        ([], ["for=1.1.1.1"] * 100_000 + ["for=203.0.113.7"], "203.0.113.7"),
        ([], ['for="' + "x" * 1_000_000], "127.0.0.1"),
    ],
    ids=[
        "xff-long-line",
        "xff-many-lines",
        "xff-one-huge-entry",
        "fwd-long-line",
        "fwd-many-lines",
        "fwd-open-quote",
    ],
)
def test_huge_headers_are_cheap(xff: list[str], forwarded: list[str], expected: str) -> None:
    # Only the right-hand end is read: the memory a call allocates is bounded by
    # MAX_HEADER_CHARS, not by the header's megabyte (a count, not a clock, so the
    # machine's speed does not matter).
    tracemalloc.start()
    try:
        for _ in range(3):
            assert resolve_client_ip("127.0.0.1", xff, forwarded, TRUSTED) == ip(expected)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MAX_HEADER_CHARS
