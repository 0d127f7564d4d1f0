"""Resilience benchmark: rotation gaps, caller frames lost, 1011 recovery, fuzz frames per second
(see livecall.bench.resilience).

python bench/resilience.py [--fuzz-frames N] [--seed S]
"""

from livecall.bench.resilience import main

raise SystemExit(main())
