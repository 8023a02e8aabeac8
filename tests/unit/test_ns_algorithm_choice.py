"""``optimizer.muon.ns_algorithm``: the plan picks standard or Gram Newton–Schulz per logical matrix by FLOPs, the
step runs what the plan picked, and bad settings fail before launch with one line."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.config import ConfigError
from megatron_muon.config.checks import validate
from megatron_muon.ops.newton_schulz import newton_schulz, ns_algorithm_flops
from megatron_muon.optim.layout import whole_tensor_pieces
from megatron_muon.optim.muon import Muon
from megatron_muon.optim.options import MuonPlanSettings
from megatron_muon.optim.placement import MatrixPlacement
from megatron_muon.optim.plan import CostModel, build_muon_plan
from megatron_muon.training.metrics import muon_stats
from tests.unit.test_config import tiny
from tests.unit.test_plan import piece

NS_STEPS = 5
SHAPES = {"attention.proj": (64, 64), "mlp.fc1": (128, 32), "expert.fc2": (32, 160), "head_slice": (8, 64)}
EXPECTED = {"attention.proj": "standard", "mlp.fc1": "gram", "expert.fc2": "gram", "head_slice": "gram"}


def whole_matrix_plan(ns_algorithm: str = "auto", ranks: int = 2):
    records = [[piece(key, shape) for key, shape in SHAPES.items()] for _ in range(ranks)]
    return build_muon_plan(
        records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS, ns_algorithm=ns_algorithm)
    )


def test_auto_picks_gram_for_wide_and_tall_matrices_and_standard_for_square_ones():
    plan = whole_matrix_plan()
    assert {m.key: m.ns_algorithm for m in plan.matrices} == EXPECTED
    for matrix in plan.matrices:
        assert matrix.cost_flops == ns_algorithm_flops(*matrix.shape, NS_STEPS, matrix.ns_algorithm)
    # The owners' balance counts the FLOPs of the algorithm that runs.
    assert sum(plan.loads.values()) == sum(ns_algorithm_flops(*s, NS_STEPS, "auto") for s in SHAPES.values())


@pytest.mark.parametrize("forced", ["standard", "gram"])
def test_an_explicit_algorithm_applies_to_every_matrix(forced):
    plan = whole_matrix_plan(forced)
    assert {m.ns_algorithm for m in plan.matrices} == {forced}
    assert plan.fingerprint() != whole_matrix_plan().fingerprint()  # ranks disagreeing on it would be caught


def test_the_summary_and_the_metrics_give_the_share_of_matrices_and_flops_per_algorithm():
    plan = whole_matrix_plan()
    totals = plan.algorithm_totals()
    assert totals["gram"][0] == 3 and totals["standard"][0] == 1
    gram_share = totals["gram"][1] / (totals["gram"][1] + totals["standard"][1])
    assert f"NS algorithms gram 3 ({gram_share:.0%} of FLOPs), standard 1" in plan.summary()


def test_a_distributed_shard_decides_from_its_own_width():
    """(64, 1024) split in 4 along its long side: shards 64 x 256, Gram; split in 16: 64 x 64, standard."""
    for shards, expected in ((4, "gram"), (16, "standard")):
        records = [
            [piece("w", (64, 1024), shard_dim=1, num_shards=shards, shard_index=i)] for i in range(shards)
        ]
        plan = build_muon_plan(records, MuonPlanSettings(tp_mode="distributed", ns_steps=NS_STEPS))
        (matrix,) = plan.matrices
        assert matrix.ns_algorithm == expected
        assert plan.loads[0] == ns_algorithm_flops(64, 1024, NS_STEPS, expected, shards=shards)
        assert matrix.gram_all_reduces(NS_STEPS, (2,)) == (2 if expected == "gram" else NS_STEPS)


def test_the_cost_model_prices_gram_in_the_distributed_mode_with_fewer_all_reduces():
    model = CostModel(flops_per_s=1e12, bytes_per_s=1e10, latency_s=1e-3)
    args = ((256, 4096), 2, 2, True, NS_STEPS)
    standard = model.mode_costs(*args, ns_algorithm="standard")
    gram = model.mode_costs(*args, ns_algorithm="gram")
    auto = model.mode_costs(*args, ns_algorithm="auto")
    assert gram["distributed"] < standard["distributed"]
    assert gram["duplicated"] < standard["duplicated"]
    assert auto == gram
    gram_bytes = 256 * 256 * 4 * 2 * (1 / 2)
    latency_and_bytes = 2 * (gram_bytes / 1e10 + 1e-3)  # two segments, not five steps
    shard_flops = ns_algorithm_flops(256, 4096, NS_STEPS, "gram", shards=2)
    assert gram["distributed"] == pytest.approx(shard_flops / 1e12 + latency_and_bytes)


def test_unknown_algorithm_in_the_plan_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"ns_algorithm='fast'; valid: \['auto', 'standard', 'gram'\]"):
        whole_matrix_plan("fast")


# ---------------------------------------------------------------------------------------------------------
# The step runs what the plan picked


def run(ns_algorithm: str | None, steps: int = 2, **kwargs) -> tuple[list[torch.Tensor], Muon]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in SHAPES.values()]
    optimizer = Muon(params, lr=0.05, compute_dtype=torch.float32, ns_algorithm=ns_algorithm, **kwargs)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return [p.detach().clone() for p in params], optimizer


def test_auto_and_standard_give_the_same_update_and_gram_is_what_runs(monkeypatch):
    calls = []
    import megatron_muon.optim.muon as muon_module

    def recording(x, **kwargs):
        calls.append((tuple(x.shape[-2:]), kwargs["algorithm"]))
        return newton_schulz(x, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz", recording)
    auto, _ = run("auto", steps=1)
    assert sorted(calls) == sorted((s, EXPECTED[k]) for k, s in SHAPES.items())
    standard, _ = run("standard", steps=1)
    for a, s in zip(auto, standard, strict=True):
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)


def test_default_is_auto_and_fp8_steps_make_it_standard():
    _, optimizer = run(None, steps=0)
    assert optimizer.placement.settings.ns_algorithm == "auto"
    pieces = [whole_tensor_pieces("w", torch.zeros(8, 64))]
    assert (
        MatrixPlacement(pieces[0], MuonPlanSettings(ns_algorithm="gram")).plan.matrices[0].ns_algorithm
        == "gram"
    )


def test_a_given_placement_must_agree_with_ns_algorithm():
    param = torch.nn.Parameter(torch.zeros(8, 64))
    placement = MatrixPlacement(
        whole_tensor_pieces("group0.param0", param), MuonPlanSettings(ns_algorithm="standard")
    )
    with pytest.raises(ValueError, match="ns_algorithm='gram' but the placement's plan was built with"):
        Muon([param], lr=0.1, ns_algorithm="gram", placement=placement)
    Muon([param], lr=0.1, placement=placement)  # None: the plan decides


def test_restarts_reach_newton_schulz_and_bad_ones_fail_at_construction():
    _, optimizer = run("gram", steps=1, ns_gram_restarts=[1, 3])
    assert optimizer.newton_schulz.gram_restarts == (1, 3)
    with pytest.raises(ValueError, match=r"restarts=\[5\] with steps=5"):
        run("gram", steps=0, ns_gram_restarts=[5])


def test_tensorboard_stats_hold_the_shares():
    class Member:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    _, optimizer = run("auto", steps=1)
    stats = muon_stats(Member(optimizer))
    plan = optimizer.placement.plan
    totals = plan.algorithm_totals()
    assert stats["muon/ns_algorithm/gram_matrix_share"] == 3 / 4
    assert stats["muon/ns_algorithm/standard_matrix_share"] == 1 / 4
    flops = totals["gram"][1] + totals["standard"][1]
    assert stats["muon/ns_algorithm/gram_flop_share"] == pytest.approx(totals["gram"][1] / flops)


# ---------------------------------------------------------------------------------------------------------
# The run config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optimizer.muon.ns_algorithm=fast"],
            r"optimizer.muon.ns_algorithm='fast'; valid: \['auto', 'standard'",
        ),
        (
            ["optimizer.muon.ns_gram_restarts=[2,5]"],
            r"optimizer.muon.ns_gram_restarts: gram restarts=\[2, 5\] with steps=5: valid .* \[1, 4\]",
        ),
        (
            ["optimizer.muon.ns_steps=2"],
            r"optimizer.muon.ns_gram_restarts: gram restarts=\[2\] with steps=2",
        ),
        (
            ["optimizer.muon.ns_algorithm=gram", "optimizer.muon.ns_fp8_steps=1"],
            r"optimizer.muon.ns_algorithm='gram' cannot run muon.ns_fp8_steps=1",
        ),
    ],
)
def test_bad_settings_are_one_line_errors_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        validate(tiny(*overrides), 4)
    assert "\n" not in str(caught.value)


def test_the_config_default_is_auto_with_one_restart_after_step_two():
    muon = tiny().optimizer.muon
    assert muon.ns_algorithm == "auto" and list(muon.ns_gram_restarts) == [2]
    validate(tiny("optimizer.muon.ns_algorithm=gram", "optimizer.muon.ns_gram_restarts=[1,3]"), 4)
    assert tiny("optimizer.muon.ns_fp8_steps=1").optimizer.muon.planned_ns_algorithm == "standard"
