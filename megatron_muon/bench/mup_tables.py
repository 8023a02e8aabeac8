"""The two muP tables of issue #16 (docs/benchmarks.md, "Issue #16"), written from the sweeps' own outputs:

    .venv/bin/python tools/mup_tables.py --sweeps docs/mup_sweeps_16 --markdown docs/benchmarks.md

``--sweeps`` holds one folder per ``tools/mup_sweep.py`` run, each with its ``best.json`` and ``trials.csv``
(what ``mup_sweep`` writes to its ``--out``), named as the commands in docs/benchmarks.md name them:

- ``mup_transfer_<seed>`` and ``sp_transfer_<seed>``: equal 3 × 3 grids (×2) of Muon LR × AdamW LR at every width
  (``--no-telescope --radius 1``), muP and the standard parametrization;
- ``mup_base_<seed>`` and ``sp_base_<seed>`` (optional): the base width's optimum trained at the wider widths as it
  is (``--radius 0``), for the "not re-tuned" column when the transfer grid did not contain that point;
- ``telescoping``: the telescoping muP sweep (seed of the config).

Table 1 compares each width's best of muP and SP per seed (and the base optimum used unchanged); table 2 the
telescoping sweep against the full ×2 grid of the first seed, with the compute each cost. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_muon.bench.report import publish, rerun_command

START, END = "<!-- mup_tables:start -->", "<!-- mup_tables:end -->"
MUON, ADAMW = "optimizer.muon.lr", "optimizer.lr"
Sweep = dict[str, object]


def load_sweep(folder: Path) -> tuple[Sweep, list[dict[str, str]]]:
    """A sweep's summary (``best.json``) and its trials (``trials.csv``)."""
    summary = json.loads((folder / "best.json").read_text())
    with (folder / "trials.csv").open(newline="") as handle:
        return summary, list(csv.DictReader(handle))


def widths(summary: Sweep) -> list[dict[str, object]]:
    """The per-width results of a sweep's summary, base width first."""
    return summary["widths"]  # type: ignore[return-value]


def _pair(values: dict[str, float]) -> str:
    return f"{values[MUON]:g}, {values[ADAMW]:g}"


def loss_at(trials: Sequence[dict[str, str]], width: int, values: dict[str, float]) -> float | None:
    """The validation loss of the trial at ``width`` with exactly ``values`` (6 significant digits), if run."""
    for row in trials:
        if int(row["width"]) == width and all(
            f"{float(row[name]):.6g}" == f"{value:.6g}" for name, value in values.items()
        ):
            return float(row["validation_loss"])
    return None


def seeds_of(root: Path) -> list[int]:
    """The seeds with both a muP and an SP transfer sweep under ``root``."""
    found = {int(m[1]) for p in root.iterdir() if (m := re.fullmatch(r"mup_transfer_(\d+)", p.name))}
    return sorted(seed for seed in found if (root / f"sp_transfer_{seed}").is_dir())


def transfer_table(root: Path) -> list[str]:
    """Table 1: muP against SP, each tuned on equal grids, per width and seed."""
    lines = [
        "| width | seed | muP: best loss (Muon LR, AdamW LR) | SP: best loss (Muon LR, AdamW LR) | muP − SP | "
        "muP / SP at the base width's optimum, not re-tuned |",
        "|---:|---:|---|---|---:|---|",
    ]
    for seed in seeds_of(root):
        sweeps = {par: load_sweep(root / f"{par}_transfer_{seed}") for par in ("mup", "sp")}
        extra = {par: load_sweep(root / f"{par}_base_{seed}")[1] if (root / f"{par}_base_{seed}").is_dir() else []
                 for par in ("mup", "sp")}  # fmt: skip
        per_width = {par: widths(sweeps[par][0]) for par in sweeps}
        base = {par: per_width[par][0]["best"] for par in sweeps}
        if [w["width"] for w in per_width["mup"]] != [w["width"] for w in per_width["sp"]]:
            raise SystemExit(f"{root}: mup_transfer_{seed} and sp_transfer_{seed} have different widths")
        for index, mup in enumerate(per_width["mup"]):
            sp = per_width["sp"][index]
            width = int(mup["width"])  # type: ignore[call-overload]
            m_loss, s_loss = float(mup["validation_loss"]), float(sp["validation_loss"])  # type: ignore[arg-type]
            if index == 0:
                untuned = "(the base)"
            else:
                at_base = [loss_at([*sweeps[p][1], *extra[p]], width, base[p]) for p in ("mup", "sp")]  # type: ignore[arg-type]
                untuned = " / ".join("not run" if v is None else f"{v:.4f}" for v in at_base)
            edges = {p: " (edge)" if w[index]["best_on_grid_edge"] else "" for p, w in per_width.items()}
            lines.append(
                f"| {width} | {seed} | {m_loss:.4f} ({_pair(mup['best'])}){edges['mup']} | "  # type: ignore[arg-type]
                f"{s_loss:.4f} ({_pair(sp['best'])}){edges['sp']} | {m_loss - s_loss:+.4f} | {untuned} |"  # type: ignore[arg-type]
            )
    return lines


