"""A run's processes live no longer than its launcher, and one run at a time writes a ``save_dir``.

Standard library only: ``launch/pretrain_muon.sh`` runs this module before anything heavy is imported.

**Parent-death chain** (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; each process dies with its parent, however
the parent dies — SIGKILL of the launcher or of its process group, the OOM killer):

    launcher (bash) ─► ``python -m megatron_muon.training.lifetime guard`` ─exec─► torchrun ─► ranks

The guard starts a session of its own (so that a signal to the launcher's group reaches the launcher alone, which
forwards SIGTERM / SIGUSR1 to the ranks so that they save), asks the kernel for SIGKILL when its parent dies,
exports its PID as ``MEGATRON_MUON_PARENT_PID`` and ``exec``s torchrun (same PID: the death signal and the
session carry over). Each rank calls :func:`die_with_parent` first thing: SIGKILL when torchrun dies. A parent
that died before the request took effect is caught by comparing ``getppid()`` with the PID expected. Under SLURM
the launcher does not use the guard: ``slurmstepd`` ends a job's processes.

**One run per save_dir**: the launcher opens ``<save_dir>/.megatron_muon.lock`` on a file descriptor it keeps for
the life of the job (torchrun inherits it), and ``lock`` takes an exclusive ``flock`` on that descriptor and
records who holds it (host, launcher PID, start time). The kernel drops the lock when the last process holding
the descriptor exits, however it exits; a record left behind by a run that died is stale and is taken over with a
line saying so. A second run finds the lock held and stops with one line naming the holder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path

__all__ = [
    "LOCK_FILENAME",
    "PARENT_PID_ENV",
    "SaveDirInUse",
    "die_with_parent",
    "lock_save_dir",
    "set_parent_death_signal",
]

LOCK_FILENAME = ".megatron_muon.lock"
PARENT_PID_ENV = "MEGATRON_MUON_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class SaveDirInUse(RuntimeError):
    """Another live run holds the ``save_dir`` lock; the message is one line naming it."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) exits. False where unsupported
    (not Linux). Survives ``exec``; cleared in forked children."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def die_with_parent() -> None:
    """In a training rank started under the guard (``MEGATRON_MUON_PARENT_PID`` set): SIGKILL when torchrun
    exits. Exits at once if torchrun is already gone. A no-op elsewhere (SLURM, tests, tools)."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected or not set_parent_death_signal():
        return
    if os.getppid() != int(expected):  # torchrun died before the request took effect
        os._exit(1)


def _guard(parent: int, command: list[str]) -> None:
    """Become a session leader that dies with ``parent``, then ``exec`` ``command`` (which keeps both)."""
    try:
        os.setsid()
    except PermissionError:  # already a process-group leader (started with job control): it stays one
        pass
    set_parent_death_signal()
    if os.getppid() != parent:
        print(f"error: the launcher (PID {parent}) is gone; not starting {command[0]}", file=sys.stderr)
        sys.exit(1)
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    os.execvp(command[0], command)


# ---------------------------------------------------------------------------------------------------
# One run per save_dir.
# ---------------------------------------------------------------------------------------------------


def _holder_line(launcher_pid: int) -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"host={socket.gethostname()} pid={launcher_pid} since={started}\n"


def _describe(record: str) -> str:
    """``pid 123 on host n1 since 2026-12-07T01:02:03+00:00`` from a lock record ('' when empty)."""
    fields = dict(part.split("=", 1) for part in record.split() if "=" in part)
    if "pid" not in fields:
        return ""
    return f"pid {fields['pid']} on host {fields.get('host', '?')} since {fields.get('since', '?')}"


def lock_save_dir(descriptor: int, save_dir: str, launcher_pid: int) -> str | None:
    """Take the exclusive lock of ``save_dir`` on ``descriptor`` (open on its lock file, read-write) and record
    the holder. Returns one line to log when a stale record was taken over, else None.

    Raises:
        SaveDirInUse: another process holds the lock (one line naming its holder).
    """
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.lseek(descriptor, 0, os.SEEK_SET)
        holder = (
            _describe(os.read(descriptor, 4096).decode(errors="replace")) or "a process that left no record"
        )
        raise SaveDirInUse(
            f"checkpoint.save_dir={save_dir} is in use by another run ({holder}; lock file "
            f"{Path(save_dir) / LOCK_FILENAME}): stop that run or choose another checkpoint.save_dir"
        ) from None
    os.lseek(descriptor, 0, os.SEEK_SET)
    previous = _describe(os.read(descriptor, 4096).decode(errors="replace"))
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, _holder_line(launcher_pid).encode())
    os.fsync(descriptor)
    if previous:
        return f"took over the save_dir lock of {previous}, which is no longer running"
    return None


def release_record(save_dir: str, launcher_pid: int) -> None:
    """Clear the holder record at a clean end, if it is still this launcher's (the lock itself goes with the
    descriptor)."""
    path = Path(save_dir) / LOCK_FILENAME
    try:
        with open(path, "r+") as handle:
            if f" pid={launcher_pid} " in f" {handle.read()}":
                handle.seek(0)
                handle.truncate()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``guard PARENT_PID -- COMMAND ...`` | ``lock FD SAVE_DIR LAUNCHER_PID`` | ``release SAVE_DIR LAUNCHER_PID``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 4 and args[0] == "guard" and args[2] == "--":
        _guard(int(args[1]), args[3:])
    if len(args) == 4 and args[0] == "lock":
        try:
            note = lock_save_dir(int(args[1]), args[2], int(args[3]))
        except SaveDirInUse as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if note:
            print(note)
        return 0
    if len(args) == 3 and args[0] == "release":
        release_record(args[1], int(args[2]))
        return 0
    print(f"usage: python -m megatron_muon.training.lifetime {main.__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
