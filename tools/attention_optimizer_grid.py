"""Command line of ``megatron_muon.bench.attention_optimizer_grid`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.attention_optimizer_grid import main

if __name__ == "__main__":
    sys.exit(main())
