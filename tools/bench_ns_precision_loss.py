"""Command line of ``megatron_muon.bench.ns_precision_loss`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.ns_precision_loss import main

if __name__ == "__main__":
    sys.exit(main())
