"""Command line of ``megatron_muon.bench.contended_collective`` (``--help``, or that module's docstring, says what it
does)."""

import sys

from megatron_muon.bench.contended_collective import main

if __name__ == "__main__":
    sys.exit(main())
