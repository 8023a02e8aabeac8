"""Command line of ``megatron_muon.cli.plan_at_scale`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.cli.plan_at_scale import main

if __name__ == "__main__":
    sys.exit(main())
