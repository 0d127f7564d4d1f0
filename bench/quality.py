"""Quality benchmark: PESQ through the bridge vs an ideal conversion (see livecall.bench.quality).

python bench/quality.py [--pacing unpaced|paced|both]
"""

from livecall.bench.quality import main

raise SystemExit(main())
