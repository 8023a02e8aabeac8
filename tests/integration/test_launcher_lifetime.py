"""launch/pretrain_muon.sh as a new user would break it: a second launch on a live run's save_dir, then a SIGKILL of
the launcher's whole process group (``kill -9 -PGID``, the OOM killer, a scheduler) after a checkpoint.

One tiny 4-process run (~40 s on 2 cores to its first checkpoint). Every process of the run carries a tag in its
environment, so "no process of the run remains" covers torchrun, the ranks and anything they started (the
checkpoint writers megatron-core would spawn, their resource trackers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_muon.training.lifetime import LOCK_FILENAME

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"


def _processes_tagged(tag: str) -> dict[int, str]:
    """PID -> command line of every live process whose environment holds ``RUN_TAG=<tag>``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if f"RUN_TAG={tag}".encode() not in Path(f"/proc/{entry}/environ").read_bytes():
                continue
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, not yet reaped
            found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def test_sigkill_of_the_launchers_group_ends_the_job_and_a_second_run_is_refused(
    tmp_path, shakespeare_data, launcher_env
):
    tag = uuid.uuid4().hex
    env = {**launcher_env, "RUN_TAG": tag}
    save_dir, log_path = tmp_path / "checkpoints", tmp_path / "first.log"
    arguments = [
        "launch/configs/tiny_cpu.yaml",
        "training.train_iters=500",
        "optimizer.warmup_iters=1",
        "training.eval_interval=0",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=1",
        "logging.log_interval=1",
    ]
    marker = save_dir / "latest_checkpointed_iteration.txt"
    with open(log_path, "w") as log:
        first = subprocess.Popen(
            ["bash", str(LAUNCHER), *arguments, f"logging.tensorboard_dir={tmp_path / 'tb1'}"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the launcher leads its process group, as in a terminal or a batch job
        )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert first.poll() is None, f"the run exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)

        # A second launch on the live run's save_dir stops at once, naming the holder, and starts nothing.
        second = subprocess.run(
            ["bash", str(LAUNCHER), *arguments, f"logging.tensorboard_dir={tmp_path / 'tb2'}"],
            cwd=REPO,
            env={**launcher_env, "RUN_TAG": tag + "-second"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        expected = (
            f"error: checkpoint.save_dir={save_dir} is in use by another run (pid {first.pid} on host "
            f"{socket.gethostname()} since "
        )
        assert second.stderr.startswith(expected) and second.stderr.count("\n") == 1, second.stderr
        assert "starting" not in second.stdout and not (tmp_path / "tb2").exists(), second.stdout
        assert first.poll() is None, "the first run stopped"

        running = _processes_tagged(tag)
        ranks = [
            pid for pid, command in running.items() if "megatron_muon.pretrain" in command and "-u" in command
        ]
        assert len(ranks) == 4, running
        # The ranks are outside the launcher's process group: only the parent-death chain can stop them.
        assert all(os.getpgid(pid) != first.pid for pid in ranks), running

        published = marker.read_text()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed = time.monotonic()
        while (left := _processes_tagged(tag)) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert not left, f"processes of the run outlived the launcher by 10 s: {left}"
        time.sleep(2)
        assert marker.read_text() == published, "a checkpoint was published after the kill"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        for pid in _processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)

    # The killed run's lock record is stale: the next holder takes it over with a line saying so.
    takeover = subprocess.run(
        [
            "bash",
            "-c",
            f'exec {{fd}}<>"$0/{LOCK_FILENAME}"; "{sys.executable}" -m megatron_muon.training.lifetime lock $fd "$0" $$',
            str(save_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert takeover.returncode == 0, takeover.stderr
    assert takeover.stdout.startswith(f"took over the save_dir lock of pid {first.pid} on host "), (
        takeover.stdout
    )
