"""Command line of ``megatron_muon.cli.convert_checkpoint`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
