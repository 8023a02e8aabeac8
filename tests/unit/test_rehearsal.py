"""The fake-GPU rehearsal (``megatron_muon/rehearsal``): a rank of the default config built and trained on a fake
GPU with one host read per step, and the failures it exists to catch — a planted ``.item()`` in the step, a CPU
tensor handed to a collective, a CPU tensor meeting a CUDA one — plus its one-line refusals of bad input."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_muon.config import load_config, validate
from megatron_muon.rehearsal.backward import python_autograd
from megatron_muon.rehearsal.fake_gpu import fake_cuda_device
from megatron_muon.rehearsal.rank import rehearse_rank
from megatron_muon.training import grad_norm as grad_norm_module
from megatron_muon.training.host_values import read_on_host

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch" / "configs" / "tiny_cpu.yaml"


def _load(path: str, overrides: list[str]):
    cfg = load_config(path, overrides)
    return cfg, validate(cfg)


def _tiny():
    return _load(str(TINY), [])


def _rehearse_in_this_process(rank: int, distributed_optimizer: bool, plant: str | None, config=None):
    """Runs in a fresh interpreter (the CPU stand-ins other tests install are process-wide): one rehearsal of the
    default config (or ``config``: path and overrides), with a planted fault when asked."""
    cfg, dims = _tiny() if config is None else _load(*config)
    if plant is not None:
        original = grad_norm_module._sum_of_squares

        def planted(grads, group, device):
            if plant == "item":
                float(original(grads, group, device).sum())  # a host read per optimizer member and step
            else:
                dist.all_reduce(torch.zeros(1), group=group)  # a CPU tensor: NCCL would refuse it
            return original(grads, group, device)

        grad_norm_module._sum_of_squares = planted
    return rehearse_rank(cfg, dims, rank, distributed_optimizer=distributed_optimizer).to_json()


def _rehearse(rank: int, distributed_optimizer: bool, plant: str | None = None, config=None) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rehearse_in_this_process, (rank, distributed_optimizer, plant, config))


@pytest.mark.slow
def test_the_default_config_builds_and_steps_on_a_fake_gpu_with_one_host_read_per_step():
    # TP2·PP2·EP2 with sequence parallelism: megatron's torch norm asserts without the every-device fix.
    report = _rehearse(3, True)
    assert report["ok"], report["errors"]
    assert report["coordinates"]["pp"] == 1 and report["coordinates"]["tp"] == 1
    assert report["syncs_per_step"] == 1
    (site,) = report["sync_sites"]
    assert "training/host_values.py" in site and site.startswith("ours: read")
    assert 0 < report["static_memory_gib"] < 1


@pytest.mark.slow
def test_fsdp_builds_and_steps_on_a_fake_gpu_with_its_backward_hooks_and_one_host_read():
    """``parallel.fsdp`` at TP2·DP2 with EP2 (experts over expert-DP): FSDP2's all-gathers, its pre-backward
    hooks and its reduce-scatters run on the fake GPU; every sharded parameter gets its gradient (the rehearsal
    fails otherwise) and the step reads the host once."""
    overrides = ["parallel.fsdp=true", "parallel.pp=1", "parallel.ep=2"]
    report = _rehearse(3, False, config=(str(TINY), overrides))
    assert report["ok"], report["errors"]
    assert report["coordinates"]["dp"] == 1 and report["coordinates"]["edp"] == 1
    assert report["syncs_per_step"] == 1


@pytest.mark.slow
def test_a_planted_item_in_the_step_fails_the_rehearsal_and_names_where():
    report = _rehearse(0, False, plant="item")
    assert not report["ok"]
    assert report["syncs_per_step"] > 1  # the step's own read plus one per optimizer member's norm
    planted = [site for site in report["sync_sites"] if "tests/unit/test_rehearsal.py" in site]
    assert planted and all(site.startswith("ours: read") for site in planted), report["sync_sites"]
    assert any("host syncs in a steady-state step (allowed: 1)" in error for error in report["errors"])


@pytest.mark.slow
def test_a_cpu_tensor_in_a_collective_fails_the_rehearsal():
    report = _rehearse(0, False, plant="collective")
    assert not report["ok"]
    errors = report["errors"]
    assert any("cpu tensor" in e and "tests/unit/test_rehearsal.py" in e for e in errors), errors
    assert any("allreduce" in e and "NCCL takes CUDA tensors only" in e for e in errors)


@pytest.mark.slow
def test_a_rank_that_sends_nothing_of_its_own_sends_empty_buffers_on_the_gpu():
    """Kimi-K2 at 256 with two layers and the distributed optimizer: the last rank owns no Muon matrix, so its
    all-to-all sends are empty; they must live on the model's device (a CPU buffer was handed to the collective)."""
    kimi = str(REPO / "launch" / "configs" / "kimi_k2_1t.yaml")
    report = _rehearse(255, True, config=(kimi, ["model.num_layers=2", "parallel.world_size=256"]))
    assert report["ok"], report["errors"]
    assert report["syncs_per_step"] == 1


