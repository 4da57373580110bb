"""The aux node's gc loop: when it collects the young generations and freezes what survives."""

from __future__ import annotations

import gc

from dcache.auxnode.node import GC_FREEZE_INTERVAL_S, freeze_due


def test_a_freeze_is_due_once_a_young_collection_ran_or_the_interval_passed() -> None:
    """Freezing as soon as a young collection has run keeps each collection before a freeze small under a stream
    of new keys; with no new objects it still happens every interval."""
    gc.collect(1)  # generation 1 empty, its count 0: as right after the loop's own collection
    assert not freeze_due(0.0)
    assert not freeze_due(GC_FREEZE_INTERVAL_S / 2)
    assert freeze_due(GC_FREEZE_INTERVAL_S)
    gc.collect(0)  # what the collector does by itself every GC_GEN0_THRESHOLD allocations
    assert freeze_due(0.0)
    gc.collect(1)
    assert not freeze_due(0.0)
