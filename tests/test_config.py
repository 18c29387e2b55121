"""Settings: names, defaults, parsing, the file and the environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import (
    DECLARATIONS,
    FIELD_DECLARATIONS,
    REGION_BASES,
    ConfigError,
    Declaration,
    Settings,
    describe,
    load_settings,
    mask,
    parse_rate,
    parse_seconds,
    parse_size,
)

KEY = "pk-test-0123456789abcdef0123456789abcdef"


def env(**kw: str) -> dict[str, str]:
    base = {"GATEWAY_API_KEY": KEY}
    base.update({f"GATEWAY_{k.upper()}": v for k, v in kw.items()})
    return base


def test_defaults_match_the_design() -> None:
    s = load_settings(env())
    assert str(s.listen) == "127.0.0.1:8080"
    assert str(s.metrics_listen) == "127.0.0.1:9108"
    assert s.region == "default"
    assert s.upstream_endpoint == "https://api.ap3api.com/v1/activities/create"
    assert s.allowed_origins == ()
    assert s.trusted_proxies == ("127.0.0.1/32", "::1/128")
    assert s.activities == {}
    assert (s.person_limit.count, s.person_limit.window) == (10, 86400)
    assert (s.ip_limit.count, s.ip_limit.window) == (100, 3600)
    assert s.spool_path == "./data/spool.sqlite3"
    assert s.redis_url is None
    assert s.upstream_rate == 10
    assert s.delivery == "queue"
    assert s.max_body_bytes == 64 * 1024
    assert s.batch_max_wait == 0.25
    assert s.spool_commit == "auto"
    assert load_settings(env(spool_commit="thread")).spool_commit == "thread"


@pytest.mark.parametrize(
    ("region", "base"),
    [
        ("default", REGION_BASES["default"]),
        ("au", "https://api.au.ap3api.com"),
        ("eu", "https://api.eu.ap3api.com"),
    ],
)
def test_region_routing(region: str, base: str) -> None:
    s = load_settings(env(region=region))
    assert s.upstream_endpoint == base + "/v1/activities/create"


def test_upstream_url_overrides_region() -> None:
    s = load_settings(env(region="eu", upstream_url="http://127.0.0.1:9/"))
    assert s.upstream_endpoint == "http://127.0.0.1:9/v1/activities/create"


@pytest.mark.parametrize(
    ("text", "count", "window"),
    [("10/1d", 10, 86400), ("100/1h", 100, 3600), ("3/2s", 3, 2), ("5/15m", 5, 900)],
)
def test_parse_rate(text: str, count: int, window: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.window, str(rate)) == (count, window, text)


@pytest.mark.parametrize(
    "text", ["", "10", "10/", "/1d", "0/1d", "10/0d", "10/1w", "10 /1d", "-1/1d", "1.5/1d", "10/d"]
)
def test_parse_rate_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="N/DURATION"):
        parse_rate(text)


def test_parse_seconds_and_size() -> None:
    assert parse_seconds("250ms") == 0.25
    assert parse_seconds("2") == 2
    assert parse_seconds("5m") == 300
    assert parse_size("64KiB") == 65536
    assert parse_size("1GiB") == 1024**3
    with pytest.raises(ValueError):
        parse_seconds("soon")
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("person_limit", "10/day", "GATEWAY_PERSON_LIMIT"),
        ("ip_limit", "x", "GATEWAY_IP_LIMIT"),
        ("region", "us", "GATEWAY_REGION"),
        ("listen", "localhost", "GATEWAY_LISTEN"),
        ("upstream_url", "ftp://x", "GATEWAY_UPSTREAM_URL"),
        ("allowed_origins", "*", "GATEWAY_ALLOWED_ORIGINS"),
        ("allowed_origins", "https://a.com/path", "GATEWAY_ALLOWED_ORIGINS"),
        ("trusted_proxies", "10.0.0.0/33", "GATEWAY_TRUSTED_PROXIES"),
        ("activities", "logged-in", "GATEWAY_ACTIVITIES"),
        ("upstream_rate", "0", "GATEWAY_UPSTREAM_RATE"),
        ("delivery", "later", "GATEWAY_DELIVERY"),
        ("spool_commit", "later", "GATEWAY_SPOOL_COMMIT"),
        ("max_body_bytes", "3MiB", "GATEWAY_MAX_BODY_BYTES"),
        ("redis_url", "http://x", "GATEWAY_REDIS_URL"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(**{name: value}))
    message = str(info.value)
    assert message.startswith(needle)
    assert "\n" not in message
    assert KEY not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("listen", "127.0.0.1:8\u00b2"),
        ("listen", "127.0.0.1:\uff18\uff10"),
        ("spool_max_rows", "\uff13"),
    ],
)
def test_numbers_take_ascii_digits_only(name: str, value: str) -> None:
    # str.isdigit() is true for "²" (int() then fails) and for full-width digits.
    with pytest.raises(ConfigError, match="expected") as info:
        load_settings(env(**{name: value}))
    assert "invalid literal" not in str(info.value)


def test_unknown_env_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_PERSON_LIMTI"):
        load_settings({**env(), "GATEWAY_PERSON_LIMTI": "1/1d"})


def test_api_key_required_and_from_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_API_KEY"):
        load_settings({})
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    s = load_settings({"GATEWAY_API_KEY_FILE": str(key_file)})
    assert s.api_key == KEY
    with pytest.raises(ConfigError, match="GATEWAY_API_KEY_FILE"):
        load_settings({"GATEWAY_API_KEY_FILE": str(tmp_path / "missing")})


def test_file_and_env_env_wins(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
listen = "127.0.0.1:9000"
person_limit = "5/1d"
allowed_origins = ["https://www.example.com"]

[activities."act:cm:logged-in"]
attributes = ["str:cm:payment-plan", "bol:cm:account-owner"]
person_limit = "3/1h"

[activities."act:cm:signup"]
"""
    )
    s = load_settings(env(person_limit="7/1d"), str(path))
    assert s.listen.port == 9000
    assert s.person_limit.count == 7
    assert s.allowed_origins == ("https://www.example.com",)
    spec = s.activities["act:cm:logged-in"]
    assert spec.attributes == frozenset({"str:cm:payment-plan", "bol:cm:account-owner"})
    assert s.person_rate(spec).count == 3
    assert s.person_rate(s.activities["act:cm:signup"]).count == 7
    # The env list selects the enabled ids; the file still describes them.
    s2 = load_settings(env(activities="act:cm:logged-in"), str(path))
    assert list(s2.activities) == ["act:cm:logged-in"]
    assert s2.activities["act:cm:logged-in"].attributes is not None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("listen = 8080\n[activities]\n", None),
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ('config = "other.toml"\n', "gateway.toml: unknown setting 'config'"),
        ("person_limit = true\n", "person_limit"),
        ('[activities."act:cm:x"]\nattributes = ["plan"]\n', "attributes"),
        ('[activities."act:cm:x"]\nperson_limit = "x"\n', "person_limit"),
        ('[activities."act:cm:x"]\ncolour = "red"\n', "colour"),
        ("this is not toml", "gateway.toml"),
    ],
)
def test_file_errors(tmp_path: Path, content: str, needle: str | None) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(content)
    if needle is None:
        with pytest.raises(ConfigError, match="listen"):
            load_settings(env(), str(path))
        return
    with pytest.raises(ConfigError, match=needle):
        load_settings(env(), str(path))


