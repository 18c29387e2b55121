"""Which modules run compiled: a mypyc build of the pure core, or the Python sources.

A build made with `ORTTO_GATEWAY_COMPILE=1` (setup.py; `make compiled` in place) compiles
MODULES and writes MANIFEST beside them: the hash of every source of the package, since
compiled code also depends on the modules it imports (mypyc copies their `Final`
constants into it). `gateway/__init__.py` calls `install` before any other module is
imported, and the build runs only when it is whole and current: every module compiled for
this Python, every source unchanged since. Otherwise, or when ORTTO_GATEWAY_NO_EXTENSIONS
is set (as aiohttp's AIOHTTP_NO_EXTENSIONS), every one of MODULES is imported from its
`.py` file. All or nothing: modules compiled together call each other directly in C, so a
build is never mixed with pure modules, and an edited source never runs as the build's
older code. docs/compiled.md has the gain per module and how to build.

Not a `GATEWAY_` variable: those are settings, and an unknown one is refused.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

# What `ORTTO_GATEWAY_COMPILE=1` compiles, chosen by measured gain (docs/compiled.md).
MODULES = (
    "gateway.validation",
    "gateway.relay",
    "gateway.limits.base",
    "gateway.limits.memory",
    "gateway.limits.limiter",
    "gateway.client_ip",
    "gateway.identity",
    "gateway.body",
    "gateway.metrics",
    "gateway.middlewares",
)
# The library mypyc builds them into (beside them: gateway/_native__mypyc.*.so).
GROUP = "gateway._native"
# Written by the build beside this file: {module: sha256 of its source}.
MANIFEST = "compiled.json"
NO_EXTENSIONS = "ORTTO_GATEWAY_NO_EXTENSIONS"

PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(package_dir: Path, module: str) -> Path:
    """The `.py` file of `module` (a dotted name under `gateway`) in `package_dir`."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def manifest(package_dir: Path) -> dict[str, Any]:
    """What a build of `package_dir` records: MODULES and the sha256 of every source."""
    sources = {
        path.relative_to(package_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(package_dir.rglob("*.py"))
    }
    return {"compiled": list(MODULES), "sources": sources}


def write_manifest(recorded: Mapping[str, Any], target_dir: Path) -> None:
    """Write a build's `manifest` (taken before compiling) in `target_dir`."""
    (target_dir / MANIFEST).write_text(json.dumps(recorded, indent=1) + "\n")


@dataclass(frozen=True)
class Choice:
    """The modules running compiled (none: pure Python), and why a build present is not
    run (None when it runs, when there is none, or when the switch asked for pure)."""

    compiled: tuple[str, ...]
    ignored: str | None = None


def choose(package_dir: Path, environ: Mapping[str, str]) -> Choice:
    """Whether the build in `package_dir` runs: only when it is whole and current."""
    if environ.get(NO_EXTENSIONS):
        return Choice(())
    try:
        recorded = json.loads((package_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return Choice(())
    except ValueError:
        return Choice((), f"{MANIFEST} is not a build's manifest")
    now = manifest(package_dir)
    if not isinstance(recorded, dict) or recorded.get("compiled") != now["compiled"]:
        return Choice((), "the build compiled other modules than gateway.compiled.MODULES")
    before, after = recorded.get("sources") or {}, now["sources"]
    if not isinstance(before, dict):
        return Choice((), f"{MANIFEST} is not a build's manifest")
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        return Choice((), f"{_names([f'gateway/{p}' for p in changed])} changed since the build")
    missing = [m for m in (*MODULES, GROUP) if not _has_extension(package_dir, m)]
    if missing:
        return Choice((), f"no extension of {_names(missing)} for this Python")
    return Choice(MODULES)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} and {len(names) - 1} more"


def extension_stem(package_dir: Path, module: str) -> Path:
    """The path of `module`'s extension (or GROUP's library) without its suffix, which
    names the Python it is for (`.cpython-311-x86_64-linux-gnu.so`)."""
    stem = source_path(package_dir, module).with_suffix("")
    return stem.with_name(f"{stem.name}__mypyc") if module == GROUP else stem


def _has_extension(package_dir: Path, module: str) -> bool:
    stem = extension_stem(package_dir, module)
    return any(
        stem.with_name(stem.name + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES
    )


class _Sources(importlib.abc.MetaPathFinder):
    """Imports each of MODULES from its `.py` file, passing over an extension beside it."""

    def __init__(self, package_dir: Path) -> None:
        self._package_dir = package_dir

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(
            fullname, source_path(self._package_dir, fullname)
        )


_choice = Choice(())


def install(package_dir: Path = PACKAGE_DIR, environ: Mapping[str, str] = os.environ) -> None:
    """Choose once, before MODULES are imported; when pure, import them from source."""
    global _choice
    _choice = choose(package_dir, environ)
    if not _choice.compiled:
        sys.meta_path.insert(0, _Sources(package_dir))


def active() -> list[str]:
    """The modules that run compiled in this process (empty: pure Python)."""
    return list(_choice.compiled)


def summary() -> str:
    """For the start-up log and `check-config`: "yes (N modules)" or "no"."""
    return f"yes ({len(_choice.compiled)} modules)" if _choice.compiled else "no"


def ignored() -> str | None:
    """Why a build present is not run (a source edited since), or None."""
    return _choice.ignored


def warn_if_ignored() -> None:
    """One warning when a build is present but not run: at a command's start, once
    logging is set up."""
    if _choice.ignored is not None:
        logging.getLogger(__name__).warning(
            "compiled modules ignored, running pure Python: %s (rebuild: make compiled)",
            _choice.ignored,
        )
