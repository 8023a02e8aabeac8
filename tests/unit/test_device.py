"""The device decision (``megatron_muon/platform/device.py``): a GPU per rank with NCCL when CUDA exists (mocked
here), the CPU with gloo and the CPU stand-ins otherwise; GPU-only options refused in one line before any process
group starts."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
import torch

from megatron_muon.config import ConfigError, load_config
from megatron_muon.platform import device as device_module
from megatron_muon.platform.device import Device

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stand_in_calls(monkeypatch) -> list[str]:
    """Records calls of the CPU stand-ins' installer instead of installing them ("forced": installed even where
    CUDA is available)."""
    calls: list[str] = []

    def install(*, force: bool = False) -> bool:
        calls.append("installed (forced)" if force else "installed")
        return True

    monkeypatch.setattr(device_module, "apply_cpu_stand_ins", install)
    monkeypatch.setattr(device_module, "_chosen", None)
    return calls


@pytest.fixture
def cuda_machine(monkeypatch) -> dict[str, list]:
    """A machine with 8 GPUs (an H200 each) as torch.cuda reports it; records set_device calls."""
    calls: dict[str, list] = {"set_device": []}
    monkeypatch.delenv(device_module.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls["set_device"].append(index))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: 3 * 2**30)
    return calls


@pytest.fixture
def cpu_machine(monkeypatch) -> None:
    monkeypatch.delenv(device_module.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_with_cuda_each_rank_takes_its_local_gpu_with_nccl_and_no_stand_ins(
    cuda_machine, stand_in_calls, monkeypatch
):
    monkeypatch.setenv("LOCAL_RANK", "3")
    chosen = device_module.choose_device()
    assert chosen == Device(type="cuda", index=3, backend="cpu:gloo,cuda:nccl")
    assert chosen.torch_device == torch.device("cuda", 3)
    assert not chosen.use_cpu_initialization  # megatron builds the model on the GPU

    joined: list[tuple[str, datetime.timedelta]] = []
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, timeout: joined.append((backend, timeout))
    )
    timeout = datetime.timedelta(minutes=5)
    assert device_module.start_this_rank(timeout=timeout) == chosen
    assert joined == [("cpu:gloo,cuda:nccl", timeout)]
    assert cuda_machine["set_device"] == [3]
    assert stand_in_calls == []
    assert device_module.chosen_device() == chosen


def test_without_cuda_it_is_the_cpu_with_gloo_and_the_stand_ins(cpu_machine, stand_in_calls, monkeypatch):
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("LOCAL_RANK", "3")  # irrelevant on the CPU
    chosen = device_module.choose_device()
    assert chosen == Device(type="cpu", index=None, backend="gloo")
    assert chosen.use_cpu_initialization and chosen.torch_device == torch.device("cpu")

    joined: list[str] = []
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, timeout: joined.append(backend)
    )
    device_module.start_this_rank(timeout=datetime.timedelta(minutes=1))
    assert joined == ["gloo"]
    assert stand_in_calls == ["installed (forced)"]
    assert threads == [2]


def test_a_local_rank_beyond_the_gpus_is_one_line(cuda_machine, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=8 has no GPU: this node has 8 \(start at most 8 "):
        device_module.choose_device()


def test_memory_and_peak_flops_come_from_the_chosen_gpu_and_are_absent_on_the_cpu(
    cuda_machine, stand_in_calls, monkeypatch
):
    device_module.use_device(Device(type="cuda", index=1, backend="cpu:gloo,cuda:nccl"))
    assert device_module.max_memory_allocated_mib() == 3 * 1024
    assert device_module.peak_flops() == 989e12  # H200, dense bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Some Future GPU")
    assert device_module.peak_flops() is None  # unknown: no MFU rather than a wrong one

    monkeypatch.setattr(device_module, "_chosen", Device(type="cpu"))
    assert device_module.max_memory_allocated_mib() is None
    assert device_module.peak_flops() is None


def test_the_model_is_built_where_the_device_says(monkeypatch):
    from megatron_muon.config import validate
    from megatron_muon.training.megatron_configs import transformer_config

    cfg = load_config(None, ["data.mock=true"])
    dims = validate(cfg, 1)
    on_cpu = transformer_config(cfg, dims, Device(type="cpu"))
    on_gpu = transformer_config(cfg, dims, Device(type="cuda", index=0, backend="cpu:gloo,cuda:nccl"))
    assert on_cpu.use_cpu_initialization is True
    assert on_gpu.use_cpu_initialization is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.transformer_impl=transformer_engine"],
            r"^model\.transformer_impl='transformer_engine' needs a CUDA GPU \(torch\.cuda\.is_available\(\) is False\)$",
        ),
        (
            ["model.fp8=delayed", "model.precision=bf16", "model.transformer_impl=transformer_engine"],
            r"^model\.transformer_impl='transformer_engine' needs a CUDA GPU",
        ),
    ],
)
def test_gpu_only_options_on_the_cpu_are_one_line(cpu_machine, overrides, message):
    cfg = load_config(None, ["data.mock=true", *overrides])
    with pytest.raises(ConfigError, match=message) as error:
        device_module.require_device_for(cfg, Device(type="cpu"))
    assert "\n" not in str(error.value)


def test_fp8_gemms_need_a_gpu_even_when_the_engine_check_passes():
    cfg = load_config(None, ["data.mock=true", "model.fp8=current", "model.precision=bf16"])
    cfg.model.transformer_impl = (
        "local"  # validation refuses this pair; the device check must refuse it alone too
    )
    with pytest.raises(ConfigError, match=r"^model\.fp8='current' \(FP8 GEMMs .*\) needs a CUDA GPU"):
        device_module.require_device_for(cfg, Device(type="cpu"))


def test_transformer_engine_missing_on_a_gpu_machine_is_one_line(cuda_machine, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformer_engine(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise ImportError("No module named 'transformer_engine'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformer_engine)
    cfg = load_config(None, ["data.mock=true", "model.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match=r"needs Transformer Engine, not importable here \(No module named"):
        device_module.require_device_for(cfg, Device(type="cuda", index=0, backend="cpu:gloo,cuda:nccl"))


def test_fp8_newton_schulz_where_the_device_has_no_fp8_kernel_is_one_line(monkeypatch):
    import megatron_muon.ops.newton_schulz_fp8 as fp8

    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda device: f"no e4m3 GEMM on {device}")
    cfg = load_config(None, ["data.mock=true", "optimizer.muon.ns_fp8_steps=1"])
    with pytest.raises(
        ConfigError, match=r"^optimizer\.muon\.ns_fp8_steps=1 cannot run on CPU \(gloo\): no e4m3"
    ):
        device_module.require_device_for(cfg, Device(type="cpu"))
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda device: None)
    device_module.require_device_for(cfg, Device(type="cpu"))  # where the kernel exists it runs


def test_pretrain_refuses_a_gpu_only_option_before_any_process_group(cpu_machine, monkeypatch, capsys):
    from megatron_muon import pretrain

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started for a config that cannot run here")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_process_group)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    status = pretrain.main(
        [str(REPO / "launch/configs/tiny_cpu.yaml"), "parallel.world_size=1", "parallel.tp=1", "parallel.pp=1",
         "parallel.ep=1", "parallel.etp=1", "data.mock=true", "data.blend=[]", "data.tokenizer_path=null",
         "model.transformer_impl=transformer_engine"]
    )  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: model.transformer_impl='transformer_engine' needs a CUDA GPU (torch.cuda.is_available() is False)"
    ]


# Production callers of apply_cpu_stand_ins besides platform.device, and why.
OTHER_INSTALLERS = {
    # The meta-device build of a flagship model on a CPU machine: it needs the torch-norm fix for sequence
    # parallelism (every device) and the hardware stand-ins (CUDA streams in TransformerLayer) on a CPU machine,
    # and makes its own (meta) device decision; it never trains.
    "megatron_muon/planning/meta_build.py",
}


def test_only_the_device_module_installs_the_stand_ins_in_production_code():
    callers = []
    for path in sorted((REPO / "megatron_muon").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if (
            relative.startswith(("megatron_muon/platform/", "megatron_muon/testing/"))
            or relative in OTHER_INSTALLERS
        ):
            continue  # the module itself, and the test harness (CPU by construction)
        if re.search(r"\bapply_cpu_stand_ins\s*\(", path.read_text()):
            callers.append(relative)
    assert callers == [], (
        f"production code installs the CPU stand-ins itself instead of platform.device: {callers}"
    )


def test_pretrain_on_a_cuda_machine_joins_nccl_from_its_local_gpu(cuda_machine, stand_in_calls, monkeypatch):
    from megatron_muon import pretrain
    from megatron_muon.config import validate

    class Joined(Exception):
        """Stops the run where the process group would start."""

    joined: list[str] = []

    def join(backend, timeout):
        joined.append(backend)
        raise Joined

    monkeypatch.setattr(torch.distributed, "init_process_group", join)
    monkeypatch.setenv("LOCAL_RANK", "5")
    cfg = load_config(None, ["data.mock=true"])
    with pytest.raises(Joined):
        pretrain._run(cfg, validate(cfg, 1))
    assert cuda_machine["set_device"] == [5] and joined == ["cpu:gloo,cuda:nccl"]
    assert stand_in_calls == []


# MEGATRON_MUON_DEVICE: CPU ranks on a GPU machine (the test harness, the launcher tests), a GPU insisted on.


def test_the_cpu_override_takes_the_cpu_and_its_stand_ins_where_cuda_exists(
    cuda_machine, stand_in_calls, monkeypatch
):
    monkeypatch.setenv("MEGATRON_MUON_DEVICE", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "9")  # beyond the 8 GPUs: irrelevant on the CPU
    chosen = device_module.choose_device()
    assert chosen == Device(type="cpu", index=None, backend="gloo")
    assert device_module.chosen_device() == chosen  # before use_device too
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    device_module.use_device(chosen)
    assert stand_in_calls == ["installed (forced)"]  # an unforced install is a no-op where CUDA is available
    assert cuda_machine["set_device"] == []
    assert device_module.max_memory_allocated_mib() is None and device_module.peak_flops() is None


def test_the_cpu_override_plans_with_the_cpu_cost_model(cuda_machine, stand_in_calls, monkeypatch):
    from megatron_muon.optim.plan import CostModel

    assert CostModel.for_this_machine() == CostModel()  # the GPU defaults
    monkeypatch.setenv("MEGATRON_MUON_DEVICE", "cpu")
    assert CostModel.for_this_machine() == CostModel(flops_per_s=2e10, bytes_per_s=1e9, latency_s=1e-4)


def test_the_cpu_override_is_named_in_the_gpu_only_refusal(cuda_machine, monkeypatch):
    monkeypatch.setenv("MEGATRON_MUON_DEVICE", "cpu")
    cfg = load_config(None, ["data.mock=true", "model.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match=r"^model\.transformer_impl='transformer_engine' needs a CUDA GPU "
                       r"\(MEGATRON_MUON_DEVICE=cpu\)$"):  # fmt: skip
        device_module.require_device_for(cfg, device_module.choose_device())


@pytest.mark.parametrize(
    ("value", "machine", "message"),
    [
        (
            "gpu",
            "cuda_machine",
            r"^MEGATRON_MUON_DEVICE='gpu' is not a device choice; valid: auto, cpu, cuda$",
        ),
        (
            "cuda",
            "cpu_machine",
            r"^MEGATRON_MUON_DEVICE=cuda but torch\.cuda\.is_available\(\) is False on this",
        ),
    ],
)
def test_a_bad_device_override_is_one_line(value, machine, message, request, monkeypatch):
    request.getfixturevalue(machine)
    monkeypatch.setenv("MEGATRON_MUON_DEVICE", value)
    with pytest.raises(ValueError, match=message):
        device_module.choose_device()


@pytest.mark.parametrize("value", ["cuda", "auto", ""])
def test_auto_and_cuda_take_the_local_gpu(cuda_machine, monkeypatch, value):
    monkeypatch.setenv("MEGATRON_MUON_DEVICE", value)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert device_module.choose_device() == Device(type="cuda", index=2, backend="cpu:gloo,cuda:nccl")


def test_the_test_harness_ranks_are_cpu_ranks_with_the_stand_ins_forced_on_a_cuda_machine(
    cuda_machine, stand_in_calls, monkeypatch
):
    """run_distributed's rank set-up where CUDA is available: the CPU stand-ins forced on, the CPU chosen for the
    rank and for any process it starts, gloo; no GPU selected."""
    from megatron.core import parallel_state

    from megatron_muon.testing import multiprocess

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "restored after the test")
    monkeypatch.delenv("MEGATRON_MUON_DEVICE", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    joined: list[str] = []
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kwargs: joined.append(backend)
    )
    layouts: list[dict] = []
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **sizes: layouts.append(sizes))
    sizes = multiprocess.ParallelSizes(tp=2, pp=1, ep=1, etp=None, vpp=None)
    multiprocess._initialize_rank(3, 4, 12345, sizes, 60.0)

    assert stand_in_calls == ["installed (forced)"]
    assert joined == ["gloo"] and layouts[0]["tensor_model_parallel_size"] == 2
    assert device_module.chosen_device() == Device(type="cpu")
    assert device_module.choose_device() == Device(type="cpu")  # LOCAL_RANK=3: no crash for want of a GPU
    assert cuda_machine["set_device"] == []