def test_gateway_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('listen = "127.0.0.1:9000"\n')
    assert load_settings(env(config=str(path))).listen.port == 9000


def test_describe_masks_secrets() -> None:
    s = load_settings(env(redis_url="redis://:hunter2@127.0.0.1:6379/0"))
    text = repr(describe(s)) + repr(s)
    assert KEY not in text
    assert "hunter2" not in text
    assert describe(s)["api_key"] == mask(KEY)
    assert mask("") == "(unset)"


def test_settings_repr_hides_the_key() -> None:
    assert KEY not in repr(Settings(api_key=KEY))


def test_abuse_settings() -> None:
    secret = "x" * 40
    s = load_settings(
        env(
            identity_secret=f"{secret}, {'y' * 40}",
            identity_required="true",
            ip_anonymize="yes",
            strict="false",
            read_timeout="5s",
            max_concurrent="64",
            max_body_readers="16",
        )
    )
    assert s.identity_secrets == (secret, "y" * 40)
    assert s.identity_required and s.ip_anonymize and not s.strict
    assert (s.read_timeout, s.max_concurrent, s.max_body_readers) == (5.0, 64, 16)
    assert Settings().max_body_readers < Settings().max_concurrent
    text = repr(s) + repr(describe(s))
    assert secret not in text
    with pytest.raises(ConfigError, match="GATEWAY_IDENTITY_SECRET: each secret needs"):
        load_settings(env(identity_secret="short"))
    with pytest.raises(ConfigError, match="GATEWAY_IDENTITY_REQUIRED: needs"):
        load_settings(env(identity_required="1"))
    with pytest.raises(ConfigError, match="GATEWAY_STRICT"):
        load_settings(env(strict="maybe"))


