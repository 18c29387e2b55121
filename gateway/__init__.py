"""Ortto activities gateway."""

from gateway import compiled

__version__ = "0.1.0"

# Before any other gateway module is imported: a mypyc build, or the sources.
compiled.install()
