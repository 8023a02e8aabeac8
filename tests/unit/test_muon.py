"""The single-process Muon step against its formula, written out here independently of ``optim/reference.py``:

    m ← β·m + (1−β)·g;   u = (1−β)·g + β·m (Nesterov) or m;   W ← W·(1 − lr·wd) − lr·scale·NS(u)

per logical matrix (every matrix of a 3-D stack is its own), plus hyperparameter validation, parameters without
gradients, decoupled weight decay and state_dict round trips.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from megatron_muon.ops.newton_schulz import newton_schulz
from megatron_muon.optim.muon import Muon

# wide, tall, square and a stack of 3 wide matrices (e.g. the experts of one MoE layer)
SHAPES = [(16, 48), (48, 16), (32, 32), (3, 16, 24)]
STEPS = 3
LR = 0.05
BETA = 0.9


def expected_scale(mode: str, fan_out: int, fan_in: int) -> float:
    """The scale rules as the papers state them (see ops/scaling.py for the citations)."""
    return {
        "spectral": math.sqrt(fan_out / fan_in),
        "moonlight": 0.2 * math.sqrt(max(fan_out, fan_in)),
        "shape": math.sqrt(max(1.0, fan_out / fan_in)),
        "none": 1.0,
    }[mode]


def random_tensors(shapes, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(dtype) for shape in shapes]


def formula_muon(weights, grads_per_step, *, lr, beta, nesterov, weight_decay, scale_mode, compute_dtype):
    """Muon written out matrix by matrix: a stack (..., m, n) is a list of independent (m, n) matrices."""
    results = []
    for index, weight in enumerate(weights):
        matrices = [w.clone() for w in weight.reshape(-1, *weight.shape[-2:])]
        momenta = [torch.zeros_like(w) for w in matrices]
        for grads in grads_per_step:
            grad_matrices = grads[index].reshape(-1, *weight.shape[-2:])
            for k, (w, g) in enumerate(zip(matrices, grad_matrices, strict=True)):
                momenta[k] = beta * momenta[k] + (1 - beta) * g
                u = (1 - beta) * g + beta * momenta[k] if nesterov else momenta[k]
                orthogonal = newton_schulz(u, steps=5, coefficients="quintic", compute_dtype=compute_dtype)
                fan_out, fan_in = w.shape
                scale = expected_scale(scale_mode, fan_out, fan_in)
                matrices[k] = w * (1 - lr * weight_decay) - lr * scale * orthogonal
        results.append(torch.stack(matrices).reshape(weight.shape))
    return results


def run_muon(weights, grads_per_step, **muon_kwargs) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Muon(params, **muon_kwargs)
    for grads in grads_per_step:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


# ---------------------------------------------------------------------------------------------------------
# The update


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale_mode", ["spectral", "moonlight", "shape", "none"])
def test_update_matches_the_formula_for_every_scale_mode_and_shape(scale_mode, nesterov, weight_decay):
    weights = random_tensors(SHAPES, seed=0)
    grads_per_step = [random_tensors(SHAPES, seed=1 + step) for step in range(STEPS)]
    hyper = dict(lr=LR, nesterov=nesterov, weight_decay=weight_decay, scale_mode=scale_mode)

    ours = run_muon(weights, grads_per_step, momentum=BETA, compute_dtype=torch.float32, **hyper)
    expected = formula_muon(weights, grads_per_step, beta=BETA, compute_dtype=torch.float32, **hyper)

    for shape, got, want, start in zip(SHAPES, ours, expected, weights, strict=True):
        assert not torch.equal(got, start), f"{shape}: Muon did not move the weight"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, s=shape: f"{s}: {m}")


def test_stack_matrices_are_orthogonalized_separately():
    # One matrix of a stack with a 1000x larger gradient must not shrink the update of the others, as it would
    # if the stack were normalized (or orthogonalized) as one tensor.
    weight = torch.zeros(2, 8, 24)
    grad = random_tensors([(2, 8, 24)], seed=3)[0]
    grad[0] *= 1000.0
    (updated,) = run_muon(
        [weight], [[grad]], lr=1.0, momentum=0.0, scale_mode="none", compute_dtype=torch.float32
    )
    for k in range(2):
        expected = -newton_schulz(grad[k], compute_dtype=torch.float32)
        torch.testing.assert_close(updated[k], expected, rtol=1e-5, atol=1e-6)


def test_same_shape_matrices_of_every_layer_run_as_one_newton_schulz_call(monkeypatch):
    # Four "layers", each a stack of 3 wide experts, a tall matrix and a square one: three shape classes, so three
    # batched calls per step, whatever the number of layers (one per layer and class before batching across them).
    import megatron_muon.optim.muon as muon_module

    shapes = [shape for _ in range(4) for shape in [(3, 16, 48), (48, 16), (32, 32)]]
    batch_sizes: list[int] = []

    def counting_newton_schulz(x, *args, **kwargs):
        batch_sizes.append(x.shape[0])
        return newton_schulz(x, *args, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz", counting_newton_schulz)
    weights = random_tensors(shapes, seed=5)
    grads_per_step = [random_tensors(shapes, seed=6)]
    hyper = dict(lr=LR, nesterov=True, weight_decay=0.0, scale_mode="spectral")
    ours = run_muon(weights, grads_per_step, momentum=BETA, compute_dtype=torch.float32, **hyper)
    assert sorted(batch_sizes) == [4, 4, 12]
    expected = formula_muon(weights, grads_per_step, beta=BETA, compute_dtype=torch.float32, **hyper)
    for shape, got, want in zip(shapes, ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, s=shape: f"{s}: {m}")


def test_bf16_compute_is_close_to_fp32():
    weights = random_tensors(SHAPES, seed=0)
    grads_per_step = [random_tensors(SHAPES, seed=1 + step) for step in range(STEPS)]
    hyper = dict(lr=LR, momentum=BETA, weight_decay=0.1, scale_mode="spectral")
    fp32 = run_muon(weights, grads_per_step, compute_dtype=torch.float32, **hyper)
    bf16 = run_muon(weights, grads_per_step, compute_dtype=torch.bfloat16, **hyper)
    for shape, a, b, start in zip(SHAPES, fp32, bf16, weights, strict=True):
        update_fp32, update_bf16 = a - start, b - start
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.002 per op); after five NS steps of three GEMMs
        # the update differs from the fp32 one by 0.6–1.0 % (measured on these shapes); 3 % leaves a margin.
        relative = (torch.linalg.norm(update_bf16 - update_fp32) / torch.linalg.norm(update_fp32)).item()
        assert relative < 0.03, f"{shape}: bf16 update differs from fp32 by {relative:.3f} (relative)"
        assert b.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters


def a_matrix() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(4, 8))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(lr=-0.1), "lr=-0.1"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(momentum=1.5), "momentum=1.5"),
        (dict(momentum=-0.1), "momentum=-0.1"),
        (dict(weight_decay=-0.01), "weight_decay=-0.01"),
        (dict(scale_mode="rms"), "scale_mode='rms'"),
        (dict(ns_steps=0), "ns_steps=0"),
        (dict(coefficients="cubic"), "coefficients='cubic'"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(kwargs, named):
    arguments = dict(lr=0.02) | kwargs
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        Muon([a_matrix()], **arguments)


def test_an_unknown_param_group_key_raises_naming_it():
    with pytest.raises(ValueError, match="betas"):
        Muon([{"params": [a_matrix()], "betas": (0.9, 0.95)}], lr=0.02)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_parameters_with_fewer_than_two_dims_are_rejected(shape):
    with pytest.raises(ValueError, match=r"needs a matrix"):
        Muon([torch.nn.Parameter(torch.zeros(shape))], lr=0.02)


# ---------------------------------------------------------------------------------------------------------
# Gradients and weight decay


@pytest.mark.parametrize("history", ["never_had_a_gradient", "had_a_gradient_the_step_before"])
def test_a_parameter_without_gradient_is_left_untouched(history):
    # torch.optim convention (and Muon.step's docstring: "every parameter that has a gradient"): grad None means
    # skip the parameter, with weight decay and with momentum left from earlier steps.
    with_grad, without_grad = (torch.nn.Parameter(w) for w in random_tensors([(8, 16), (8, 16)], seed=0))
    optimizer = Muon([with_grad, without_grad], lr=LR, weight_decay=0.1, compute_dtype=torch.float32)
    if history == "had_a_gradient_the_step_before":
        with_grad.grad, without_grad.grad = random_tensors([(8, 16), (8, 16)], seed=1)
        optimizer.step()
    before = without_grad.detach().clone()
    with_grad.grad, without_grad.grad = random_tensors([(8, 16)], seed=2)[0], None
    optimizer.step()
    torch.testing.assert_close(without_grad.detach(), before, rtol=0, atol=0)


def test_weight_decay_is_decoupled_a_zero_gradient_gives_pure_decay():
    # Newton–Schulz maps a zero matrix to zero (eps in the normalization), so the step is W·(1 − lr·wd) alone.
    (weight,) = random_tensors([(8, 16)], seed=0)
    param = torch.nn.Parameter(weight.clone())
    optimizer = Muon([param], lr=0.1, weight_decay=0.5, compute_dtype=torch.float32)
    param.grad = torch.zeros_like(param)
    optimizer.step()
    torch.testing.assert_close(param.detach(), weight * (1 - 0.1 * 0.5), rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpointing


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(param_dtype):
    shapes = [(16, 48), (3, 16, 24)]
    hyper = dict(momentum=BETA, nesterov=True, weight_decay=0.1, compute_dtype=torch.float32)
    grads_per_step = [random_tensors(shapes, seed=10 + step, dtype=param_dtype) for step in range(4)]
    original = [torch.nn.Parameter(w) for w in random_tensors(shapes, seed=0, dtype=param_dtype)]
    optimizer = Muon(original, lr=LR, **hyper)
    for grads in grads_per_step[:2]:
        for param, grad in zip(original, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()

    buffer = io.BytesIO()  # through bytes, as a checkpoint does (state_dict() returns the live tensors)
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = [torch.nn.Parameter(p.detach().clone()) for p in original]
    resumed = Muon(restored, lr=123.0, **hyper)  # the learning rate comes back from the state dict
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["lr"] == LR

    for grads in grads_per_step[2:]:
        for params, opt in ((original, optimizer), (restored, resumed)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            opt.step()
    for a, b in zip(original, restored, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Structure: the transport knows nothing of the optimizer


def test_the_grid_and_its_transport_import_nothing_of_the_optimizer():
    """``placement`` (plan + transport) and ``comm`` load without ``muon``: no import cycle, and the math stays in
    one module."""
    import subprocess
    import sys

    code = (
        "import sys, megatron_muon.optim.placement, megatron_muon.optim.comm; "
        "assert 'megatron_muon.optim.muon' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_the_step_settings_are_one_frozen_config():
    import dataclasses

    from megatron_muon.optim.options import NewtonSchulzSettings

    optimizer = Muon([a_matrix()], lr=0.02, ns_steps=3, coefficients=[[3.0, -3.0, 1.0]] * 3)
    assert optimizer.newton_schulz == NewtonSchulzSettings(
        steps=3, coefficients=((3.0, -3.0, 1.0),) * 3, compute_dtype=torch.bfloat16
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        optimizer.newton_schulz.steps = 5


def test_the_package_front_door_gives_the_optimizer_its_builder_and_settings_without_loading_megatron_early():
    import subprocess
    import sys

    code = (
        "import sys, megatron_muon.optim as optim, megatron_muon.optim.options; "
        "assert 'megatron.core' not in sys.modules and 'megatron_muon.optim.muon' not in sys.modules; "
        "from megatron_muon.optim import Muon, MuonConfig, build_optimizer; "
        "from megatron_muon.optim.build import build_optimizer as built; "
        "assert build_optimizer is built and Muon.__module__ == 'megatron_muon.optim.muon'; "
        "assert all(getattr(optim, name) is not None for name in optim.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
