"""Command line of ``megatron_muon.cli.train_tokenizer`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
