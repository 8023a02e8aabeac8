"""tools/ns_algorithm_quality.py without training: which finished runs a section is written from (the code version
of this tree, or an earlier one accepted with ``--same-numerics-as``), the table's arithmetic and bad input."""

from __future__ import annotations

import csv

import pytest

from megatron_muon.bench import ns_algorithm_quality as quality

CONFIG = "launch/configs/tiny_cpu.yaml"
OLD = "0123456789abcdef"


def _write_results(path, version: str, finals: dict[tuple[str, int], float]) -> None:
    sha = quality.file_sha(quality.REPO / CONFIG)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=quality.FIELDS)
        writer.writeheader()
        for (algorithm, seed), final in finals.items():
            for iteration, loss in ((250, final + 0.5), (500, final)):
                writer.writerow(dict(
                    config=CONFIG, config_sha=sha, overrides="", code_version=version, algorithm=algorithm,
                    seed=seed, iteration=iteration, val_loss=f"{loss:.5f}",
                    gram_matrices=83 if algorithm == "auto" else 0, matrices=91, wall_s=1000,
                ))  # fmt: skip


FINALS = {("auto", 1): 4.40, ("standard", 1): 4.38, ("auto", 2): 4.39, ("standard", 2): 4.395}


def _section(tmp_path, capsys, *extra: str) -> str:
    results = tmp_path / "evaluations.csv"
    assert (
        quality.main(
            ["--configs", CONFIG, "--seeds", "1", "2", "--results", str(results), "--publish-only", *extra]
        )
        == 0
    )
    return capsys.readouterr().out


def test_rows_of_another_code_version_are_missing_unless_accepted(tmp_path, capsys):
    _write_results(tmp_path / "evaluations.csv", OLD, FINALS)
    refused = _section(tmp_path, capsys)
    assert "Not run yet" in refused and "`tiny_cpu.yaml` auto seed 1" in refused
    assert "| `tiny_cpu.yaml`" not in refused

    accepted = _section(tmp_path, capsys, "--same-numerics-as", OLD)
    assert "Not run yet" not in accepted
    assert f"`{OLD}` (an earlier version, counted with `--same-numerics-as`)" in accepted
    auto = next(
        line
        for line in accepted.splitlines()
        if line.startswith("| `tiny_cpu.yaml` (iteration 500) | `auto`")
    )
    # seed 1: 4.40 - 4.38 = +0.02 (outside 0.01), seed 2: 4.39 - 4.395 = -0.005; mean +0.0075 (inside)
    assert "+0.0200 / -0.0050 (+0.0075)" in auto and "**no** / yes" in auto and "83 of 91" in auto


def test_this_trees_rows_come_first(tmp_path, capsys):
    results = tmp_path / "evaluations.csv"
    _write_results(results, quality.code_version(), FINALS)
    section = _section(tmp_path, capsys, "--same-numerics-as", OLD)
    assert f"`{quality.code_version()}` (this tree)" in section and f"`{OLD}` (an earlier" not in section


@pytest.mark.parametrize("value", ["2aebb317", "2AEBB31778DE87AC", "not-a-version"])
def test_a_malformed_code_version_is_one_line_and_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        quality.main(["--results", str(tmp_path / "r.csv"), "--publish-only", "--same-numerics-as", value])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(
        f"--same-numerics-as {value!r}: a code version is 16 lowercase hex digits, as in the results"
    )
