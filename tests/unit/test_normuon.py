"""NorMuon (Li et al. 2025, Algorithm 1) as a plug-in of Muon's step loop, against the paper's formula."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.ops.newton_schulz import newton_schulz
from megatron_muon.ops.normuon import row_normalize_
from megatron_muon.optim.muon import ROW_SECOND_MOMENT, Muon, NorMuonNormalization


def _paper_update(orthogonal: torch.Tensor, v: torch.Tensor, beta2: float, eps: float, lr: float):
    """Algorithm 1 of the NorMuon paper for one matrix: returns (Δ, v). Δ has RMS 0.2·lr (Moonlight match)."""
    m, n = orthogonal.shape
    v = beta2 * v + (1 - beta2) * (orthogonal * orthogonal).mean(dim=1)
    normalized = orthogonal / (v.sqrt() + eps).unsqueeze(1)
    lr_hat = 0.2 * lr * (m * n) ** 0.5 / normalized.norm()
    return lr_hat * normalized, v


def test_muon_with_normuon_takes_the_papers_step():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(3)]
    lr, beta, beta2, eps = 0.02, 0.9, 0.95, 1e-8
    param = torch.nn.Parameter(weight.clone())
    optimizer = Muon(
        [param],
        lr=lr,
        momentum=beta,
        nesterov=False,
        scale_mode="moonlight",
        compute_dtype=torch.float32,
        post_orthogonalize=NorMuonNormalization(beta2=beta2, eps=eps),
    )
    expected, momentum, v = weight.clone(), torch.zeros_like(weight), torch.zeros(48)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        momentum = beta * momentum + (1 - beta) * grad
        orthogonal = newton_schulz(momentum, 5, "quintic", compute_dtype=torch.float32)
        delta, v = _paper_update(orthogonal, v, beta2, eps, lr)
        expected = expected - delta
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    (state,) = [s for s in optimizer.state[param].values()]
    torch.testing.assert_close(state[ROW_SECOND_MOMENT], v)
    # And it is not plain Muon's step (rows of an orthogonalized random matrix differ in norm).
    plain_param = torch.nn.Parameter(weight.clone())
    plain = Muon([plain_param], lr=lr, momentum=beta, nesterov=False, scale_mode="moonlight")
    for grad in grads:
        plain_param.grad = grad.clone()
        plain.step()
    assert (plain_param.detach() - expected).abs().max() > 1e-3


@pytest.mark.parametrize("split", ["rows", "cols"])
def test_sharded_normalization_equals_the_whole_matrix(split):
    """The reductions the distributed mode passes in make shards add up to the whole-matrix result."""
    torch.manual_seed(1)
    full = torch.randn(2, 12, 8)
    v0 = torch.rand(2, 12)
    whole = row_normalize_(full, v0.clone(), beta2=0.9, eps=1e-8, num_rows=12, num_cols=8)
    dim = 1 if split == "rows" else 2
    shards = full.chunk(2, dim=dim)
    # A stand-in for an all-reduce across the two shards: the sum of both shards' tensors.
    partial = {}

    def collect(name):
        def reduce(tensor):
            partial.setdefault(name, []).append(tensor.clone())
            return tensor

        return reduce

    # First pass records each shard's local sums; second pass feeds their sum back.
    for shard, v in zip(shards, v0.chunk(2, dim=1) if split == "rows" else (v0, v0), strict=True):
        key = "total_all_reduce" if split == "rows" else "row_sum_all_reduce"
        row_normalize_(shard, v.clone(), beta2=0.9, eps=1e-8, num_rows=12, num_cols=8, **{key: collect(key)})
    key = "total_all_reduce" if split == "rows" else "row_sum_all_reduce"
    summed = iter([sum(partial[key])] * 2)
    results = []
    for shard, v in zip(shards, v0.chunk(2, dim=1) if split == "rows" else (v0, v0), strict=True):
        results.append(
            row_normalize_(
                shard,
                v.clone(),
                beta2=0.9,
                eps=1e-8,
                num_rows=12,
                num_cols=8,
                **{key: lambda t: next(summed).clone()},
            )
        )
    torch.testing.assert_close(torch.cat(results, dim=dim), whole)


def test_zero_update_stays_zero_and_bad_settings_are_refused():
    out = row_normalize_(
        torch.zeros(1, 4, 3), torch.zeros(1, 4), beta2=0.95, eps=1e-8, num_rows=4, num_cols=3
    )
    assert torch.equal(out, torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="beta2=1.0"):
        NorMuonNormalization(beta2=1.0)
    with pytest.raises(ValueError, match="eps=0"):
        NorMuonNormalization(eps=0)
