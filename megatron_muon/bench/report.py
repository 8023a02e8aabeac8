"""Shared by the benchmark tools: the machine description they print with every table, and rewriting one
tool's marked section of docs/benchmarks.md without touching the others'."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path


def cpu_description() -> str:
    """CPU model, logical CPU count and the matmul-relevant instruction sets (from /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        model = f"{model} (no /proc/cpuinfo)"
    matmul_flags = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model} ({os.cpu_count()} logical CPUs; {', '.join(matmul_flags) or 'no AVX flags found'})"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``"n/a"`` where the system has none."""
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def write_section(path: Path, section: str, start_marker: str, end_marker: str) -> None:
    """Replace the text between the markers (inclusive) in ``path``, or append ``section``, creating the file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end != -1 and end > start:
        rest = text[end + len(end_marker) :].lstrip("\n")
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    elif start != -1 or end != -1:
        raise SystemExit(f"{path} has only one of {start_marker} / {end_marker}; fix it by hand")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def rerun_command(tool: str, argv: list[str] | None) -> str:
    """``python tools/<tool> ARGS…``, the command line that reproduces a section (``argv=None``: this process's)."""
    return shlex.join(["python", f"tools/{tool}", *(sys.argv[1:] if argv is None else argv)])


def publish(section: str, out: str | Path | None, start_marker: str, end_marker: str) -> None:
    """Print ``section``, or write it into the markdown file ``out`` between its markers."""
    if out is None:
        print(section)
        return
    write_section(Path(out), section, start_marker, end_marker)
    print(f"wrote the {start_marker} section of {out}", file=sys.stderr)


def clock_timer(clock: Callable[[], float]) -> Callable[[Callable[[], object]], float]:
    """A ``time_call`` for :func:`interleaved_medians` that reads ``clock`` (e.g. ``time.perf_counter``)."""

    def time_call(function: Callable[[], object]) -> float:
        start = clock()
        function()
        return clock() - start

    return time_call


def interleaved_medians(
    functions: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    time_call: Callable[[Callable[[], object]], float],
) -> dict[str, float]:
    """Median seconds of each function, run alternately ``repeats`` times after ``warmup`` rounds;
    ``time_call(function)`` runs it once and returns the seconds it took."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(time_call(function))
    return {name: statistics.median(values) for name, values in samples.items()}
