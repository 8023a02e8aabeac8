"""Kept for tools/bench_muon_step.py, which still imports its sibling: the helpers live in
``megatron_muon.bench.report``. Delete this file once bench_muon_step.py imports from there."""

from megatron_muon.bench.report import (  # noqa: F401  (re-exported)
    clock_timer,
    cpu_description,
    interleaved_medians,
    load_average,
    publish,
    rerun_command,
    write_section,
)
