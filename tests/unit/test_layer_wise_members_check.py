"""``optim/layer_wise._check_members_kept_their_params`` against megatron's real ``LayerWiseDistributedOptimizer``.

With bf16, megatron wraps each member in ``Float16OptimizerWithFloat16Params``, whose torch optimizer then holds fp32
*main copies* of the bf16 model parameters. The check used to compare the model parameters it passed with those
copies, so every bf16 run with ``optimizer.distributed_optimizer: true`` was refused at start-up with "narrowed Muon
member 0 to N of the N parameters this rank owns" (seen first in the fake-GPU rehearsal of kimi_k2_1t.yaml; it
fired at any scale). The wrapper needs CUDA parameters: they are built on the rehearsal's fake GPU."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from megatron.core.optimizer import FP32Optimizer, OptimizerConfig
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

from megatron_muon.optim.layer_wise import _check_members_kept_their_params, _model_param_ids
from megatron_muon.rehearsal.fake_gpu import fake_cuda_device


class _Block(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 16, bias=False, device="cuda", dtype=dtype)
        self.kv = torch.nn.Linear(32, 8, bias=False, device="cuda", dtype=dtype)
        self.out = torch.nn.Linear(16, 32, bias=False, device="cuda", dtype=dtype)


def _layer_wise(params: Sequence[torch.Tensor], *, bf16: bool) -> LayerWiseDistributedOptimizer:
    """megatron's layer-wise optimizer over one member updating ``params`` (one data-parallel rank: megatron narrows
    nothing, it only wraps), as ``build_layer_wise_chain`` builds it."""
    config = OptimizerConfig(
        optimizer="sgd", lr=0.1, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32
    )
    raw: torch.optim.Optimizer | FP32Optimizer = torch.optim.SGD(list(params), lr=0.1)
    if not bf16:
        raw = FP32Optimizer(raw, config, None)
    return LayerWiseDistributedOptimizer([raw], config, None, model_chunks=None)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_a_member_that_kept_its_params_passes(bf16: bool) -> None:
    with fake_cuda_device():
        block = _Block(torch.bfloat16 if bf16 else torch.float32)
        params = list(block.parameters())
        passed = [[id(p) for p in params]]
        layer_wise = _layer_wise(params, bf16=bf16)
        member = layer_wise.chained_optimizers[0]
        if bf16:  # the case the check got wrong: the torch optimizer holds fp32 copies, not the model params
            held = {id(p) for group in member.param_groups for p in group["params"]}
            assert held.isdisjoint(passed[0])
        _check_members_kept_their_params(layer_wise, passed, [block])
        assert _model_param_ids(member) == set(passed[0])


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_a_param_megatron_did_not_keep_is_named(bf16: bool) -> None:
    with fake_cuda_device():
        block = _Block(torch.bfloat16 if bf16 else torch.float32)
        kept = [block.q.weight, block.out.weight]
        layer_wise = _layer_wise(kept, bf16=bf16)
        passed = [[id(p) for p in (block.q.weight, block.kv.weight, block.out.weight)]]
        with pytest.raises(
            ValueError, match=r"narrowed Muon member 0 to 2 of the 3 .*first difference: kv\.weight"
        ):
            _check_members_kept_their_params(layer_wise, passed, [block])
