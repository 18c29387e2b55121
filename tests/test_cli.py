"""The command line: check-config, dead-letters list/replay/purge, errors with exit code 2."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from gateway import compiled
from gateway.cli import main
from gateway.config import DECLARATIONS, env_name
from gateway.settings_docs import documents, settings_help, table_in
from gateway.spool import Spool, claim
from gateway.validation import ActivityBody
from tests.conftest import API_KEY
from tests.spool_support import to_queue

ENV = {"GATEWAY_API_KEY": API_KEY, "GATEWAY_ACTIVITIES": "act:cm:login"}
ROOT = Path(__file__).resolve().parents[1]


def test_check_config_prints_masked_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"], ENV) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["api_key"].startswith("****")
    assert API_KEY not in out.out + out.err
    assert data["upstream_endpoint"] == "https://api.ap3api.com/v1/activities/create"
    assert out.err == f"ortto-gateway: compiled: {compiled.summary()}\n"


def test_check_config_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"], {**ENV, "GATEWAY_IP_LIMIT": "100 per hour"}) == 2
    err = capsys.readouterr().err
    assert err.startswith("ortto-gateway: GATEWAY_IP_LIMIT:")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=****"),
        (
            "redis://h:6379/0?db=1&password=s3cret&ssl_cert_reqs=none",
            "redis://h:6379/0?db=1&password=****&ssl_cert_reqs=none",
        ),
        (
            "rediss://app:s3cret@h:6380/0?password=s3cret",
            "rediss://app:****@h:6380/0?password=****",
        ),
        ("redis://h:6379/0?db=1", "redis://h:6379/0?db=1"),
    ],
)
def test_check_config_masks_redis_passwords(
    url: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config"], {**ENV, "GATEWAY_REDIS_URL": url}) == 0
    out = capsys.readouterr()
    assert "s3cret" not in out.out + out.err
    assert json.loads(out.out)["redis_url"] == shown


def test_serve_without_key_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"], {}) == 2
    assert "GATEWAY_API_KEY" in capsys.readouterr().err


def test_check_config_warns_when_no_activity_is_enabled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config"], {"GATEWAY_API_KEY": API_KEY}) == 0
    assert "GATEWAY_ACTIVITIES is empty" in capsys.readouterr().err


async def _spool_with_dead_letters(path: Path) -> None:
    spool = Spool(path)
    await spool.open()
    try:
        ids = await spool.put(
            to_queue([orjson.dumps({"activity_id": "act:cm:login", "n": i}) for i in range(3)])
        )
        await spool.dead_letter(
            [
                (ids[0], "act:cm:login", "a1b2c3d4e5f6", "failed to validate field str::x"),
                (ids[1], "act:cm:login", "0f0f0f0f0f0f", "Created date is more than 90 days ago"),
                (ids[2], "act:cm:login", "123456789abc", "failed to validate field str::y"),
            ]
        )
    finally:
        await spool.close()


async def _depth(path: Path) -> tuple[int, int]:
    spool = Spool(path)
    await spool.open()
    try:
        stats = await spool.stats()
        return stats.depth, stats.dead_letters
    finally:
        await spool.close()


async def test_dead_letters_list_replay_purge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.sqlite3"
    await _spool_with_dead_letters(path)
    env = {"GATEWAY_SPOOL_PATH": str(path)}

    def run(*args: str) -> int:
        # The CLI runs its own event loop: call it from a thread-free sync context.
        return main(["dead-letters", *args], env)

    loop_free = await _run_sync(run, "list", "--json")
    assert loop_free == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["person"] for r in rows} == {"a1b2c3d4e5f6", "0f0f0f0f0f0f", "123456789abc"}
    assert all({"id", "activity_id", "person", "error", "failed_at"} <= set(r) for r in rows)

    assert await _run_sync(run, "replay", "--error", "str::x") == 0
    out, err = capsys.readouterr()
    assert "re-queued 1 activity" in out
    # No gateway runs here: say when the re-queued activity will go out.
    assert f"no running gateway drains {path}" in err
    assert await _depth(path) == (1, 2)
    held = claim(str(path))  # as a running gateway holds its spool
    try:
        assert await _run_sync(run, "replay", "--error", "90 days") == 0
    finally:
        os.close(held)
    out, err = capsys.readouterr()
    assert "re-queued 1 activity" in out and "warning" not in err
    assert await _depth(path) == (2, 1)

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert await _run_sync(run, "purge") == 2  # not interactive, no --yes
    assert await _depth(path) == (2, 1)
    assert await _run_sync(run, "purge", "--yes") == 0
    assert "deleted 1" in capsys.readouterr().out
    assert await _depth(path) == (2, 0)


async def _run_sync(fn: Callable[..., int], *args: str) -> int:
    import asyncio

    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "{config}", "list", "--json"],
        ["list", "--json", "--config", "{config}"],
        ["--spool", "{spool}", "list", "--json"],
        ["list", "--spool", "{spool}", "--json"],
        ["replay", "--config", "{config}"],
        ["purge", "--yes", "--spool", "{spool}"],
    ],
)
def test_dead_letters_options_before_or_after_the_action(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool.sqlite3"
    asyncio.run(_spool_with_dead_letters(spool))
    config = tmp_path / "gateway.toml"
    config.write_text(f"spool_path = {str(spool)!r}\n")
    argv = [a.format(config=config, spool=spool) for a in args]
    # No GATEWAY_SPOOL_PATH: the spool is found only through the option.
    assert main(["dead-letters", *argv], {}) == 0
    out = capsys.readouterr().out
    if "list" in args:
        assert len(out.splitlines()) == 3
    else:
        assert ("re-queued 3" if "replay" in args else "deleted 3") in out


def test_dead_letters_without_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"GATEWAY_SPOOL_PATH": str(tmp_path / "missing.sqlite3")}
    assert main(["dead-letters", "list"], env) == 1
    assert "no spool" in capsys.readouterr().err


def test_sign_identity_prints_a_token_the_gateway_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    from gateway.identity import verify_identity

    secret = "s" * 40
    assert (
        main(
            ["sign-identity", "Chris@Example.com", "--ttl", "1h"],
            {"GATEWAY_IDENTITY_SECRET": secret},
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    activity: ActivityBody = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "chris@example.com"},
    }
    verify_identity(token, activity, [secret], time.time())
    assert main(["sign-identity", "a@b.c"], {}) == 2
    assert "GATEWAY_IDENTITY_SECRET" in capsys.readouterr().err
    env = {"GATEWAY_IDENTITY_SECRET": secret}
    assert main(["sign-identity", "--person-id", "006a0f"], env) == 0
    token = capsys.readouterr().out.strip()
    by_id: ActivityBody = {**activity, "person_id": "006a0f"}
    verify_identity(token, by_id, [secret], time.time())
    for both_or_neither in (["a@b.c", "--person-id", "006a0f"], []):
        assert main(["sign-identity", *both_or_neither], env) == 2
        assert "EMAIL or --person-id" in capsys.readouterr().err


def test_check_config_refuses_a_key_file_with_a_line_break_inside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to pass check-config; then every batch failed (aiohttp refuses the header).
    key_file = tmp_path / "ortto-key"
    key_file.write_text(API_KEY[:16] + "\n" + API_KEY[16:] + "\n")
    env = {"GATEWAY_API_KEY_FILE": str(key_file), "GATEWAY_ACTIVITIES": "act:cm:login"}
    assert main(["check-config"], env) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("ortto-gateway: GATEWAY_API_KEY_FILE: the key in the file has ")
    assert "line break inside" in out.err and out.err.count("\n") == 1
    assert API_KEY[:16] not in out.err and API_KEY[16:] not in out.err
    key_file.write_text(API_KEY + "\n")  # one line ending is how files end: fine
    assert main(["check-config"], env) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["api_key"].startswith("****(40 chars")
    assert API_KEY not in out.out + out.err


def test_check_config_does_not_echo_a_key_given_in_the_wrong_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config"], {**ENV, "GATEWAY_API_KEY_FILE": API_KEY}) == 0
    assert main(["check-config"], {"GATEWAY_API_KEY_FILE": API_KEY}) == 2
    assert main(["check-config"], {**ENV, "GATEWAY_UPSTREAM_URL": API_KEY}) == 2
    assert main(["check-config"], {**ENV, "GATEWAY_REDIS_PREFIX": API_KEY}) == 0
    out = capsys.readouterr()
    assert API_KEY[:10] not in out.out + out.err


async def test_dead_letters_list_shows_stored_errors_bounded_and_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Earlier versions stored Ortto's text as it came: the listing still shows it safely.
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path)
    await spool.open()
    try:
        (item,) = await spool.put(to_queue([orjson.dumps({"activity_id": "act:cm:login"})]))
        echoed = f"bad key {API_KEY}\n\x1b[2Jforged line " + "x" * 1000
        await spool.dead_letter([(item, "act:cm:login", "a1b2c3d4e5f6", echoed)])
    finally:
        await spool.close()
    env = {**ENV, "GATEWAY_SPOOL_PATH": str(path)}
    assert await asyncio.to_thread(main, ["dead-letters", "list"], env) == 0
    out = capsys.readouterr().out
    assert API_KEY not in out and "\x1b" not in out
    (line,) = out.splitlines()
    assert "bad key **** [2Jforged line x" in line and len(line) < 500
    assert await asyncio.to_thread(main, ["dead-letters", "list", "--json"], env) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["error"].startswith("bad key **** [2Jforged line") and len(row["error"]) == 300
    # The filter still finds it by what was stored.
    assert await asyncio.to_thread(main, ["dead-letters", "replay", "--error", "bad key"], env) == 0
    assert "re-queued 1 activity" in capsys.readouterr().out


def test_sandbox_refuses_a_bad_person_field_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "--person-fields", "str:cm:tier,tier"], ENV) == 2
    err = capsys.readouterr().err
    assert err.startswith("ortto-gateway: --person-fields:")
    assert "'tier'" in err


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_help_lists_every_setting(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"], {})
    assert info.value.code == 0
    assert settings_help() in capsys.readouterr().out


def test_every_setting_is_in_the_table_check_config_and_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config"], ENV) == 0
    shown = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["serve", "--help"], {})
    help_text = capsys.readouterr().out
    tables = [table_in(p.read_text(encoding="utf-8")) or "" for p in documents(ROOT)]
    assert tables
    for d in DECLARATIONS:
        for name in (env_name(n) for n in d.names):
            assert all(f"`{name}`" in table for table in tables), name
            assert name in help_text, name
        assert d.field in shown or d.env_only, d.name
