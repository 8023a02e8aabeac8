"""Command line of ``megatron_muon.bench.mup_tables`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.mup_tables import main

if __name__ == "__main__":
    sys.exit(main())
