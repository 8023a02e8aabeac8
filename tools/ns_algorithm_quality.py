"""Command line of ``megatron_muon.bench.ns_algorithm_quality`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.ns_algorithm_quality import main

if __name__ == "__main__":
    sys.exit(main())
