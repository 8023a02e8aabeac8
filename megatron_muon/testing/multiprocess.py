"""Run a function on several gloo ranks with megatron's parallel state initialized.

:func:`run_distributed` is the one place in this project where megatron's *global* parallel state is
initialized (code under test receives its process groups explicitly or reads them from there).

Each rank is a fresh ``spawn`` process, so ``fn`` and its arguments travel by pickle: ``fn`` must be a
module-level function (not a lambda, closure or method of a local class), and its return value must be
picklable (tensors are sent by value).
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing

__all__ = [
    "DistributedRunError",
    "DistributedTimeoutError",
    "ParallelSizes",
    "run_distributed",
]

# After one rank fails, how long the others get to report before they are killed: they are usually
# blocked in a collective the failed rank will never join.
_GRACE_AFTER_FAILURE_S = 5.0
# After every rank reported, how long they get to exit on their own (interpreter shutdown, children
# such as dist_checkpointing's Manager shut down) before what is left is killed.
_EXIT_WAIT_S = 30.0


class DistributedRunError(RuntimeError):
    """One or more ranks raised, or exited without reporting. The message holds every failing rank's
    traceback."""


class DistributedTimeoutError(DistributedRunError, TimeoutError):
    """Some ranks did not finish within the timeout; they were killed. The message names them."""


@dataclass(frozen=True, slots=True)
class ParallelSizes:
    """The model-parallel layout handed to ``parallel_state.initialize_model_parallel``."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    ep: int
    """Expert-parallel size."""
    etp: int | None
    """Expert tensor-parallel size; None means megatron's default (equal to ``tp``)."""
    vpp: int | None
    """Virtual pipeline stages per pipeline rank; None for no interleaving."""

    def check(self, world_size: int) -> None:
        """Raise a one-line ``ValueError`` when the sizes are not positive or do not divide ``world_size``."""
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if world_size % (self.tp * self.pp) != 0:
            raise ValueError(f"tp={self.tp} * pp={self.pp} does not divide world_size={world_size}")
        expert_tp = self.tp if self.etp is None else self.etp
        if world_size % (expert_tp * self.ep * self.pp) != 0:
            raise ValueError(
                f"etp={expert_tp} * ep={self.ep} * pp={self.pp} does not divide world_size={world_size}"
            )
        if self.vpp is not None and self.vpp < 1:
            raise ValueError(f"vpp={self.vpp} must be None or >= 1")


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _initialize_rank(rank: int, world_size: int, port: int, sizes: ParallelSizes, timeout_s: float) -> None:
    from megatron.core import parallel_state

    from megatron_muon.platform.device import DEVICE_ENV, Device, use_device

    # What torchrun would set; some megatron code reads LOCAL_RANK. The ranks are CPU ranks on any machine: on one
    # with a GPU too, every device choice in them (and in processes they start) must take the CPU.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        **{DEVICE_ENV: "cpu"},
    )
    # One torch thread, megatron's logic workarounds and the CPU (hardware) stand-ins, forced where CUDA exists.
    use_device(Device(type="cpu"), num_threads=1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    # Created after init_process_group, so megatron's groups inherit the gloo backend.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
    )


def _tear_down_rank() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    sizes: ParallelSizes,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    report: Connection,
) -> None:
    """Body of one rank process. Sends ``("ok", pickled value)`` or ``("error", traceback text)``."""
    # Lead a process group of our own, so that run_distributed can kill this rank together with any
    # children it starts (which would otherwise outlive a killed rank and hold its pipes open).
    os.setpgid(0, 0)
    try:
        try:
            _initialize_rank(rank, world_size, port, sizes, timeout_s)
            value = fn(*args, **kwargs)
        finally:
            _tear_down_rank()
        try:
            # Plain pickle, not torch's ForkingPickler: tensors go by value, not as shared memory
            # handles that die with this process.
            payload = pickle.dumps(value)
        except Exception as error:
            raise TypeError(
                f"the return value of {fn.__qualname__} on rank {rank} is not picklable "
                f"({type(value).__name__}): {error}"
            ) from error
        report.send(("ok", payload))
    except BaseException:
        report.send(("error", traceback.format_exc()))
    finally:
        report.close()


def _stop_ranks(processes: list[Any], *, wait_s: float) -> None:
    """Give the ranks ``wait_s`` seconds to exit, then kill each rank's process group (the rank and any
    children it left behind), then reap them.

    Nothing is reaped before its group is killed, so a rank's pid (its group id) cannot have been reused.
    """
    deadline = time.monotonic() + wait_s
    running = [process.sentinel for process in processes]
    while running and time.monotonic() < deadline:
        for sentinel in wait(running, timeout=max(0.0, deadline - time.monotonic())):
            running.remove(sentinel)
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone, or the rank had not made itself a group leader yet
        process.kill()  # the rank itself, in either case (a no-op on an exited one)
    for process in processes:
        process.join(timeout=10)


