"""tools/mup_tables.py: issue #16's two muP tables written from mup_sweep's outputs (best.json, trials.csv)."""

from __future__ import annotations

import csv
import json

import pytest

from megatron_muon.bench import mup_tables as tool

MUON, ADAMW = "optimizer.muon.lr", "optimizer.lr"


def write_sweep(folder, per_width, trials, factor=2.0, compute=None):
    """A sweep folder as mup_sweep writes it: per_width = [(width, muon, adamw, loss, points, recentres, edge)]."""
    folder.mkdir(parents=True)
    summary = {
        "widths": [
            {"width": w, "best": {MUON: m, ADAMW: a}, "validation_loss": loss, "trials": [f"k{i}" for i in range(n)],
             "recentres": r, "best_on_grid_edge": [MUON] if edge else [],
             "spacing_factor": {MUON: factor ** (0.5**i), ADAMW: factor ** (0.5**i)}}
            for i, (w, m, a, loss, n, r, edge) in enumerate(per_width)
        ],
        "compute": compute or {"sweep_in_final_runs": 18.9, "trials": 32, "full_grid_at_target_in_final_runs": 25.0,
                               "full_grid_at_target_same_resolution_in_final_runs": 289.0},
    }  # fmt: skip
    (folder / "best.json").write_text(json.dumps(summary))
    with (folder / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "width", MUON, ADAMW, "validation_loss"])
        writer.writeheader()
        for width, muon, adamw, loss in trials:
            writer.writerow({"key": "x", "width": width, MUON: muon, ADAMW: adamw, "validation_loss": loss})


@pytest.fixture
def sweeps(tmp_path):
    root = tmp_path / "sweeps"
    write_sweep(root / "mup_transfer_1", [(64, 0.02, 0.048, 5.05, 9, 0, False), (256, 0.01, 0.096, 4.97, 14, 1, True)],
                [(256, 0.02, 0.048, 5.01)])  # fmt: skip
    write_sweep(root / "sp_transfer_1", [(64, 0.01, 0.048, 5.07, 9, 0, False), (256, 0.0025, 0.048, 4.985, 9, 0, False)],
                [])  # fmt: skip
    write_sweep(root / "sp_base_1", [(256, 0.01, 0.048, 5.08, 1, 0, False)], [(256, 0.01, 0.048, 5.0786)])
    write_sweep(
        root / "mup_transfer_2",
        [(64, 0.02, 0.096, 5.1, 9, 0, False), (256, 0.02, 0.048, 5.03, 9, 0, False)],
        [],
    )
    write_sweep(
        root / "sp_transfer_2",
        [(64, 0.005, 0.096, 5.12, 9, 0, False), (256, 0.005, 0.048, 5.03, 9, 0, False)],
        [],
    )
    write_sweep(root / "telescoping", [(64, 0.02, 0.048, 5.05, 25, 0, False), (256, 0.0119, 0.0571, 4.978, 14, 1, False)],
                [], factor=2.0, compute={"sweep_in_final_runs": 22.6, "trials": 51, "full_grid_at_target_in_final_runs": 25.0,
                                         "full_grid_at_target_same_resolution_in_final_runs": 289.0})  # fmt: skip
    return root


def test_both_tables_come_from_the_sweeps(sweeps, tmp_path):
    page = tmp_path / "benchmarks.md"
    assert tool.main(["--sweeps", str(sweeps), "--markdown", str(page)]) == 0
    text = page.read_text()
    assert "| 64 | 1 | 5.0500 (0.02, 0.048) | 5.0700 (0.01, 0.048) | -0.0200 | (the base) |" in text
    # The base optimum at 256: muP's from its own grid, SP's from the sp_base sweep; the edge is flagged.
    assert (
        "| 256 | 1 | 4.9700 (0.01, 0.096) (edge) | 4.9850 (0.0025, 0.048) | -0.0150 | 5.0100 / 5.0786 |"
        in text
    )
    assert "| 256 | 2 | 5.0300 (0.02, 0.048) | 5.0300 (0.005, 0.048) | +0.0000 | not run / not run |" in text
    assert "### 2. The telescoping sweep against full grids (muP, seed 1)" in text
    assert "| 256 | ×2^0.5, 14 (1) | 0.0119, 0.0571 | 4.9780 | 14 (1) | 0.01, 0.096 | 4.9700 |" in text
    assert "telescoping **22.6** (51 trials)" in text and "cost 18.9 (32 trials)" in text


def test_a_folder_without_transfer_sweeps_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--sweeps", str(tmp_path)])
    assert stopped.value.code == 2 and "no mup_transfer_<seed>" in capsys.readouterr().err
