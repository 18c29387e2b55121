"""gateway.compiled: a mypyc build runs only whole and current; the switch runs the sources.

The choice is tested on copies of the package holding a made-up build (a manifest, and
files named as the extensions that no Python could load), so these tests mean the same
with or without a real build in the tree. The last test checks this process: under
`make test-compiled` (ORTTO_GATEWAY_EXPECT_COMPILED=1) that the real build runs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway import compiled
from gateway.compiled import GROUP, MODULES, NO_EXTENSIONS, Choice, choose

PACKAGE = Path(gateway.__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this Python's: .cpython-311-...so


def sources(tmp_path: Path) -> Path:
    """A copy of the package's sources, without any build."""
    copy = tmp_path / "gateway"
    skip = shutil.ignore_patterns("__pycache__", "*.so", compiled.MANIFEST)
    shutil.copytree(PACKAGE, copy, ignore=skip)
    return copy


def made_up_build(tmp_path: Path) -> Path:
    """A copy of the package with a current manifest and an unloadable file in place of
    each extension: importing one of them fails, so a test sees which file is loaded."""
    copy = sources(tmp_path)
    compiled.write_manifest(compiled.manifest(copy), copy)
    for module in (*MODULES, GROUP):
        stem = compiled.extension_stem(copy, module)
        stem.with_name(stem.name + SUFFIX).write_bytes(b"not an extension")
    return copy


def edit(package: Path, module: str) -> None:
    with compiled.source_path(package, module).open("a") as f:
        f.write("# edited after the build\n")


def test_without_a_build_the_sources_run(tmp_path: Path) -> None:
    assert choose(sources(tmp_path), {}) == Choice(())


def test_a_whole_and_current_build_runs(tmp_path: Path) -> None:
    assert choose(made_up_build(tmp_path), {}) == Choice(MODULES)


def test_the_switch_runs_the_sources_without_a_warning(tmp_path: Path) -> None:
    assert choose(made_up_build(tmp_path), {NO_EXTENSIONS: "1"}) == Choice(())


@pytest.mark.parametrize("module", [MODULES[0], MODULES[-1], "gateway.keys"])
def test_a_source_edited_since_the_build_sets_the_whole_build_aside(
    tmp_path: Path, module: str
) -> None:
    # gateway.keys is not compiled, but compiled code holds copies of its constants.
    package = made_up_build(tmp_path)
    edit(package, module)
    path = compiled.source_path(package, module).relative_to(package.parent).as_posix()
    assert choose(package, {}) == Choice((), f"{path} changed since the build")
    for name in ("added.py", "limits/added.py"):
        (package / name).write_text("")
    changed = sorted(["gateway/added.py", "gateway/limits/added.py", path])
    expected = f"{', '.join(changed)} changed since the build"
    assert choose(package, {}) == Choice((), expected)


def test_a_build_for_another_python_is_set_aside(tmp_path: Path) -> None:
    package = made_up_build(tmp_path)
    stem = compiled.extension_stem(package, GROUP)
    stem.with_name(stem.name + SUFFIX).unlink()
    assert choose(package, {}) == Choice((), f"no extension of {GROUP} for this Python")


def test_a_build_of_other_modules_is_set_aside(tmp_path: Path) -> None:
    package = made_up_build(tmp_path)
    recorded = compiled.manifest(package)
    compiled.write_manifest({**recorded, "compiled": [*MODULES, "gateway.cli"]}, package)
    expected = "the build compiled other modules than gateway.compiled.MODULES"
    assert choose(package, {}) == Choice((), expected)
    not_a_manifest = Choice((), f"{compiled.MANIFEST} is not a build's manifest")
    compiled.write_manifest({**recorded, "sources": ["gateway/relay.py"]}, package)
    assert choose(package, {}) == not_a_manifest
    (package / compiled.MANIFEST).write_text("{")
    assert choose(package, {}) == not_a_manifest


def run_python(package: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -c code` importing `package` (its parent first on sys.path)."""
    environ = {k: v for k, v in os.environ.items() if k != NO_EXTENSIONS} | env
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=package.parent,
        env=environ | {"PYTHONPATH": str(package.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )


IMPORT_ALL = f"""
import importlib, json
from gateway import compiled
files = [importlib.import_module(m).__file__ for m in {MODULES!r}]
print(json.dumps({{"active": compiled.active(), "files": files}}))
"""


@pytest.mark.integration
@pytest.mark.parametrize("how", ["edited", "switch"])
def test_the_sources_are_imported_past_a_build_set_aside(tmp_path: Path, how: str) -> None:
    package = made_up_build(tmp_path)
    env = {NO_EXTENSIONS: "1"} if how == "switch" else {}
    if how == "edited":
        edit(package, MODULES[0])
    done = run_python(package, IMPORT_ALL, **env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["active"] == []
    assert out["files"] == [str(compiled.source_path(package, m)) for m in MODULES]


@pytest.mark.integration
def test_a_current_build_is_what_python_imports(tmp_path: Path) -> None:
    # The made-up extension is loaded, and fails: without the switch, the build runs.
    package = made_up_build(tmp_path)
    done = run_python(package, IMPORT_ALL)
    stem = compiled.extension_stem(package, MODULES[0])
    assert done.returncode != 0
    assert f"ImportError: {stem}{SUFFIX}" in done.stderr


@pytest.mark.integration
def test_check_config_says_whether_it_runs_compiled_and_why_not(tmp_path: Path) -> None:
    package = made_up_build(tmp_path)
    edit(package, MODULES[0])
    code = "import sys; from gateway.cli import main; sys.exit(main(['check-config']))"
    done = run_python(package, code, GATEWAY_API_KEY="k" * 32)
    assert done.returncode == 0, done.stderr
    assert "ortto-gateway: compiled: no\n" in done.stderr
    path = compiled.source_path(package, MODULES[0]).relative_to(package.parent).as_posix()
    assert (
        f"ortto-gateway: warning: compiled modules ignored: {path} changed since the build\n"
        in done.stderr
    )


def test_this_process_runs_what_the_tree_holds() -> None:
    files = {m: importlib.import_module(m).__file__ or "" for m in MODULES}
    running = [m for m, path in files.items() if not path.endswith(".py")]
    assert running == compiled.active()
    assert compiled.summary() == (f"yes ({len(running)} modules)" if running else "no")
    if os.environ.get("ORTTO_GATEWAY_EXPECT_COMPILED") == "1":  # make test-compiled
        assert running == list(MODULES)
        assert all(path.endswith(SUFFIX) for path in files.values())


def test_a_build_set_aside_is_one_warning_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for choice in (Choice(MODULES), Choice(())):  # running a build, or none there
        monkeypatch.setattr(compiled, "_choice", choice)
        compiled.warn_if_ignored()
    monkeypatch.setattr(compiled, "_choice", Choice((), "gateway.cors changed since the build"))
    compiled.warn_if_ignored()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "compiled modules ignored, running pure Python: gateway.cors changed since the "
            "build (rebuild: make compiled)",
        )
    ]


def test_no_class_outside_the_build_subclasses_one_inside_it() -> None:
    """Compiled, `isinstance(x, C)` for a compiled class C knows only the subclasses built
    with it: an interpreted subclass fails the test (LimiterClosed, defined in fallback.py,
    once answered 500 for 503). Checked on the sources, so with or without a build."""
    inside = set(MODULES)
    found = []
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if info.name in inside or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == info.name:
                found += [
                    f"{info.name}.{name} <- {base.__module__}.{base.__qualname__}"
                    for base in value.__mro__[1:]
                    if base.__module__ in inside
                ]
    assert found == []
