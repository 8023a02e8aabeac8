"""What ``bench/traffic.py`` charges each collective, on torch's fake process group (world 4, rank 1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_muon.bench.traffic import count_sent_bytes


@pytest.fixture
def world_of_four():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=1, world_size=4, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_each_collective_is_charged_what_one_rank_sends(world_of_four):
    mib = torch.zeros(2**18)  # 1 MiB of fp32
    with count_sent_bytes() as sent:
        dist.all_reduce(mib)
        dist.reduce_scatter_tensor(torch.zeros(2**16), mib)
        dist.all_gather_into_tensor(torch.zeros(2**20), mib)
        dist.all_to_all_single(torch.zeros(8), torch.zeros(8), [1, 2, 3, 2], [4, 1, 1, 2])
        dist.broadcast(mib, src=0)  # not the source: sends nothing
    assert sent == {
        "all_reduce": 2**21 * 3 // 4,  # ring: 2 (n-1)/n
        "reduce_scatter_tensor": 2**20 * 3 // 4,
        "all_gather_into_tensor": 3 * 2**20,  # (n-1) x the input
        "all_to_all_single": (4 + 1 + 2) * 4,  # the rows for ranks 0, 2, 3
        "broadcast": 0,
    }
    dist.all_reduce(mib)  # outside the block: not counted
    assert sum(sent.values()) == 2**21 * 3 // 4 + 2**20 * 3 // 4 + 3 * 2**20 + 28
