"""Training steps on one GPU at TP = EP = 1 (groups of size 1 still run the TP / EP code paths) through the
trainer's pieces (``megatron_muon.testing.tiny_training``): bf16 with fp32 main params on the local spec and on
Transformer Engine's, FP8 through TE's recipes, FP8 primary weights, and FP8 Newton–Schulz's cost in loss."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_muon.testing.tiny_training import train_tiny_moe

STEPS = 30


def falls(losses: list[float], by: float = 0.5) -> bool:
    """Mean of the last 5 below the mean of the first 3 by ``by`` nats (ln 512 = 6.24 at the start)."""
    return sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - by


def muon_member(optimizer):
    """The Muon member of the ChainedOptimizer (megatron's Float16OptimizerWithFloat16Params under bf16)."""
    (member,) = [o for o in optimizer.chained_optimizers if hasattr(o.optimizer, "placement")]
    return member


def test_bf16_local_spec_trains_with_fp32_main_params(cuda_world):
    run = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", bf16=True)
    assert all(math.isfinite(x) for x in run.losses) and not any(run.skipped), run.losses
    assert falls(run.losses), run.losses
    member = muon_member(run.optimizer)
    model_params = [p for group in member.float16_groups for p in group]
    main_params = [p for group in member.fp32_from_float16_groups for p in group]
    assert model_params and all(p.dtype == torch.bfloat16 and p.is_cuda for p in model_params)
    assert all(p.dtype == torch.float32 for p in main_params)
    # After the step the bf16 weights are the fp32 main weights rounded, nothing else.
    for model_param, main_param in zip(model_params, main_params, strict=True):
        assert torch.equal(model_param, main_param.to(torch.bfloat16))


def test_bf16_close_to_fp32_training(cuda_world):
    fp32 = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", ns_compute_dtype="float32")
    bf16 = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", bf16=True)
    assert abs(sum(bf16.losses[-5:]) - sum(fp32.losses[-5:])) / 5 < 0.15, (fp32.losses, bf16.losses)


@pytest.mark.parametrize("ns_fp8_steps", [1, 2])
def test_fp8_newton_schulz_costs_little_in_loss(cuda_world, fp8_gpu, ns_fp8_steps):
    bf16 = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", bf16=True)
    fp8 = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", bf16=True, ns_fp8_steps=ns_fp8_steps)
    print(
        f"fp8_steps={ns_fp8_steps}: mean of the last 5 losses bf16 NS {sum(bf16.losses[-5:]) / 5:.4f}, "
        f"FP8 NS {sum(fp8.losses[-5:]) / 5:.4f}"
    )
    assert falls(fp8.losses), fp8.losses
    assert abs(sum(fp8.losses[-5:]) - sum(bf16.losses[-5:])) / 5 < 0.1, (bf16.losses, fp8.losses)


# ---------------------------------------------------------------------------------------------------------
# Transformer Engine


def test_bf16_te_spec_trains_like_the_local_spec(cuda_world, transformer_engine):
    local = train_tiny_moe(cuda_world, steps=STEPS, device="cuda", bf16=True)
    te = train_tiny_moe(
        cuda_world, steps=STEPS, device="cuda", bf16=True, transformer_impl="transformer_engine"
    )
    assert all(math.isfinite(x) for x in te.losses) and falls(te.losses), te.losses
    # Other kernels and init order (TE draws its own weights): the curves agree loosely, not step for step.
    assert abs(sum(te.losses[-5:]) - sum(local.losses[-5:])) / 5 < 0.3, (local.losses, te.losses)


def _fp8_recipe_or_skip(recipe: str) -> None:
    capability = torch.cuda.get_device_capability()
    if recipe == "mxfp8" and capability < (10, 0):
        pytest.skip(
            f"MXFP8 needs Blackwell (compute capability 10.0); this GPU has {capability[0]}.{capability[1]}"
        )


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
def test_fp8_training_through_te_recipes(cuda_world, transformer_engine, fp8_gpu, recipe):
    _fp8_recipe_or_skip(recipe)
    bf16 = train_tiny_moe(
        cuda_world, steps=STEPS, device="cuda", bf16=True, transformer_impl="transformer_engine"
    )
    fp8 = train_tiny_moe(
        cuda_world, steps=STEPS, device="cuda", transformer_impl="transformer_engine", fp8_recipe=recipe
    )
    assert all(math.isfinite(x) for x in fp8.losses) and falls(fp8.losses, by=0.3), fp8.losses
    assert abs(sum(fp8.losses[-5:]) - sum(bf16.losses[-5:])) / 5 < 0.3, (bf16.losses, fp8.losses)


def test_fp8_primary_weights_are_requantized_from_the_fp32_main_weights(
    cuda_world, transformer_engine, fp8_gpu
):
    from megatron.core.fp8_utils import is_float8tensor

    run = train_tiny_moe(
        cuda_world,
        steps=10,
        device="cuda",
        transformer_impl="transformer_engine",
        fp8_recipe="tensorwise",
        fp8_param=True,
    )
    assert all(math.isfinite(x) for x in run.losses), run.losses
    member = muon_member(run.optimizer)
    pairs = [
        (model_param, main_param)
        for model_group, main_group in zip(
            member.float16_groups, member.fp32_from_float16_groups, strict=True
        )
        for model_param, main_param in zip(model_group, main_group, strict=True)
        if is_float8tensor(model_param)
    ]
    assert pairs, "no Muon parameter is an FP8 tensor: fp8_param did not reach the TE layers"
    for model_param, main_param in pairs:
        assert main_param.dtype == torch.float32
        dequantized = model_param.dequantize().float()
        # e4m3 with a per-tensor scale: each weight within 2^-4 relative of its main copy, up to the scale's
        # resolution near zero.
        relative = torch.linalg.norm(dequantized - main_param) / torch.linalg.norm(main_param)
        assert relative.item() < 0.05, relative
