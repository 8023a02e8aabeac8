"""Run a function on several gloo ranks with megatron's parallel state initialized.

:func:`run_distributed` is the one place in this project where megatron's *global* parallel state is
initialized (code under test receives its process groups explicitly or reads them from there).

Each rank is a ``spawn`` process, so ``fn`` and its arguments travel by pickle: ``fn`` must be a module-level
function (not a lambda, closure or method of a local class), and its return value must be picklable (tensors are
sent by value).

By default every call starts fresh rank processes and stops them after. Inside :func:`keep_rank_processes` (the test
suite's session fixture) the rank processes of a clean call stay alive for the next call of the same world size:
importing torch and megatron-core costs each process ~6 CPU-seconds, about half of a small multi-process test.
Between calls a rank destroys megatron's parallel state and the process group, resets megatron's other
process-wide state a run leaves behind (:func:`_reset_process_state`), reseeds torch's default generator as at
start-up, and takes the caller's environment and working directory afresh. A call that fails or times out stops its processes, so the next one starts clean.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing

__all__ = [
    "DistributedRunError",
    "DistributedTimeoutError",
    "ParallelSizes",
    "keep_rank_processes",
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
    _reset_process_state()


def _reset_process_state() -> None:
    """Megatron-core's process-wide state beyond the parallel state, as a fresh process has it: the MoE metrics
    tracker (sized by the last model's layers and holding its groups), the rerun state machine, the microbatch
    calculator, the model-parallel RNG states; and torch's default dtype."""
    from megatron.core import num_microbatches_calculator, rerun_state_machine
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()
    rerun_state_machine.destroy_rerun_state_machine()
    num_microbatches_calculator.destroy_num_microbatches_calculator()
    get_cuda_rng_tracker().reset()
    torch.set_default_dtype(torch.float32)
    _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """DTensor's sharding-propagation and redistribution caches, as a fresh process has them (empty).

    Their keys do not tell one call's mesh from the next (``DeviceMesh`` equality ignores the process groups): a
    DTensor op in a later call can get back an output spec holding an earlier call's mesh, whose collectives then
    ask for a group name that went with the destroyed process group ("Could not resolve the process group
    registered under the name 5"), or that now names another group. FSDP2 (``fully_shard``) parameters are
    DTensors.
    """
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return  # nothing imported DTensor, so nothing is cached
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._collective_utils import MeshTopoInfo
    from torch.distributed.tensor._redistribute import _gen_transform_infos, clear_redistribute_planner_cache
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # type: ignore[no-untyped-call]  # the Python and the C++ fast path's caches
    DTensor._op_dispatcher.sharding_propagator._propagate_tensor_meta_cached.cache_clear()
    _gen_transform_infos.cache_clear()
    clear_redistribute_planner_cache()
    MeshTopoInfo.build_from_mesh.cache_clear()


@dataclass(frozen=True, slots=True)
class _Call:
    """One ``run_distributed`` call as a rank receives it."""

    port: int
    sizes: ParallelSizes
    timeout_s: float
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    environ: dict[str, str]
    cwd: str


def _rank_main(rank: int, world_size: int, calls: Connection, report: Connection) -> None:
    """Body of one rank process: runs each call it receives until its call pipe closes."""
    # Lead a process group of our own, so that run_distributed can kill this rank together with any
    # children it starts (which would otherwise outlive a killed rank and hold its pipes open).
    os.setpgid(0, 0)
    fresh_seed = torch.initial_seed()  # torch's default generator as a fresh process has it
    try:
        while True:
            try:
                call = calls.recv()
            except EOFError:
                return
            torch.manual_seed(fresh_seed)
            _run_call(rank, world_size, call, report)
    finally:
        report.close()


def _run_call(rank: int, world_size: int, call: _Call, report: Connection) -> None:
    """Sends ``("ok", pickled value)`` or ``("error", traceback text)``."""
    try:
        # What a freshly spawned rank would inherit from the caller at this moment.
        os.environ.clear()
        os.environ.update(call.environ)
        os.chdir(call.cwd)
        try:
            _initialize_rank(rank, world_size, call.port, call.sizes, call.timeout_s)
            value = call.fn(*call.args, **call.kwargs)
        finally:
            _tear_down_rank()
        try:
            # Plain pickle, not torch's ForkingPickler: tensors go by value, not as shared memory
            # handles that die with this process.
            payload = pickle.dumps(value)
        except Exception as error:
            raise TypeError(
                f"the return value of {call.fn.__qualname__} on rank {rank} is not picklable "
                f"({type(value).__name__}): {error}"
            ) from error
        report.send(("ok", payload))
    except BaseException:
        report.send(("error", traceback.format_exc()))


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


@dataclass(slots=True)
class _Ranks:
    """``world_size`` rank processes, each with a pipe for calls and one for reports."""

    processes: list[Any]
    calls: list[Connection]
    reports: list[Connection]
    calls_run: int = 0

    @classmethod
    def start(cls, world_size: int) -> _Ranks:
        context = torch.multiprocessing.get_context("spawn")
        ranks = cls(processes=[], calls=[], reports=[])
        for rank in range(world_size):
            call_receive, call_send = context.Pipe(duplex=False)
            report_receive, report_send = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                name=f"rank{rank}",
                args=(rank, world_size, call_receive, report_send),
                # Not a daemon: ranks must be able to start children of their own (dist_checkpointing's
                # save starts a multiprocessing Manager). _stop_ranks kills whatever is left.
                daemon=False,
            )
            process.start()
            # The child holds its own copies; closing ours lets a dead child read as EOF.
            call_receive.close()
            report_send.close()
            ranks.processes.append(process)
            ranks.calls.append(call_send)
            ranks.reports.append(report_receive)
        return ranks

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def stop(self, *, wait_s: float) -> None:
        """Close the call pipes (an idle rank exits on it), then :func:`_stop_ranks`."""
        for call_pipe in self.calls:
            call_pipe.close()
        _stop_ranks(self.processes, wait_s=wait_s)
        for report_pipe in self.reports:
            report_pipe.close()


