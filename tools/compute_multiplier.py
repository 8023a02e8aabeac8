"""Command line of ``megatron_muon.bench.compute_multiplier`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.compute_multiplier import main

if __name__ == "__main__":
    sys.exit(main())
