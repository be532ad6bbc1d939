"""``python -m harness``: the ``harness`` command."""

import sys

from harness.bench.cli import main

sys.exit(main())
