"""`python -m tests.bench [--duration S] [--json PATH] [--quick]` (what `make bench` runs)."""

from __future__ import annotations

import sys

from tests.bench.run import main

sys.exit(main())