# The rank processes kept between calls inside keep_rank_processes(), by world size, least recently used first:
# at most two sets (a suite mixes world sizes 2 and 4), each retired after a number of calls so that whatever a
# call leaves in a process's heap does not pile up over a whole suite.
_kept_ranks: dict[int, _Ranks] = {}
_keeping = False
_KEPT_SETS = 2
_CALLS_PER_PROCESS = 20


@contextmanager
def keep_rank_processes() -> Iterator[None]:
    """Inside this block, :func:`run_distributed` keeps the rank processes of a clean call for the next call of the
    same world size (all stopped on leaving the block)."""
    global _keeping
    _keeping = True
    try:
        yield
    finally:
        _keeping = False
        while _kept_ranks:
            _kept_ranks.pop(next(iter(_kept_ranks))).stop(wait_s=_EXIT_WAIT_S)


def _ranks_for(world_size: int) -> _Ranks:
    kept = _kept_ranks.pop(world_size, None)
    if kept is not None and kept.alive() and kept.calls_run < _CALLS_PER_PROCESS:
        return kept
    if kept is not None:
        kept.stop(wait_s=_EXIT_WAIT_S)
    return _Ranks.start(world_size)


def _keep(ranks: _Ranks) -> None:
    ranks.calls_run += 1
    _kept_ranks[len(ranks.processes)] = ranks
    while len(_kept_ranks) > _KEPT_SETS:
        _kept_ranks.pop(next(iter(_kept_ranks))).stop(wait_s=_EXIT_WAIT_S)


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

    Each rank is a ``spawn`` process (kept from the previous call inside :func:`keep_rank_processes`) that joins
    a gloo process group on a free TCP port of 127.0.0.1,
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

    ranks = _ranks_for(world_size)
    processes, report_of_rank = ranks.processes, dict(enumerate(ranks.reports))
    call = _Call(
        port=_free_tcp_port(),
        sizes=sizes,
        timeout_s=timeout_s,
        fn=fn,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        environ=dict(os.environ),
        cwd=os.getcwd(),
    )
    try:
        for call_pipe in ranks.calls:
            call_pipe.send(call)
    except BaseException:
        ranks.stop(wait_s=0.0)
        raise

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
        if finished_cleanly and _keeping:
            _keep(ranks)
        else:
            ranks.stop(wait_s=_EXIT_WAIT_S if finished_cleanly else 0.0)

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
