"""Crashes at chosen moments of a 4-process run (SIGKILL inside a step, inside a save, between the renames of a
publication …), a damaged latest checkpoint and a disk that fills up during a save —
through the launcher, at TP2 · EP2 · expert-TP 2 on Shakespeare.

The kills are placed with ``MEGATRON_MUON_FAULT=<point>@<iteration>`` (``training/checkpoint_files.fault_point``);
the iterations and the killed rank are drawn from a seeded generator (the seed is in every failure message). After
every crash the run is started again with the same command, as a requeued job would be. Each start costs ~25 s of
process start-up on 2 cores, so every run serves one situation the restart must handle, none twice: the file-level
steps of a publication are covered in-process by tests/unit/test_checkpoint_files.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from megatron_muon.training import checkpoint_files as files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"
ITERATION_LINE = re.compile(r"^ iteration\s+(\d+)/(\d+) \|.*\| lm loss ([0-9.]+) \|", re.MULTILINE)
TRAIN_ITERS, SAVE_INTERVAL = 8, 2
SEED = 20261204


def _arguments(save_dir: Path, *extra: str) -> list[str]:
    # A smaller tiny_cpu (hidden 64, 2 layers) on Shakespeare at TP2 · EP2 · expert-TP 2 (world 4): real tokens
    # route unevenly, so the expert-TP gathers have uneven sizes. 8 iterations, saves every 2.
    return [
        "launch/configs/tiny_cpu.yaml",
        "parallel.pp=1",
        "parallel.etp=2",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        "model.moe_ffn_hidden_size=64",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        f"training.train_iters={TRAIN_ITERS}",
        "training.eval_interval=0",
        "optimizer.warmup_iters=1",
        f"checkpoint.save_dir={save_dir}",
        f"checkpoint.save_interval={SAVE_INTERVAL}",
        "checkpoint.keep_last=2",
        "logging.tensorboard_dir=null",
        "logging.log_interval=1",
        *extra,
    ]


def _processes_of_run(marker: str) -> list[int]:
    """Processes whose environment carries this run's marker (the launcher, torchrun, the ranks and their
    children: a rank killed inside a save leaves dist_checkpointing's worker process behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _launch(env, arguments, fault: str | None = None, rank: int = 0, timeout: float = 600):
    """Run the launcher to its end; output through files, not pipes, so that a process the crash orphaned cannot
    hold the run open. Whatever of the run is left afterwards is killed, as SLURM ends a job's processes."""
    marker = f"MEGATRON_MUON_TEST_RUN={uuid.uuid4().hex}"
    run_env = dict(env, MEGATRON_MUON_TEST_RUN=marker.split("=", 1)[1])
    run_env.pop("MEGATRON_MUON_FAULT", None)
    if fault is not None:
        run_env.update(MEGATRON_MUON_FAULT=fault, MEGATRON_MUON_FAULT_RANK=str(rank))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            ["bash", str(LAUNCHER), *arguments], cwd=REPO, env=run_env, stdout=stdout, stderr=stderr
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        for pid in _processes_of_run(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if returncode is None:
        raise AssertionError(
            f"the run did not end within {timeout} s (fault {fault}):\n{out[-3000:]}\n{err[-3000:]}"
        )
    return subprocess.CompletedProcess(process.args, returncode, out, err)


def _losses(log: str) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in ITERATION_LINE.finditer(log)}


def _published_state(root: Path) -> int | None:
    """The marked iteration, after checking that it names a complete checkpoint whose files match its manifest."""
    marked = files.read_marker(root)
    if marked is None:
        return None
    directory = files.iteration_dir(root, marked)
    manifest = files.read_manifest(directory)
    assert manifest is not None, (
        f"the marker names {directory}, which has no manifest: {sorted(root.iterdir())}"
    )
    assert files.verify_files(directory, manifest, sorted(manifest)) is None
    return marked


def _kill_schedule(rng: random.Random, *, full: bool) -> list[tuple[str, int, int, bool]]:
    """(point, iteration, rank, damaged) of each crash, in order; ``damaged``: a byte of the marked checkpoint is
    flipped before that run starts. Saves happen at 2, 4, 6, 8; the comments give what is published after each
    crash (the run resumes from it). ``full``: every moment (the full suite). CI's two runs take the paths a
    restart must find on its own: a published checkpoint whose pruning was cut off is resumed; then, started on a
    damaged latest checkpoint, the run falls back to the previous one, and one rank dies inside the next save, whose
    staging directory the final start deletes. The renames' moments (a complete unmarked checkpoint, an old one
    moved aside) are recovered in-process by tests/unit/test_checkpoint_files.py, in CI."""
    if not full:
        return [("after_marker", 4, 0, False), ("during_save", 6, rng.randrange(4), True)]
    return [
        # complete staging, never published: deleted at the next start, which begins from scratch
        ("before_publish", 2, 0, False),
        # iter 2 renamed into place, no marker: complete, so the next start resumes from it
        ("after_rename", 2, 0, False),
        # 4 published, pruning not done
        ("after_marker", 4, 0, False),
        # started with 4 damaged: the run names the file, falls back to 2, trains 3 and 4 again and re-saves 4
        ("step", rng.randint(5, 6), rng.randrange(4), True),
        # one rank dies inside the save (its shards written, before the ranks agree the save succeeded): the
        # staging directory is deleted at the next start, which resumes from 4
        ("during_save", 6, rng.randrange(4), False),
        # iter 6 complete but unmarked: the next start resumes from the marker's 4 ...
        ("after_rename", 6, 0, False),
        # ... and re-saves 6: killed with the old 6 moved aside, which the next start restores (and resumes from
        # 4 again, re-saving 6 once more)
        ("between_renames", 6, 0, False),
        # the final save published; the restart finds the run complete
        ("after_marker", 8, 0, False),
    ]


