"""run_distributed: values come back by rank, a failing rank's traceback reaches pytest, a hang times out."""

from __future__ import annotations

import re
import time

import pytest
import torch

from megatron_muon.testing import DistributedRunError, DistributedTimeoutError, run_distributed


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