def _describe_function(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    timeout_s: float = 180,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks on this machine; return the values by rank.

    Each rank is a ``spawn`` process that joins a gloo process group on a free TCP port of 127.0.0.1,
    makes the CPU its device (``MEGATRON_MUON_DEVICE=cpu``, one torch thread, the CPU stand-ins forced on even
    where CUDA is available), and initializes megatron's parallel state with the given sizes (``etp=None``: expert TP equals ``tp``; ``vpp``: virtual pipeline size).
    Parallel state and the process group are destroyed after ``fn`` returns or raises.

    ``fn`` must be a module-level (picklable) function; its return value must be picklable.

    Raises:
        DistributedRunError: a rank raised or died; the message holds every failing rank's traceback.
        DistributedTimeoutError: ranks still running after ``timeout_s`` seconds (named in the message)
            were killed.
    """
    sizes = ParallelSizes(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp)
    sizes.check(world_size)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    try:
        pickle.dumps(fn)
    except Exception as error:
        raise TypeError(
            f"fn={_describe_function(fn)} cannot be sent to the rank processes; it must be a "
            f"module-level function ({error})"
        ) from error

    context = torch.multiprocessing.get_context("spawn")
    port = _free_tcp_port()
    processes = []
    report_of_rank: dict[int, Connection] = {}
    for rank in range(world_size):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_rank_main,
            name=f"rank{rank}",
            args=(rank, world_size, port, sizes, timeout_s, fn, tuple(args), dict(kwargs or {}), send),
            # Not a daemon: ranks must be able to start children of their own (dist_checkpointing's
            # save starts a multiprocessing Manager). _stop_ranks kills whatever is left.
            daemon=False,
        )
        process.start()
        send.close()  # the child holds its own copy; closing ours lets a dead child read as EOF
        processes.append(process)
        report_of_rank[rank] = receive

    values: dict[int, Any] = {}
    # Traceback text, or None for a rank that died without reporting (described once it is reaped).
    # Insertion order is arrival order.
    failures: dict[int, str | None] = {}
    deadline = time.monotonic() + timeout_s
    try:
        # A rank's pipe or its process sentinel (a file descriptor), whichever becomes ready.
        rank_of_handle: dict[object, int] = {handle: rank for rank, handle in report_of_rank.items()}
        rank_of_handle.update({process.sentinel: rank for rank, process in enumerate(processes)})
        waiting = set(range(world_size))
        while waiting and time.monotonic() < deadline:
            handles: list[Connection | int] = [report_of_rank[rank] for rank in waiting]
            handles += [processes[rank].sentinel for rank in waiting]
            for handle in wait(handles, timeout=max(0.0, deadline - time.monotonic())):
                rank = rank_of_handle[handle]
                if rank not in waiting:
                    continue  # both its pipe and its sentinel were ready
                report = report_of_rank[rank]
                waiting.discard(rank)
                if handle is not report and not report.poll():
                    failures[rank] = None  # exited, and nothing is in its pipe
                    continue
                try:
                    status, payload = report.recv()
                except EOFError:
                    failures[rank] = None
                    continue
                if status == "ok":
                    values[rank] = pickle.loads(payload)
                else:
                    failures[rank] = payload
            if failures:
                # The other ranks are probably blocked in a collective; give them a moment to fail too.
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        finished_cleanly = len(values) == world_size
        _stop_ranks(processes, wait_s=_EXIT_WAIT_S if finished_cleanly else 0.0)
        for handle in report_of_rank.values():
            handle.close()

    for rank, failure in failures.items():
        if failure is None:
            failures[rank] = (
                f"rank {rank} exited with code {processes[rank].exitcode} without reporting "
                "a result (negative: killed by that signal)\n"
            )
    unfinished = [rank for rank in range(world_size) if rank not in values and rank not in failures]
    described = f"run_distributed({_describe_function(fn)}, world_size={world_size}, {sizes})"
    if failures:
        # The first failure to arrive is usually the cause; the others often fail because a peer
        # vanished from a collective.
        first = next(iter(failures))
        parts = [
            f"{described}: {len(failures)} rank(s) failed: {sorted(failures)}; first reported: rank {first}"
        ]
        if unfinished:
            parts.append(f"ranks {unfinished} were still running after the failure and were killed")
        for rank in sorted(failures):
            parts.append(f"----- rank {rank} -----\n{failures[rank]}")
        raise DistributedRunError("\n".join(parts))
    if unfinished:
        raise DistributedTimeoutError(
            f"{described}: ranks {unfinished} did not finish within timeout_s={timeout_s} and were killed "
            f"(finished: {sorted(values)})"
        )
    return [values[rank] for rank in range(world_size)]
