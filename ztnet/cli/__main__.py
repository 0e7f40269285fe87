"""``python -m ztnet.cli``: what tests, the lab and benchmarks run as ``ztnet``."""

import sys

from ztnet.cli import main

sys.exit(main())
