"""Our Muon against NVIDIA Emerging-Optimizers' Muon (the backend of megatron-core's own Muon) for settings both
implement, on whole 2-D matrices in fp32.

Name map (their ``get_muon_scale_factor``): our ``spectral`` √(out/in) is their ``unit_rms_norm``; our ``shape``
√max(1, out/in) is their ``shape_scaling``; our ``moonlight`` 0.2·√max(out, in) is their ``spectral``
(√max(out, in)) with ``extra_scale_factor=0.2``. Coefficients: our ``quintic`` (Keller Jordan's
(3.4445, -4.7750, 2.0315) every step) is their ``simple``; their ``quintic`` is a per-step table, which we take
as an explicit coefficient list.
"""

from __future__ import annotations

import pytest
import torch

from megatron_muon.optim.muon import Muon

emerging_optimizers = pytest.importorskip("emerging_optimizers")
from emerging_optimizers.orthogonalized_optimizers import Muon as TheirMuon  # noqa: E402
from emerging_optimizers.orthogonalized_optimizers import muon_utils  # noqa: E402

SHAPES = [(16, 48), (48, 16), (32, 32)]
STEPS = 3
LR = 0.05

# our scale_mode -> (their scale_mode, their extra_scale_factor)
SCALE_MODES = {
    "spectral": ("unit_rms_norm", 1.0),
    "shape": ("shape_scaling", 1.0),
    "moonlight": ("spectral", 0.2),
}


def random_tensors(shapes, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def run(make_optimizer, weights, grads_per_step) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = make_optimizer(params)
    for grads in grads_per_step:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale_mode", sorted(SCALE_MODES))
@pytest.mark.parametrize("schedule", ["keller_jordan_quintic", "their_quintic_table"])
def test_same_update_as_emerging_optimizers_muon(schedule, scale_mode, nesterov, weight_decay):
    their_scale_mode, extra_scale_factor = SCALE_MODES[scale_mode]
    if schedule == "keller_jordan_quintic":
        ours_coefficients, their_coefficient_type = "quintic", "simple"
    else:
        ours_coefficients = list(muon_utils._COEFFICIENT_SETS["quintic"])  # 5 triples, one per step
        their_coefficient_type = "quintic"
    common = dict(lr=LR, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    weights = random_tensors(SHAPES, seed=0)
    grads_per_step = [random_tensors(SHAPES, seed=1 + step) for step in range(STEPS)]

    ours = run(
        lambda params: Muon(
            params,
            scale_mode=scale_mode,
            ns_steps=5,
            coefficients=ours_coefficients,
            compute_dtype=torch.float32,
            **common,
        ),
        weights,
        grads_per_step,
    )
    theirs = run(
        lambda params: TheirMuon(
            params,
            weight_decay_method="decoupled",
            fp32_matmul_prec="highest",
            coefficient_type=their_coefficient_type,
            num_ns_steps=5,
            scale_mode=their_scale_mode,
            extra_scale_factor=extra_scale_factor,
            **common,
        ),
        weights,
        grads_per_step,
    )
    for shape, a, b, start in zip(SHAPES, ours, theirs, weights, strict=True):
        assert not torch.equal(a, start)
        # Both normalize by the Frobenius norm (theirs from the entries, ours from trace(X·Xᵀ)) and differ only by
        # fp32 rounding: at most 5e-7 on weights of size ~1 after updates of ~0.08 (measured).
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6, msg=lambda m, s=shape: f"{s}: {m}")
