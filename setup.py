"""The build: pure Python by default; with ORTTO_GATEWAY_COMPILE=1, the pure core compiled.

The metadata is in pyproject.toml. `ORTTO_GATEWAY_COMPILE=1` compiles gateway.compiled's
MODULES with mypyc and records the sources it built from (gateway/compiled.json), which
the package checks at import. mypyc type-checks what it compiles, so it builds in an
environment holding mypy and the dependencies: `make compiled` (in place, in the dev
venv), or `ORTTO_GATEWAY_COMPILE=1 pip wheel --no-build-isolation .` (docs/compiled.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "gateway"


def compiled_setup() -> None:
    """setup() with gateway.compiled's MODULES compiled by mypyc into one library."""
    sys.path.insert(0, str(HERE))
    from mypyc.build import mypycify

    from gateway import compiled

    # Taken before compiling: a source edited during the build is then seen as changed.
    recorded = compiled.manifest(PACKAGE)

    class BuildWithManifest(build_ext):
        """build_ext, then the manifest of the sources it compiled."""

        def run(self) -> None:
            super().run()
            target = PACKAGE if self.inplace else Path(self.build_lib) / "gateway"
            compiled.write_manifest(recorded, target)

    paths = [str(compiled.source_path(PACKAGE, m).relative_to(HERE)) for m in compiled.MODULES]
    extensions = mypycify(paths, opt_level="3", group_name=compiled.GROUP)
    # mypyc types them as setuptools' or the stdlib distutils' Extension: setuptools' here.
    setup(ext_modules=extensions, cmdclass={"build_ext": BuildWithManifest})  # type: ignore[arg-type]


if os.environ.get("ORTTO_GATEWAY_COMPILE") == "1":
    compiled_setup()
else:
    setup()