def test_the_rehearsal_refuses_a_process_with_the_cpu_stand_ins(monkeypatch):
    from megatron_muon.platform import cpu as cpu_stand_ins

    monkeypatch.setattr(cpu_stand_ins, "_stand_ins_active", True)
    cfg, dims = _tiny()
    with pytest.raises(RuntimeError, match="rehearse the GPU program in a fresh process"):
        rehearse_rank(cfg, dims, 0, distributed_optimizer=False)


def test_a_cpu_tensor_meeting_a_cuda_one_is_an_error():
    with fake_cuda_device() as mode, pytest.raises(Exception, match="cuda:0 and cpu"):
        torch.ones(2, device="cuda") + torch.ones(2)
    assert mode.syncs == []


def test_host_reads_are_counted_once_per_call_and_events_after_a_sync_are_free():
    with fake_cuda_device() as mode:
        x = torch.ones(4, device="cuda")
        x.tolist()  # one transfer of four values
        assert len(mode.syncs) == 1
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
        start.elapsed_time(end)  # waits: nothing synced since the end event
        assert len(mode.syncs) == 2
        end.record()
        float(x.sum())
        start.elapsed_time(end)  # the read above already waited for it
        assert [s.kind for s in mode.syncs] == ["read", "synchronize", "read"]


def test_read_on_host_reads_every_tensor_in_one_transfer():
    with fake_cuda_device() as mode:
        values = {
            "loss": torch.ones((), device="cuda"),
            "pair": torch.ones(2, device="cuda", dtype=torch.float64),
            "counts": torch.ones(2, 3, device="cuda", dtype=torch.int64),
            "known": 3.5,
            "absent": None,
        }
        read = read_on_host(values)
    assert len(mode.syncs) == 1
    assert list(read) == list(values)
    assert isinstance(read["loss"], float) and len(read["pair"]) == 2 and len(read["counts"]) == 6
    assert read["known"] == 3.5 and read["absent"] is None
    real = read_on_host({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3)})
    assert real == {"a": [1.0, 2.0], "b": 3.0}


def test_the_python_backward_equals_torchs_engine():
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor, y, unused):
            ctx.factor = factor
            ctx.save_for_backward(x, y)
            return x * factor, y * x

        @staticmethod
        def backward(ctx, grad_a, grad_b):
            x, y = ctx.saved_tensors
            return grad_a * ctx.factor + grad_b * y, None, grad_b * x, None

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x, y, z = torch.randn(4, 8), torch.randn(4, 8, requires_grad=True), torch.randn(3)
    seen: list[str] = []
    net[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append("hook"))

    def loss():
        h = net(x)  # a broadcast bias: its gradient is summed to its shape
        a, b = Scaled.apply(h, 3.0, y, z)
        return a.sum() + b.pow(2).sum() + h[:, :2].sum()  # h used twice: gradients add up

    loss().backward()
    expected = [p.grad.clone() for p in net.parameters()] + [y.grad.clone()]
    for tensor in [*net.parameters(), y]:
        tensor.grad = None
    with python_autograd():
        torch.autograd.backward(loss())
    got = [p.grad for p in net.parameters()] + [y.grad]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert seen == ["hook", "hook"]


def _cli(*args: str, tmp_path: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "rehearse_gpu.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path or REPO,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--world-size", "6"], "error: "),
        (["--ranks", "4"], "error: --ranks '4': rank 4 is outside the world of 4 ranks (valid: 0..3)"),
        (["--ranks", "x"], "error: --ranks 'x' is neither 'stages' nor a comma-separated list of ranks"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected):
    done = _cli(str(TINY), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.slow
def test_the_cli_writes_one_record_per_rank(tmp_path):
    out = tmp_path / "rehearsal.json"
    done = _cli(str(TINY), "--ranks", "0", "--distributed-optimizer", "off", "--json", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (record,) = json.loads(out.read_text())
    assert record["rank"] == 0 and record["ok"] and record["syncs_per_step"] == 1
    assert set(record) >= {"rank", "ok", "syncs_per_step", "sync_sites", "errors"}
    assert "1 of 1 rank rehearsals passed" in done.stdout
