"""Command line of ``megatron_muon.cli.rehearse_gpu`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.cli.rehearse_gpu import main

if __name__ == "__main__":
    sys.exit(main())
