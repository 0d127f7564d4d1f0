"""The cyclic garbage collector, out of the way of a long-running call server.

A serving process holds ~250,000 objects that imports and startup made and that never die
(modules, SDK and pydantic schemas, SQLAlchemy). Every full collection walks all of them:
125 ms of CPU on this machine (`docs/benchmarks.md`), during which the event loop, and so
every call's audio, stands still. Full collections come whenever enough call objects have
outlived two young collections: a burst of arrivals, a long call's playout and turn state.
`gc.freeze()` once startup is done moves startup's objects out of the collector's sight, so
a full collection walks only what the live calls hold. Cycles made later are still found.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_objects"]


def freeze_startup_objects() -> int:
    """Collect once, then freeze what survived (startup's objects); returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
