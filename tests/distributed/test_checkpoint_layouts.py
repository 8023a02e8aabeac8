"""The same seed gives the same model at every layout, and a checkpoint saved at any layout continues at any other
(``megatron_muon/testing/reshard_matrix.py``). CI runs a covering subset: every layout saves once and loads once,
world 1 both ways, plus the reported failures (a one-process checkpoint at TP2·PP2·EP2, DP4·EP4 and TP2·DP2), and
the distributed optimizer's checkpoints loaded without it and the other way round (``tp2_dp2_distopt``), and
FSDP's (``dp4_ep2_fsdp``: loads the distributed optimizer's, and world 1 loads its);
``tools/checkpoint_reshard_matrix.py`` runs every pair."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing.canonical import assemble
from megatron_muon.testing.reshard_matrix import LAYOUTS, SAVE_AT, run_layout_processes

pytestmark = pytest.mark.slow

# A cycle through every layout: each one loads the previous one's checkpoint, then saves its own.
CYCLE = list(LAYOUTS)  # w1 first
EXTRA_LOADS = {"dp4_ep4": ["w1"], "tp2_dp2": ["w1"]}
# fp32 throughout (Newton–Schulz included); layouts differ only in the order of floating-point sums.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    runs = {}
    for index, name in enumerate(CYCLE):
        loads = ([CYCLE[index - 1]] if index else []) + EXTRA_LOADS.get(name, [])
        runs[name] = run_layout_processes(root, name, loads, True)
    runs["w1 again"] = run_layout_processes(root, "w1", [CYCLE[-1], "tp2_dp2_distopt"], False)
    return runs


def test_same_seed_same_initial_model_at_every_layout(cycle):
    initial = {name: assemble([rank["initial"] for rank in cycle[name]]) for name in CYCLE}
    reference = initial["w1"]
    assert len(reference) > 20, sorted(reference)  # attention parts, dense and expert MLPs of 4 layers
    for name in CYCLE[1:]:
        assert sorted(initial[name]) == sorted(reference), name
        for key, matrix in reference.items():
            assert torch.equal(initial[name][key], matrix), f"{name}: initial {key} differs from world 1's"
    first = {name: cycle[name][0]["losses"][0] for name in CYCLE}
    assert max(first.values()) - min(first.values()) <= 1e-5, f"iteration-1 losses differ: {first}"


def test_a_checkpoint_continues_at_another_layout_as_at_its_own(cycle):
    pairs = []
    for name, per_rank in cycle.items():
        target = name.split()[0]
        for source, values in per_rank[0]["resumed"].items():
            own = cycle[source][0]["losses"][SAVE_AT:]
            worst = max(abs(a - b) for a, b in zip(values, own, strict=True))
            assert worst <= LOSS_TOLERANCE, f"{source} -> {target}: {values} vs the saving layout's own {own}"
            pairs.append((source, target))
    loaded_into = {target for _, target in pairs}
    saved_from = {source for source, _ in pairs}
    assert loaded_into == saved_from == set(LAYOUTS), pairs
    assert {("w1", "tp2_pp2_ep2"), ("w1", "dp4_ep4"), ("w1", "tp2_dp2")} <= set(pairs)
    # The distributed optimizer's checkpoints both ways, at another layout.
    assert {("tp2_etp2_ep2", "tp2_dp2_distopt"), ("tp2_dp2_distopt", "w1")} <= set(pairs)
    # FSDP's: from the distributed optimizer's, and into one process.
    assert {("tp2_dp2_distopt", "dp4_ep2_fsdp"), ("dp4_ep2_fsdp", "w1")} <= set(pairs)
