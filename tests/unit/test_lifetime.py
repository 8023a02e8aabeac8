"""``training/lifetime.py`` in one process and a few small children: the save_dir lock (exclusive, holder named,
stale records taken over, cleared at a clean end) and the parent-death guard (a guarded command dies with the
process that started it, even when that process is SIGKILLed). The launcher test is
``tests/integration/test_launcher_lifetime.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_muon.training import checkpoint_files
from megatron_muon.training.lifetime import (
    LOCK_FILENAME,
    SaveDirInUse,
    lock_save_dir,
    release_record,
)


def _open_lock(save_dir) -> int:
    return os.open(save_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)


def test_one_run_per_save_dir(tmp_path):
    first = _open_lock(tmp_path)
    assert lock_save_dir(first, str(tmp_path), 111) is None  # a fresh save_dir: nothing to take over
    record = (tmp_path / LOCK_FILENAME).read_text()
    assert record.startswith(f"host={socket.gethostname()} pid=111 since="), record

    second = _open_lock(tmp_path)  # another open file description: as another process would hold
    with pytest.raises(SaveDirInUse) as refused:
        lock_save_dir(second, str(tmp_path), 222)
    message = str(refused.value)
    assert "\n" not in message and f"checkpoint.save_dir={tmp_path} is in use by another run" in message, (
        message
    )
    assert f"pid 111 on host {socket.gethostname()} since " in message and LOCK_FILENAME in message, message

    os.close(first)  # the holder dies without clearing its record: the kernel drops the lock
    note = lock_save_dir(second, str(tmp_path), 222)
    assert note is not None and note.startswith("took over the save_dir lock of pid 111 on host "), note
    assert note.endswith("which is no longer running"), note

    release_record(str(tmp_path), 111)  # not the holder's: the record stays
    assert " pid=222 " in (tmp_path / LOCK_FILENAME).read_text()
    release_record(str(tmp_path), 222)  # a clean end clears it: the next run takes over nothing
    os.close(second)
    assert (tmp_path / LOCK_FILENAME).read_text() == ""
    third = _open_lock(tmp_path)
    assert lock_save_dir(third, str(tmp_path), 333) is None
    os.close(third)


def test_the_lock_file_is_not_reported_as_a_foreign_entry(tmp_path):
    assert checkpoint_files.SAVE_DIR_LOCK == LOCK_FILENAME
    (tmp_path / LOCK_FILENAME).write_text("host=h pid=1 since=t\n")
    assert checkpoint_files.recover_root(tmp_path) == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_guarded_command_dies_with_its_parent_even_a_sigkilled_one(tmp_path):
    """parent (bash) -> guard -exec-> sleeper. SIGKILL the parent: the sleeper, in a session of its own, dies."""
    pid_file = tmp_path / "sleeper.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = subprocess.Popen(
        [
            "bash",
            "-c",
            f'"{sys.executable}" -m megatron_muon.training.lifetime guard $$ -- "{sys.executable}" -c "$0"; sleep 60',
            sleeper,
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None, "the guarded command did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert os.getsid(child) == child != os.getsid(parent.pid)  # its own session: a group kill misses it
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the guarded command outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the test failed: leave nothing behind


def test_the_guard_refuses_to_start_when_its_parent_is_already_gone():
    result = subprocess.run(
        [sys.executable, "-m", "megatron_muon.training.lifetime", "guard", "1", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "the launcher (PID 1) is gone" in result.stderr, result
