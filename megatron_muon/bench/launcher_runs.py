"""Shared by the studies that train through ``launch/pretrain_muon.sh`` and keep their raw rows in a CSV
(``ns_algorithm_quality.py``, ``attention_optimizer_grid.py``): the launcher run itself, what it prints that they
parse, and the parts of a run's key that say which code and config it ran (so a rerun skips only runs that would
train the same)."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"
VALIDATION = re.compile(r"validation at iteration\s+(\d+) \| lm loss ([\d.]+|nan|inf)")
ITERATION_LINE = re.compile(r"^\s*iteration\s+(\d+)/\d+ (\|.*)$", re.MULTILINE)
NOT_RUN = ("megatron_muon/bench/", "megatron_muon/testing/")  # no training run imports these


def lr_text(value: float) -> str:
    """The canonical spelling of a learning rate (6 significant digits): recorded runs are matched on it."""
    return f"{float(value):.6g}"


def file_sha(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_version() -> str:
    """SHA-256 (16 hex digits) over the tracked files a training run executes, as they are in the work tree: the
    launcher and the package without ``bench/`` and ``testing/``."""
    listed = subprocess.run(
        ["git", "ls-files", "megatron_muon", "launch"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    listed = [name for name in listed if not name.startswith(NOT_RUN)]
    digest = hashlib.sha256()
    for name in sorted(listed):
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def launcher_environment() -> dict[str, str]:
    """This process's environment with this tree first on ``PYTHONPATH``: the code hashed into a run's key is this
    tree's, so the ranks must import it, not another checkout's install."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


@dataclass(frozen=True, slots=True)
class LaunchedRun:
    """What one training run through the launcher printed and how long it took."""

    validation: list[tuple[int, float]]
    """(iteration, validation loss) of every evaluation, in order."""
    stdout: str
    """Everything rank 0 printed (the per-iteration log lines included)."""
    wall_s: float
    """Wall seconds of the whole launch, start-up and evaluations included."""


def run_training(config: str, overrides: Sequence[str], evaluates: bool = True) -> LaunchedRun:
    """One run of ``launch/pretrain_muon.sh CONFIG OVERRIDES`` with its checkpoints and TensorBoard files in a
    temporary directory. Raises ``RuntimeError`` when it fails or (``evaluates``) prints no validation loss."""
    with tempfile.TemporaryDirectory() as workdir:
        command = ["bash", str(LAUNCHER), config, *overrides,
                   f"checkpoint.save_dir={workdir}/checkpoints", f"logging.tensorboard_dir={workdir}/tensorboard"]  # fmt: skip
        start = time.monotonic()
        result = subprocess.run(
            command, cwd=REPO, env=launcher_environment(), capture_output=True, text=True, timeout=4 * 3600
        )
        wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"run failed (exit {result.returncode}): {config} {' '.join(overrides)}\n"
                           f"{result.stdout[-1500:]}\n{result.stderr[-1500:]}")  # fmt: skip
    points = [(int(m[1]), float(m[2])) for m in VALIDATION.finditer(result.stdout)]
    if evaluates and not points:
        raise RuntimeError(f"no validation loss in the output of: {config} {' '.join(overrides)}")
    return LaunchedRun(validation=points, stdout=result.stdout, wall_s=wall)


def iteration_values(stdout: str, field: str, first_iteration: int = 1) -> list[tuple[int, float]]:
    """(iteration, value) of one field of the trainer's per-iteration log line (``ms/iter``, ``tokens/s``,
    ``lm loss``, ...: the name before the value between ``|`` separators) for every logged iteration
    ≥ ``first_iteration``, in order; iterations whose line lacks the field are left out."""
    value = re.compile(rf"\|\s*{re.escape(field)}\s+([\d.,]+|nan|inf)\s*(?:\||$)")
    found = []
    for line in ITERATION_LINE.finditer(stdout):
        iteration, match = int(line[1]), value.search(line[2])
        if match and iteration >= first_iteration:
            found.append((iteration, float(match[1].replace(",", ""))))
    return found


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results file (none when it does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def append_rows(path: Path, rows: Sequence[dict[str, object]], fields: Sequence[str]) -> None:
    """Append rows to a results file with columns ``fields``, writing its header first when it is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)