def telescoping_table(root: Path, seed: int) -> list[str]:
    """Table 2: the telescoping sweep against the full ×2 grid of ``seed``, per width, and what each cost."""
    telescoping, _ = load_sweep(root / "telescoping")
    full, _ = load_sweep(root / f"mup_transfer_{seed}")
    lines = [
        "| width | telescoping: spacing, points (re-centrings) | its best Muon LR, AdamW LR | loss | full ×2 grid: "
        "points (re-centrings) | its best | loss |",
        "|---:|---|---|---:|---:|---|---:|",
    ]
    if [w["width"] for w in widths(telescoping)] != [w["width"] for w in widths(full)]:
        raise SystemExit(f"{root}: telescoping and mup_transfer_{seed} have different widths")
    for tele, grid in zip(widths(telescoping), widths(full), strict=True):
        factor = tele["spacing_factor"][MUON]  # type: ignore[index]
        spacing = "×2" if math.isclose(factor, 2.0) else f"×2^{math.log2(factor):.3g}"
        lines.append(
            f"| {tele['width']} | {spacing}, {len(tele['trials'])} ({tele['recentres']}) | "  # type: ignore[arg-type]
            f"{tele['best'][MUON]:.3g}, {tele['best'][ADAMW]:.3g} | {float(tele['validation_loss']):.4f} | "  # type: ignore[index, arg-type]
            f"{len(grid['trials'])} ({grid['recentres']}) | {_pair(grid['best'])} | "  # type: ignore[arg-type]
            f"{float(grid['validation_loss']):.4f} |"  # type: ignore[arg-type]
        )
    tc, fc = telescoping["compute"], full["compute"]
    lines += [
        "",
        f"Compute, in runs at width {widths(telescoping)[-1]['width']} (FLOPs; `best.json`, `compute`): telescoping "
        f"**{tc['sweep_in_final_runs']:.1f}** ({tc['trials']} trials), against "  # type: ignore[index]
        f"**{tc['full_grid_at_target_in_final_runs']:.0f}** for its base grid at the target width and "  # type: ignore[index]
        f"**{tc['full_grid_at_target_same_resolution_in_final_runs']:.0f}** for the same range at its final spacing; "  # type: ignore[index]
        f"the full ×2 grids of table 1 (seed {seed}) cost {fc['sweep_in_final_runs']:.1f} ({fc['trials']} trials).",  # type: ignore[index]
    ]
    return lines


def markdown(root: Path, argv: Sequence[str] | None) -> str:
    """The section: how to rerun it, then tables 1 and 2."""
    seeds = seeds_of(root)
    lines = [
        START,
        f"Written by `tools/mup_tables.py` from the sweeps' `best.json` and `trials.csv` in `{root.as_posix()}`; "
        "rerun it to refresh:",
        "",
        "```bash",
        rerun_command("mup_tables.py", None if argv is None else list(argv)),
        "```",
        "",
        "### 1. muP against the standard parametrization, both tuned on equal grids",
        "",
        "Best validation loss of each 3 × 3 grid (with its re-centrings), and where it was ((edge): still on the "
        "grid's edge after its re-centrings):",
        "",
        *transfer_table(root),
    ]
    if (root / "telescoping").is_dir() and seeds:
        lines += ["", f"### 2. The telescoping sweep against full grids (muP, seed {seeds[0]})", "",
                  *telescoping_table(root, seeds[0])]  # fmt: skip
    return "\n".join([*lines, END]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print or write the section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sweeps", default="docs/mup_sweeps_16", help="folder of mup_sweep outputs")
    parser.add_argument(
        "--markdown", default=None, help="write the section into this file (default: print it)"
    )
    args = parser.parse_args(argv)
    root = Path(args.sweeps)
    if not root.is_dir() or not seeds_of(root):
        parser.error(f"--sweeps {args.sweeps}: no mup_transfer_<seed> with its sp_transfer_<seed> in it")
    publish(markdown(root, argv), args.markdown, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
