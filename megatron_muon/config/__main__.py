"""``python -m megatron_muon.config CONFIG [overrides] [--print]``: see ``cli.py``."""

import sys

from megatron_muon.config.cli import main

if __name__ == "__main__":
    sys.exit(main())