def test_per_activity_strict_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[activities."act:cm:a"]\nstrict = false\nsigned_identity = true\nidentity_secret = "x"\n'
    )
    with pytest.raises(ConfigError, match="identity_secret"):
        load_settings(env(), str(path))
    path.write_text(
        f'identity_secret = "{"z" * 40}"\n[activities."act:cm:a"]\nstrict = false\n'
        "signed_identity = true\n"
    )
    s = load_settings(env(), str(path))
    spec = s.activities["act:cm:a"]
    assert not s.is_strict(spec)
    assert s.needs_identity(spec)


@pytest.mark.parametrize(
    "content",
    [KEY, KEY + "\n", KEY + "\r\n"],
    ids=["bare", "newline", "crlf"],
)
def test_a_key_files_one_line_ending_is_not_part_of_the_key(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(content.encode())
    assert load_settings({"GATEWAY_API_KEY_FILE": str(key_file)}).api_key == KEY


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (KEY[:20] + "\n" + KEY[20:] + "\n", "a line break inside"),
        (KEY + "\n\n", "a line break at the end"),
        (" " + KEY, "whitespace at the start"),
        (KEY + " \n", "whitespace at the end"),
        (KEY[:20] + "\t" + KEY[20:], "whitespace inside"),
        (KEY[:20] + "\x00" + KEY[20:], "a control character inside"),
        (KEY[:20] + "\u00e9" + KEY[20:], "a non-ASCII character inside"),
    ],
)
def test_a_key_file_with_stray_whitespace_is_refused_without_the_key(
    tmp_path: Path, content: str, needle: str
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(content.encode())
    with pytest.raises(ConfigError) as info:
        load_settings({"GATEWAY_API_KEY_FILE": str(key_file)})
    message = str(info.value)
    assert message.startswith("GATEWAY_API_KEY_FILE: the key in the file has ")
    assert needle in message and "\n" not in message
    assert KEY[:8] not in message and KEY[-8:] not in message


@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({"GATEWAY_API_KEY": KEY[:20] + "\n" + KEY[20:]}, "GATEWAY_API_KEY:"),
        ({"GATEWAY_API_KEY": " " + KEY}, "GATEWAY_API_KEY:"),
        (
            {"GATEWAY_API_KEY": KEY, "GATEWAY_IDENTITY_SECRET": "s" * 20 + "\n" + "s" * 20},
            "GATEWAY_IDENTITY_SECRET:",
        ),
        (
            {"GATEWAY_API_KEY": KEY, "GATEWAY_REDIS_URL": "redis://:pw\nword@h/0"},
            "GATEWAY_REDIS_URL:",
        ),
    ],
    ids=["key-line-break", "key-leading-space", "identity-secret", "redis-url"],
)
def test_secret_settings_with_stray_whitespace_are_refused_unquoted(
    environ: dict[str, str], where: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    message = str(info.value)
    assert message.startswith(where)
    assert "the value is not shown" in message
    for secret in (KEY[:20], KEY[20:], "s" * 20, "word"):
        assert secret not in message


def test_a_secret_variables_trailing_newline_is_dropped() -> None:
    # A secret mounted as a variable from a file keeps the file's line ending.
    s = load_settings({"GATEWAY_API_KEY": KEY + "\n", "GATEWAY_REDIS_URL": "redis://h:6379/0\n"})
    assert (s.api_key, s.redis_url) == (KEY, "redis://h:6379/0")


# Another account's key, pasted into a setting where it does not belong.
OTHER_KEY = "pk-live-fedcba9876543210fedcba9876543210"


@pytest.mark.parametrize(
    ("environ", "hidden"),
    [
        ({"GATEWAY_API_KEY_FILE": OTHER_KEY}, OTHER_KEY),  # the key where its file was expected
        ({"GATEWAY_API_KEY": KEY, "GATEWAY_UPSTREAM_URL": OTHER_KEY}, OTHER_KEY),
        ({"GATEWAY_API_KEY": KEY, "GATEWAY_PERSON_LIMIT": OTHER_KEY}, OTHER_KEY),
        ({"GATEWAY_API_KEY": KEY, "GATEWAY_ACTIVITIES": OTHER_KEY}, OTHER_KEY),
        ({"GATEWAY_API_KEY": KEY, "GATEWAY_TRUSTED_PROXIES": OTHER_KEY}, OTHER_KEY),
        ({"GATEWAY_API_KEY": KEY, "GATEWAY_REGION": KEY}, KEY),
        # Short enough to be quoted, but a secret of these settings: masked.
        ({"GATEWAY_API_KEY": "k3y-short", "GATEWAY_ALLOWED_ORIGINS": "k3y-short"}, "k3y-short"),
        ({"GATEWAY_REDIS_URL": "redis://:hunter22@h/0", "GATEWAY_REGION": "hunter22"}, "hunter22"),
    ],
    ids=[
        "key-file",
        "upstream-url",
        "person-limit",
        "activities",
        "proxies",
        "region",
        "short",
        "redis-password",
    ],
)
def test_a_secret_in_the_wrong_setting_is_not_echoed(environ: dict[str, str], hidden: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    message = str(info.value)
    assert hidden[:10] not in message
    assert message.split(":", 1)[0] == list(environ)[-1]  # it names the setting


def test_settings_list_their_secrets() -> None:
    s = load_settings(
        env(
            identity_secret="i" * 40,
            redis_url="rediss://app:p%40ss@h:6380/0?password=other-pw",
        )
    )
    assert set(s.secrets) == {KEY, "i" * 40, "p%40ss", "p@ss", "other-pw"}


def test_describe_masks_a_secret_given_in_another_setting() -> None:
    s = load_settings(env(redis_prefix=KEY, spool_path=f"/tmp/{KEY}.sqlite3"))
    assert KEY not in repr(describe(s))


# Read by their own functions in `_load`, so declared without a parser.
SPECIAL = {"api_key", "activities", "identity_secret"}


def test_every_field_is_declared_with_a_help_text_and_a_parser() -> None:
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert [d.field for d in FIELD_DECLARATIONS] == fields
    assert [d.name for d in DECLARATIONS] == ["config", *(d.name for d in FIELD_DECLARATIONS)]
    for d in DECLARATIONS:
        assert d.help and "\n" not in d.help and "|" not in d.help, d.name
        assert d.default and "|" not in d.default, d.name
        assert (d.parser is None) == (d.name in SPECIAL or d.env_only), d.name
    names = [n for d in DECLARATIONS for n in d.names]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("d", FIELD_DECLARATIONS, ids=lambda d: d.name)
def test_a_documented_default_is_the_default(d: Declaration) -> None:
    default = getattr(Settings(), d.field or "")
    if not d.default.startswith("`"):  # a phrase: "unset", "empty: refuse all"
        assert not default, d.default
        return
    value = d.default.strip("`")
    assert getattr(load_settings(env(**{d.name: value})), d.field or "") == default


def test_secrets_are_declared_so() -> None:
    secret = "s" * 40
    s = Settings(
        api_key=KEY,
        identity_secrets=(secret,),
        console_token="console-token-1234",
        redis_url="redis://:redis-pw-1234@h:6379/0",
    )
    masked = {d.field for d in FIELD_DECLARATIONS if d.masked}
    assert masked == {"api_key", "identity_secrets", "console_token", "redis_url"}
    assert set(s.secrets) == {KEY, secret, "console-token-1234", "redis-pw-1234"}
    text = repr(s) + repr(describe(s))
    assert not [v for v in s.secrets if v in text]


def test_describe_shows_every_field() -> None:
    shown = describe(Settings())
    assert list(shown) == [*(d.field for d in FIELD_DECLARATIONS), "upstream_endpoint"]
    assert shown["console_token"] == "(unset)"
    assert shown["identity_secrets"] == []


def test_a_cluster_url_with_a_bad_keys_option_is_a_config_error() -> None:
    # check-config says so, rather than `serve` failing at start with a traceback.
    with pytest.raises(ConfigError, match="keys="):
        load_settings(env(redis_url="redis+cluster://127.0.0.1:7000?keys=bogus"))
    ok = load_settings(env(redis_url="redis+cluster://127.0.0.1:7000?keys=per-activity"))
    assert ok.redis_url is not None
