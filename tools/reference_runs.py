"""Command line of ``megatron_muon.bench.reference_runs`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.reference_runs import main

if __name__ == "__main__":
    sys.exit(main())
