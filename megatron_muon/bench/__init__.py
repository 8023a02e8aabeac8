"""What the benchmark and study tools under ``tools/`` run: each ``tools/X.py`` is a thin command line over one
module here (``report`` is the part they share: the machine description and the marked sections of
``docs/benchmarks.md``). Importing this package imports nothing."""
