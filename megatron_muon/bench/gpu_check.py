"""The one-call device check on a single GPU (``tools/gpu_check.sh`` installs the carried wheels, then runs this).

Stages, each a subprocess with its own time limit inside one overall budget (default 8 minutes):

1. ``pytest tests/gpu`` (the GPU tests; Transformer Engine and FP8 ones skip with their reason where absent).
2. A bf16 world-1 training of a ~1B-class proxy of ``launch/configs/moe_1b_8gpu.yaml`` that fits one GPU: the same
   model (18 layers, hidden 1024, 64 experts top-8; 1.04 B parameters, 0.29 B active) at TP1·EP1 with
   ``transformer_impl=local`` (no Transformer Engine in the GPU image), mock data, 2 micro x 4 accumulation x 2048
   tokens = 16,384 tokens per step. Once with Muon (+ AdamW for embeddings, norms, router), once with AdamW alone.
   Reported from the trainer's TensorBoard scalars (medians after ``--warmup`` steps): tokens/s, MFU, peak
   allocated memory, the optimizer's share of the step (``time/optimizer_step_ms`` / ``time/iteration_ms``), and
   device→host syncs per step counted by torch's CUDA sync debug mode (``torch.cuda.set_sync_debug_mode``) around
   each ``train_step``: the synchronizing operations torch flags (``.item()``, ``.cpu()``, ``nonzero``, ...).
3. The Newton–Schulz GPU bench (``megatron_muon.bench.newton_schulz_gpu``: TFLOP/s against bf16 matmuls, FP8
   Newton–Schulz where the GPU has FP8).

Writes ``gpu_check.json`` (device, versions, every stage's status, seconds, output tail and figures) and
``gpu_check.md`` (the same as tables) under ``--out``.

    python -m megatron_muon.bench.gpu_check --out DIR [--budget-s 480] [--iters 12]
    python -m megatron_muon.bench.gpu_check train --optimizer muon --json FILE [--config C key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROXY_CONFIG = "launch/configs/moe_1b_8gpu.yaml"
PROXY_OVERRIDES = [
    "parallel.world_size=1",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.ep=1",
    "parallel.etp=1",
    "model.transformer_impl=local",  # no Transformer Engine in the GPU image
    "data.mock=true",
    "data.blend=[]",
    "data.tokenizer_path=null",
    "data.num_workers=0",
    "training.global_batch_size=8",  # 2 micro x 4 accumulation x 2048 tokens = 16,384 tokens per step
    "training.micro_batch_size=2",
    "optimizer.warmup_iters=1",
    "training.eval_interval=0",
    "checkpoint.save_dir=null",  # a 1 B model's checkpoint with optimizer state is ~17 GB: none
    "checkpoint.save_interval=0",
    "checkpoint.resume=none",
    "logging.log_interval=1",
]
SCALARS = {
    "tokens_per_s": "throughput/tokens_per_s",
    "mfu": "throughput/mfu",
    "iteration_ms": "time/iteration_ms",
    "optimizer_step_ms": "time/optimizer_step_ms",
    "max_allocated_mib": "memory/max_allocated_mib",
    "loss": "loss/train",
}
SYNC_WARNING = "called a synchronizing CUDA operation"
"""The text of the warning torch's sync debug mode (``"warn"``) gives for each device→host sync."""


# ------------------------------------------------------------------------------------------- one training run
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _count_syncs_per_step(counts: list[int]) -> None:
    """Wrap the trainer's ``train_step`` so that each call appends the syncs it made to ``counts`` (on a GPU; on
    the CPU there is no device→host sync to count and nothing is appended)."""
    import torch

    from megatron_muon.training import trainer as trainer_module

    step = trainer_module.train_step  # the name the trainer calls

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        if not torch.cuda.is_available():
            return step(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum(SYNC_WARNING in str(warning.message) for warning in caught))
        return result

    trainer_module.train_step = counted_step


