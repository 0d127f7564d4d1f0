"""The server freezes startup's objects out of the cyclic collector, and still collects cycles.

Run in a child interpreter: freezing is process-wide and must not change this test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = """
import gc, json, weakref
import livecall.server.app  # what a serving process has imported
from livecall.server.gc_tuning import freeze_startup_objects

before = len(gc.get_objects())
frozen = freeze_startup_objects()

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after startup: only the collector can free it
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({
    "before": before,
    "frozen": frozen,
    "tracked_after": len(gc.get_objects()),
    "cycle_freed": gone() is None,
}))
"""


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # nearly everything startup made is out of the collector's sight ...
    assert result["frozen"] >= 0.9 * result["before"]
    assert result["tracked_after"] < 0.05 * result["before"]
    # ... and a cycle made afterwards is still found and freed
    assert result["cycle_freed"] is True
