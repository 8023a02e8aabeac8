"""The small-model helper of tests, benchmarks and the example (``megatron_muon/testing/small_model.py``) refuses
inconsistent requests before it builds anything; the builds themselves run in tests/distributed."""

from __future__ import annotations

import pytest
from megatron.core.distributed import DistributedDataParallelConfig

from megatron_muon.testing.small_model import build_small_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(wrap="ddp_overlap"),
            r"wrap='ddp_overlap'; valid: \['ddp', 'distributed_optimizer', 'fsdp', 'none'\]",
        ),
        (dict(layout_independent=True, seed=None), "layout_independent=True draws from seed"),
        (
            dict(ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True)),
            "needs wrap='distributed_optimizer'",
        ),
        (
            dict(wrap="distributed_optimizer", ddp_config=DistributedDataParallelConfig()),
            "use_distributed_optimizer=False with wrap='distributed_optimizer'",
        ),
        (dict(wrap="fsdp", ddp_config=DistributedDataParallelConfig()), "wrap='fsdp' does not use it"),
    ],
)
def test_inconsistent_requests_are_refused_before_the_build(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_small_model(**kwargs)
