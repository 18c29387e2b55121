"""Ortto activities gateway."""

__version__ = "0.1.0"
