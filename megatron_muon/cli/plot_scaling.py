"""Plot predicted optimizer-step time and memory per GPU against world size from ``tools/plan_at_scale.py --json``
reports, one line per optimizer mode and model (docs/scaling.md). Everything plotted is predicted, not measured.

    .venv/bin/python tools/plot_scaling.py --out docs/scaling.png moonlight=plan_64.json moonlight=plan_512.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any


def main(argv: list[str] | None = None) -> int:
    """Plot the predicted step time and memory of the ``LABEL=REPORT.json`` reports; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports", nargs="+", help="LABEL=REPORT.json (plan_at_scale --json output)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float, float]]] = defaultdict(list)
    gpu: dict[str, Any] = {}  # the reports' GPU (nargs='+': at least one report sets it)
    for item in args.reports:
        label, _, path = item.partition("=")
        if not path:
            print(f"error: {item!r} is not LABEL=REPORT.json", file=sys.stderr)
            return 2
        with open(path) as handle:
            report = json.load(handle)
        gpu = report["gpu"]
        for mode, figures in report["modes"].items():
            series[(label, mode)].append(
                (report["world_size"], figures["step_seconds"] * 1e3, figures["memory_max_bytes"] / 1e9)
            )
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
    # One colour per optimizer mode, one line style and marker per model.
    modes = sorted({mode for _, mode in series})
    labels = sorted({label for label, _ in series})
    colours = {mode: f"C{i}" for i, mode in enumerate(modes)}
    looks = {
        label: (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))[i % 4] for i, label in enumerate(labels)
    }
    for (label, mode), points in sorted(series.items()):
        points.sort()
        worlds = [p[0] for p in points]
        style, marker = looks[label]
        for axis, column in ((time_axis, 1), (memory_axis, 2)):
            axis.plot(
                worlds,
                [p[column] for p in points],
                style,
                marker=marker,
                color=colours[mode],
                label=f"{label}: {mode}",
            )
    for axis, title in (
        (time_axis, "predicted optimizer step (ms), slowest rank"),
        (memory_axis, "predicted memory per GPU (GB), largest rank"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("GPUs")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    for capacity in (80, 141):
        memory_axis.axhline(capacity, color="grey", linewidth=0.8)
        memory_axis.annotate(
            f"{capacity} GB", (memory_axis.get_xlim()[0], capacity), fontsize=7, color="grey"
        )
    time_axis.legend(fontsize=6, ncol=2)
    figure.suptitle(f"PREDICTED (not measured) on {gpu['name']}: tools/plan_at_scale.py cost model")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
