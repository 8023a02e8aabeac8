"""Command line of ``megatron_muon.cli.plot_scaling`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.cli.plot_scaling import main

if __name__ == "__main__":
    sys.exit(main())
