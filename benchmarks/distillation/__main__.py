"""``python -m antidistill.benchmarks.distillation CONFIG`` (also ``antidistill eval CONFIG``)."""

from __future__ import annotations

import sys

from antidistill.benchmarks.distillation.cli import main

if __name__ == "__main__":
    sys.exit(main())
