"""run_distributed: values come back by rank, a failing rank's traceback reaches pytest, a hang times out."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from megatron_muon.testing import (
    DistributedRunError,
    DistributedTimeoutError,
    keep_rank_processes,
    run_distributed,
)


def _describe_rank(offset: int):
    from megatron.core import parallel_state

    rank = torch.distributed.get_rank()
    return {
        "rank": rank,
        "world": torch.distributed.get_world_size(),
        "backend": torch.distributed.get_backend(),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "threads": torch.get_num_threads(),
        "tensor": torch.full((2,), float(rank + offset)),
    }


def _raise_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank one refuses: marker-7f3a")
    torch.distributed.barrier()  # never completes: rank 1 does not join
    return "unreachable"


def _hang_on_rank_one():
    if torch.distributed.get_rank() == 1:
        time.sleep(3600)
    return "rank 0 done"


@pytest.mark.slow
def test_values_come_back_indexed_by_rank_with_parallel_state_initialized():
    values = run_distributed(_describe_rank, 2, tp=2, args=(10,))

    assert [v["rank"] for v in values] == [0, 1]
    for rank, value in enumerate(values):
        assert value["world"] == 2
        assert value["backend"] == "gloo"
        assert value["tp_size"] == 2
        assert value["tp_rank"] == rank
        assert value["threads"] == 1
        torch.testing.assert_close(value["tensor"], torch.full((2,), float(rank + 10)))


@pytest.mark.slow
def test_a_failing_rank_reports_its_traceback_and_the_blocked_rank():
    started = time.monotonic()
    with pytest.raises(DistributedRunError) as raised:
        run_distributed(_raise_on_rank_one, 2, timeout_s=300)

    # Rank 0 waits in a barrier rank 1 never joins: gloo fails it when rank 1 exits, or the harness kills
    # it; either way nobody waits for the 300 s timeout (start-up takes ~10 s, more on a loaded machine).
    assert time.monotonic() - started < 150
    message = str(raised.value)
    assert "first reported: rank 1" in message
    rank_one_section = message.split("----- rank 1 -----", 1)[1]
    assert 'raise ValueError("rank one refuses: marker-7f3a")' in rank_one_section  # the traceback itself
    assert "ValueError: rank one refuses: marker-7f3a" in rank_one_section
    assert "----- rank 0 -----" in message or "ranks [0] were still running" in message


@pytest.mark.slow
def test_a_hanging_rank_times_out_is_named_and_killed():
    started = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as raised:
        run_distributed(_hang_on_rank_one, 2, timeout_s=10)

    assert time.monotonic() - started < 50  # killed, not joined after its hour of sleep
    message = str(raised.value)
    unfinished = re.search(r"ranks \[([0-9, ]+)\] did not finish within timeout_s=10", message)
    assert unfinished, message
    unfinished_ranks = [int(rank) for rank in unfinished.group(1).split(",")]
    assert 1 in unfinished_ranks
    # On a loaded machine rank 0 may still be starting up at 10 s; if it finished it is listed as such.
    assert unfinished_ranks == [1] and "finished: [0]" in message or unfinished_ranks == [0, 1], message


def test_a_function_that_cannot_be_pickled_is_refused_before_spawning():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda: None, 1)


def test_a_layout_that_does_not_fit_the_world_is_refused():
    with pytest.raises(ValueError, match="tp=2 \\* pp=2 does not divide world_size=2"):
        run_distributed(_describe_rank, 2, tp=2, pp=2, args=(0,))


def _pid_and_state():
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    recorded = sorted(tracker.metrics)
    tracker.record("planted", torch.ones(()), layer_number=1, num_layers=1)  # the next call must not see it
    torch.set_default_dtype(torch.float64)  # the next call must not see it
    return {
        "pid": os.getpid(),
        "marker": os.environ.get("HARNESS_MARKER"),
        "cwd": os.getcwd(),
        "tp": torch.distributed.get_world_size(),
        "metrics": recorded,
    }


def _default_dtype():
    return torch.get_default_dtype()


def _dtensor_op_on_a_new_group(groups_before: int):
    """A DTensor op (``.data``, as FSDP2 parameters see it) on a mesh over a group made after ``groups_before``
    others, so that calls with different counts give the group different names."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    for _ in range(groups_before):
        torch.distributed.new_group([0, 1])
    mesh = DeviceMesh.from_group(torch.distributed.new_group([0, 1]), "cpu")
    sharded = distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])
    return sharded.data.device_mesh.get_local_rank()


def _gloo_loops_and_group_sums():
    """The gloo TCP loop threads of this rank, and an all-reduce on each of megatron's groups of this layout."""
    from megatron.core import parallel_state

    names = []
    for thread in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass  # a thread that ended meanwhile
    sums = {}
    for name, group in [
        ("tp", parallel_state.get_tensor_model_parallel_group()),
        ("dp", parallel_state.get_data_parallel_group()),
        ("ep", parallel_state.get_expert_model_parallel_group()),
        ("world", None),
    ]:
        value = torch.ones(())
        torch.distributed.all_reduce(value, group=group)
        sums[name] = float(value)
    return names.count("gloo_tcp_loop"), sums


@pytest.mark.slow
def test_megatrons_gloo_groups_share_one_device():
    """torch gives each gloo group a device whose TCP loop thread wakes every 10 ms (24 of them per rank here);
    platform/gloo.py puts every group on one device, and each group still reduces over its own ranks."""
    values = run_distributed(_gloo_loops_and_group_sums, 4, tp=2, ep=2)
    assert [loops for loops, _ in values] == [1] * 4
    assert [sums for _, sums in values] == [{"tp": 2.0, "dp": 2.0, "ep": 2.0, "world": 4.0}] * 4


@pytest.mark.slow
def test_kept_rank_processes_take_the_callers_environment_and_start_clean(tmp_path, monkeypatch):
    with keep_rank_processes():
        monkeypatch.setenv("HARNESS_MARKER", "first")
        first = run_distributed(_pid_and_state, 2, tp=2)
        monkeypatch.setenv("HARNESS_MARKER", "second")
        monkeypatch.chdir(tmp_path)
        second = run_distributed(_pid_and_state, 2, tp=1)
        assert run_distributed(_default_dtype, 2) == [torch.float32, torch.float32]
        # DTensor's caches ignore a mesh's groups: a kept process must not hand back the last call's mesh, whose
        # group name is gone ("Could not resolve the process group registered under the name ...").
        assert run_distributed(_dtensor_op_on_a_new_group, 2, args=(3,)) == [0, 1]
        assert run_distributed(_dtensor_op_on_a_new_group, 2, args=(0,)) == [0, 1]
        with pytest.raises(DistributedRunError):
            run_distributed(_raise_on_rank_one, 2, timeout_s=120)
        after_failure = run_distributed(_pid_and_state, 2)
    assert [value["pid"] for value in second] == [value["pid"] for value in first]  # kept, not respawned
    assert [value["marker"] for value in first] == ["first"] * 2
    assert [value["marker"] for value in second] == ["second"] * 2
    assert [value["cwd"] for value in second] == [str(tmp_path)] * 2
    assert all(value["metrics"] == [] for value in first + second)
    assert not {value["pid"] for value in after_failure} & {
        value["pid"] for value in first
    }  # failed: respawned
