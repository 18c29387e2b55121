"""`serve --workers`: a number, or `auto` for one worker per usable CPU."""

from __future__ import annotations

import argparse
import os

import pytest

from gateway.cli import worker_count


def test_auto_is_one_worker_per_cpu_this_process_may_use() -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert worker_count("auto") == usable
    assert worker_count(" AUTO ") == usable


def test_a_number_is_taken_as_given() -> None:
    assert worker_count("3") == 3


def test_anything_else_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="nor auto"):
        worker_count("many")
