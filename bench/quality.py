"""Quality benchmark: PESQ through each carrier adapter vs an ideal (see livecall.bench.quality).

python bench/quality.py [--carriers twilio,telnyx,plivo,vonage,exotel] [--adapters-only]
                        [--pacing unpaced|paced|both] [--clips]
"""

from livecall.bench.quality import main

raise SystemExit(main())
