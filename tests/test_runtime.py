"""How commands run: the collector's settings while serving."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.runtime import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_and_raises_only_the_young_threshold() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    start_up = [{"built": n} for n in range(100)]  # what start-up built, still referenced
    tune_gc()
    assert gc.get_freeze_count() >= len(start_up)
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    assert before[0] < GC_YOUNG_THRESHOLD