def _damage_marked_checkpoint(root: Path) -> tuple[Path, Path]:
    """Flip the last byte of one shard of the marked checkpoint (size unchanged); (its directory, the shard)."""
    directory = files.iteration_dir(root, files.read_marker(root))
    shard = sorted(directory.glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    return directory, shard


@dataclasses.dataclass
class Baseline:
    losses: dict[int, float]
    """Iterations 1-8 of a run without crashes: what every restart must reproduce."""
    result: subprocess.CompletedProcess
    save_dir: Path
    no_tmpfs: str | None
    """Why its checkpoints could not go to a small tmpfs (then they went to the normal disk)."""


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shakespeare_data, launcher_env):
    """A run without crashes whose checkpoints (keep_last=null) go to a 26 MiB tmpfs: three checkpoints of the
    small model (7.6 MiB each) fit, the fourth, at the last iteration, does not. One start serves the losses every
    restart must reproduce and the full-disk case. Without root (no tmpfs) it saves on the normal disk."""
    mount_point = tmp_path_factory.mktemp("baseline") / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=26m", "tmpfs", str(mount_point)], capture_output=True
    )
    no_tmpfs = None if mounted.returncode == 0 else mounted.stderr.decode().strip()
    try:
        save_dir = mount_point / "checkpoints"
        result = _launch(launcher_env, _arguments(save_dir, "checkpoint.keep_last=null"))
        losses = _losses(result.stdout)
        assert sorted(losses) == list(range(1, TRAIN_ITERS + 1)), (
            result.stdout[-2000:],
            result.stderr[-3000:],
        )
        assert no_tmpfs is None or result.returncode == 0, result.stderr[-3000:]
        yield Baseline(losses, result, save_dir, no_tmpfs)
    finally:
        if no_tmpfs is None:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize(
    "full", [False, pytest.param(True, marks=pytest.mark.extended)], ids=["two_restarts", "every_moment"]
)
def test_sigkill_at_chosen_moments_loses_nothing_and_resumes_exactly(tmp_path, baseline, launcher_env, full):
    uninterrupted = baseline.losses
    rng = random.Random(SEED)
    schedule = _kill_schedule(rng, full=full)
    assert len(schedule) == (8 if full else 2)
    save_dir = tmp_path / "checkpoints"
    published = None
    for point, iteration, rank, damaged in schedule:
        where = f"seed {SEED}: kill at {point}@{iteration} on rank {rank}"
        if damaged:
            # A byte flipped in the latest checkpoint: the restart names the file, falls back to the previous
            # checkpoint and trains the lost iterations again, identically.
            bad, shard = _damage_marked_checkpoint(save_dir)
            previous = files.iteration_dir(save_dir, files.read_marker(save_dir) - SAVE_INTERVAL)
        result = _launch(launcher_env, _arguments(save_dir), fault=f"{point}@{iteration}", rank=rank)
        assert result.returncode != 0, f"{where}: the run was not killed\n{result.stdout[-2000:]}"
        losses = _losses(result.stdout)
        for step, loss in losses.items():
            assert loss == uninterrupted[step], (
                f"{where}: iteration {step} loss {loss} != {uninterrupted[step]}"
            )
        if damaged:
            out = result.stdout
            assert f"passing over a damaged checkpoint: checkpoint {bad}" in out, f"{where}\n{out[-2000:]}"
            assert "corrupted" in out and shard.name in out, f"{where}\n{out[-2000:]}"
            assert f"resuming from this run's own checkpoint {previous}" in out, f"{where}\n{out[-2000:]}"
            relearned = files.iteration_of(previous) + 1
            assert min(losses) == relearned and relearned + 1 in losses, f"{where}: {sorted(losses)}"
        now = _published_state(save_dir)
        assert published is None or (now is not None and now >= published), (
            f"{where}: marker {published} -> {now}"
        )
        published = now
    final = _launch(launcher_env, _arguments(save_dir))
    assert final.returncode == 0, final.stderr[-3000:]
    for step, loss in _losses(final.stdout).items():
        assert loss == uninterrupted[step], (
            f"after the last restart: iteration {step} {loss} != {uninterrupted[step]}"
        )
    assert _published_state(save_dir) == TRAIN_ITERS
    assert not list(save_dir.glob("*.partial")) and not list(save_dir.glob("*.replaced"))


def test_a_full_disk_stops_with_a_message_and_keeps_the_previous_checkpoint(baseline):
    if baseline.no_tmpfs is not None:
        pytest.skip(f"cannot mount a tmpfs here ({baseline.no_tmpfs}): needs root")
    result, save_dir = baseline.result, baseline.save_dir
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert "out of space" in errors[0] and "published before are intact" in errors[0], errors
    assert not list(save_dir.glob("*.partial")), "the failed save's staging directory should be freed"
    assert _published_state(save_dir) == TRAIN_ITERS - SAVE_INTERVAL  # verified against its manifest
