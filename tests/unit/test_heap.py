"""fleet.heap: what start-up made is frozen out of later full collections."""

from __future__ import annotations

import gc

from fleet import heap


def test_freeze_moves_the_live_heap_out_of_the_collectors_walk() -> None:
    kept = [object() for _ in range(10)]  # a tracked container, alive across the freeze
    try:
        frozen = heap.freeze()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # not walked any more
        later: list[object] = []
        assert any(o is later for o in gc.get_objects())  # what comes after still is
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
