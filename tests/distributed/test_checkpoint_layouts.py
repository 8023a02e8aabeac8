"""The same seed gives the same model at every layout, and a checkpoint saved at any layout continues at any other
(``megatron_muon/testing/reshard_matrix.py``). CI runs a covering subset: every layout saves once and loads once,
world 1 both ways; ``tools/checkpoint_reshard_matrix.py`` runs all 36 pairs."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing import run_distributed
from megatron_muon.testing.canonical import assemble
from megatron_muon.testing.reshard_matrix import LAYOUTS, SAVE_AT, load_and_continue, train_and_save

pytestmark = pytest.mark.slow

WORLD4 = [name for name, sizes in LAYOUTS.items() if sizes[0] == 4]
# Each layout saved from once and loaded into once; world 1 both ways.
CYCLE = ["w1", *WORLD4]
PAIRS = [(CYCLE[i], CYCLE[(i + 1) % len(CYCLE)]) for i in range(len(CYCLE))]
# fp32 throughout (Newton–Schulz included); layouts differ only in the order of floating-point sums.
LOSS_TOLERANCE = 1e-4


def _world4(root, fn, *args):
    return run_distributed(fn, 4, tp=2, pp=2, ep=2, etp=1, args=(root, *args), timeout_s=1500)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    world1 = run_distributed(train_and_save, 1, args=(root, ["w1"]), timeout_s=900)
    world4 = _world4(root, train_and_save, WORLD4)
    losses = {"w1": world1[0]["w1"][0], **{name: world4[0][name][0] for name in WORLD4}}
    initial = {"w1": assemble([world1[0]["w1"][1]])}
    for name in WORLD4:
        initial[name] = assemble([rank[name][1] for rank in world4])
    return root, losses, initial


def test_same_seed_same_initial_model_at_every_layout(saved):
    _, losses, initial = saved
    reference = initial["w1"]
    assert len(reference) > 20, sorted(reference)  # attention parts, dense and expert MLPs of 4 layers
    for name in WORLD4:
        assert sorted(initial[name]) == sorted(reference), name
        for key, matrix in reference.items():
            assert torch.equal(initial[name][key], matrix), f"{name}: initial {key} differs from world 1's"
    first = {name: values[0] for name, values in losses.items()}
    assert max(first.values()) - min(first.values()) <= 1e-5, f"iteration-1 losses differ: {first}"


def test_a_checkpoint_continues_at_another_layout_as_at_its_own(saved):
    root, losses, _ = saved
    world4_pairs = [pair for pair in PAIRS if LAYOUTS[pair[1]][0] == 4]
    world1_pairs = [pair for pair in PAIRS if LAYOUTS[pair[1]][0] == 1]
    resumed = _world4(root, load_and_continue, world4_pairs)[0]
    resumed |= run_distributed(load_and_continue, 1, args=(root, world1_pairs), timeout_s=900)[0]
    assert sorted(resumed) == sorted(PAIRS)
    for (source, target), values in resumed.items():
        own = losses[source][SAVE_AT:]
        worst = max(abs(a - b) for a, b in zip(values, own, strict=True))
        assert worst <= LOSS_TOLERANCE, f"{source} -> {target}: {values} vs the saving layout's own {own}"
