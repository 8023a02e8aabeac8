"""Command line of ``megatron_muon.bench.pareto_frontier`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.pareto_frontier import main

if __name__ == "__main__":
    sys.exit(main())
