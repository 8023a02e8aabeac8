"""Command line of ``megatron_muon.bench.pretrain_throughput`` (``--help``, or that module's docstring, says what it does)."""

import sys

from megatron_muon.bench.pretrain_throughput import timed_main

if __name__ == "__main__":
    sys.exit(timed_main())
