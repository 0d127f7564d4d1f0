"""Load benchmark: concurrent calls vs echo round trip, CPU and memory (see livecall.bench.load).

python bench/load.py            # levels 10,50,100,150,200; hold 20 s
python bench/load.py --quick    # levels 10,50; hold 8 s
"""

from livecall.bench.load import main

raise SystemExit(main())