def _read_scalars(tensorboard_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {
        name: [event.value for event in sorted(events.Scalars(tag), key=lambda event: event.step)]
        for name, tag in SCALARS.items()
        if tag in tags
    }


def train_and_measure(
    *, use_muon: bool, iters: int, warmup: int, config: str, overrides: list[str]
) -> dict[str, Any]:
    """Train ``config`` with ``overrides`` for ``iters`` steps in this process (world 1); the medians of the
    trainer's scalars over the steps after ``warmup``, the peak memory, and the syncs per step."""
    if iters <= warmup:
        raise ValueError(f"iters={iters} must exceed warmup={warmup}")
    from megatron_muon import pretrain

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    syncs: list[int] = []
    _count_syncs_per_step(syncs)
    with tempfile.TemporaryDirectory() as workdir:
        tensorboard_dir = Path(workdir) / "tb"
        status = pretrain.main(
            [
                config,
                *overrides,
                f"optimizer.use_muon={str(use_muon).lower()}",
                f"training.train_iters={iters}",
                f"logging.tensorboard_dir={tensorboard_dir}",
            ]
        )
        if status != 0:
            raise RuntimeError(f"training exited with status {status}")
        scalars = _read_scalars(tensorboard_dir)

    def median(name: str) -> float | None:
        values = [value for value in scalars.get(name, [])[warmup:] if value == value]  # NaN: not logged
        return statistics.median(values) if values else None

    iteration_ms, optimizer_ms = median("iteration_ms"), median("optimizer_step_ms")
    peak = scalars.get("max_allocated_mib")
    return {
        "optimizer": "muon" if use_muon else "adamw",
        "iters": iters,
        "warmup": warmup,
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "iteration_ms": iteration_ms,
        "optimizer_step_ms": optimizer_ms,
        "optimizer_share": None if not (iteration_ms and optimizer_ms) else optimizer_ms / iteration_ms,
        "peak_allocated_gib": max(peak) / 1024 if peak else None,
        "syncs_per_step": max(syncs[warmup:]) if syncs[warmup:] else None,
        "syncs_by_step": syncs,
        "losses": scalars.get("loss", []),
    }


# ------------------------------------------------------------------------------------------- the stages
def _run_stage(name: str, command: list[str], limit_s: float, env: dict[str, str]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, limit_s)
        )
        status, output = (
            ("ok" if result.returncode == 0 else f"failed ({result.returncode})"),
            (result.stdout + result.stderr),
        )
    except subprocess.TimeoutExpired as expired:
        status = f"timed out after {limit_s:.0f} s"
        output = "".join(
            part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
            for part in (expired.stdout, expired.stderr)
        )
    seconds = time.monotonic() - start
    print(f"gpu_check: {name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "status": status, "seconds": round(seconds, 1), "output_tail": output[-4000:]}


def _device_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    facts["cuda"] = torch.version.cuda
    facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for package in ("megatron.core", "transformer_engine", "triton"):
        try:
            module = __import__(package, fromlist=["__version__"])
            facts[package] = getattr(module, "__version__", "present")
        except ImportError:
            facts[package] = None
    return facts


def _markdown(record: dict[str, Any]) -> str:
    facts = record["facts"]
    lines = [
        f"# gpu_check on {facts['device']}",
        "",
        f"Python {facts['python']}, torch {facts['torch']} (CUDA {facts['cuda']}), megatron-core "
        f"{facts['megatron.core']}, Transformer Engine {facts['transformer_engine'] or 'absent'}, "
        f"triton {facts['triton']}. Budget {record['budget_s']:.0f} s, used {record['seconds']:.0f} s.",
        "",
        "| stage | status | seconds |",
        "|---|---|---:|",
        *(f"| {stage['name']} | {stage['status']} | {stage['seconds']:.0f} |" for stage in record["stages"]),
        "",
    ]
    runs = [run for run in record["training"] if run]
    if runs:
        lines += [
            f"Proxy of `{PROXY_CONFIG}` at world 1 (TP1·EP1, local spec, bf16, 16,384 tokens/step); medians after "
            "the warm-up steps.",
            "",
            "| optimizer | tokens/s | MFU | ms/step | optimizer ms (share) | peak GiB | syncs/step |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for run in runs:
            share = run["optimizer_share"]
            lines.append(
                f"| {run['optimizer']} | {_fmt(run['tokens_per_s'], '.0f')} | {_fmt(run['mfu'], '.1%')} | "
                f"{_fmt(run['iteration_ms'], '.0f')} | {_fmt(run['optimizer_step_ms'], '.0f')} "
                f"({_fmt(share, '.0%')}) | {_fmt(run['peak_allocated_gib'], '.1f')} | "
                f"{_fmt(run['syncs_per_step'], 'd')} |"
            )
    for stage in record["stages"]:
        lines += [
            "",
            f"## {stage['name']}: {stage['status']}",
            "",
            "```",
            stage["output_tail"][-2500:],
            "```",
        ]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def check(out: Path, *, budget_s: float, iters: int, warmup: int) -> int:
    """Run the stages within ``budget_s`` seconds; write ``gpu_check.json`` and ``gpu_check.md`` under ``out``.
    Exit status 0 when every stage passed, 1 otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ)
    python = sys.executable
    # Each stage's limit: its share of what is left, so that a slow stage cannot starve the rest entirely.
    plan: list[tuple[str, list[str], float]] = [
        (
            "pytest tests/gpu",
            [python, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"],
            0.30,
        ),
    ]
    for optimizer in ("muon", "adamw"):
        plan.append(
            (
                f"train {optimizer}",
                [python, "-m", "megatron_muon.bench.gpu_check", "train", "--optimizer", optimizer,
                 "--iters", str(iters), "--warmup", str(warmup), "--json", str(out / f"train_{optimizer}.json")],
                0.55 if optimizer == "muon" else 0.75,
            )
        )  # fmt: skip
    ns_markdown = out / "newton_schulz_gpu.md"
    plan.append(
        (
            "newton-schulz bench",
            [python, "-m", "megatron_muon.bench.newton_schulz_gpu", "--out", str(ns_markdown)],
            1.0,
        )
    )
    stages = []
    for name, command, share in plan:
        left = budget_s - (time.monotonic() - start)
        if left < 10:
            stages.append(
                {"name": name, "status": "not run (budget spent)", "seconds": 0.0, "output_tail": ""}
            )
            continue
        stages.append(_run_stage(name, command, left * share, env))
    training = []
    for optimizer in ("muon", "adamw"):
        path = out / f"train_{optimizer}.json"
        training.append(json.loads(path.read_text()) if path.exists() else None)
    record = {
        "facts": _device_facts(),
        "budget_s": budget_s,
        "seconds": round(time.monotonic() - start, 1),
        "stages": stages,
        "training": training,
    }
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gpu_check.md").write_text(_markdown(record))
    print(f"gpu_check: results in {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    return 0 if all(stage["status"] == "ok" for stage in stages) else 1


# ------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        parser = argparse.ArgumentParser(
            prog="gpu_check train", description="one proxy training run, measured"
        )
        parser.add_argument("--optimizer", choices=["muon", "adamw"], required=True)
        parser.add_argument("--iters", type=int, default=12)
        parser.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
        parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
        parser.add_argument("--config", default=PROXY_CONFIG, help="a config to train instead of the proxy")
        parser.add_argument("overrides", nargs="*", help="key=value, after the proxy's own")
        args = parser.parse_args(argv[1:])
        if args.iters <= args.warmup:
            parser.error(f"--iters={args.iters} must exceed --warmup={args.warmup}")
        figures = train_and_measure(
            use_muon=args.optimizer == "muon",
            iters=args.iters,
            warmup=args.warmup,
            config=args.config,
            overrides=[*PROXY_OVERRIDES, *args.overrides],
        )
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps({k: v for k, v in figures.items() if k not in ("losses", "syncs_by_step")}))
        return 0
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md"
    )
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="all stages together (default 8 minutes)"
    )
    parser.add_argument("--iters", type=int, default=12, help="training steps per optimizer")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s={args.budget_s} must be > 0")
    if args.iters <= args.warmup:
        parser.error(f"--iters={args.iters} must exceed --warmup={args.warmup}")
    return check(args.out, budget_s=args.budget_s, iters=args.iters, warmup=args.warmup)


if __name__ == "__main__":
    sys.exit(main())
