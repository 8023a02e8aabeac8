"""launch/pretrain_muon.sh end to end on 4 CPU processes (torchrun, gloo, TP2·PP2·EP2) with the tiny config.

Two real runs are shared by most tests (each start-up costs ~30 s on 2 cores): a 20-iteration run stopped by
SIGTERM after its first iteration, then the same command again, which resumes from that checkpoint and
finishes (what a requeued SLURM job does). They also show that a default run prints the launcher's lines, the
iteration lines and real problems, not the known benign third-party warnings (megatron_muon/logging_setup.py);
``logging.verbose=true`` brings those back. Bad inputs stop in the launcher's checks before any training
process starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"
TINY_CONFIG = "launch/configs/tiny_cpu.yaml"
TRAIN_ITERS = 20

# Trainer log lines: " iteration      3/20 | consumed samples ... | lm loss 8.1928 | grad norm ...".
ITERATION_LINE = re.compile(r"^ iteration\s+(\d+)/(\d+) \|.*\| lm loss ([0-9.]+) \|", re.MULTILINE)
VALIDATION_LINE = re.compile(r"validation at iteration (\d+) \| lm loss ([0-9.]+)")
SIGNAL_EXIT_LINE = re.compile(r"exit requested by a signal: checkpoint saved at iteration (\d+)")
# Python warnings ("...: UserWarning: ...", "FutureWarning"), logging records at WARNING, and torch's glog-style
# "W1204 21:20:37.065000 ..." lines.
WARNING_LINE = re.compile(r"Warning\b|\bWARNING\b|^W\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def iteration_losses(log: str) -> dict[int, float]:
    """{iteration: training loss} from the trainer's log lines."""
    return {int(match[1]): float(match[3]) for match in ITERATION_LINE.finditer(log)}


def launch(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCHER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_arguments(save_dir: Path, tensorboard_dir: Path) -> list[str]:
    # 20 iterations x 16 sequences x 128 tokens; evaluation (1 batch) and saves at 10 and 20.
    return [
        TINY_CONFIG,
        f"training.train_iters={TRAIN_ITERS}",
        "optimizer.warmup_iters=2",
        "training.eval_interval=10",
        "training.eval_iters=1",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval=10",
        f"logging.tensorboard_dir={tensorboard_dir}",
        "logging.log_interval=1",
    ]


@dataclasses.dataclass
class InterruptedThenResumed:
    save_dir: Path
    tensorboard_dir: Path
    interrupted_log: str
    interrupted_status: int
    latest_after_interrupt: str  # latest_checkpointed_iteration.txt right after the SIGTERM run
    checkpoints_after_interrupt: list[str]
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_data, launcher_env) -> InterruptedThenResumed:
    root = tmp_path_factory.mktemp("launcher")
    save_dir, tensorboard_dir, log_path = root / "checkpoints", root / "tensorboard", root / "interrupted.log"
    arguments = run_arguments(save_dir, tensorboard_dir)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["bash", str(LAUNCHER), *arguments],
            cwd=REPO,
            env=launcher_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not ITERATION_LINE.search(log_path.read_text()):
            assert process.poll() is None, f"the launcher exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no iteration after 300 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # to the launcher only: it passes the signal on
        status = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    latest = save_dir / "latest_checkpointed_iteration.txt"
    interrupted = dict(
        interrupted_log=log_path.read_text(),
        interrupted_status=status,
        latest_after_interrupt=latest.read_text().strip() if latest.exists() else "",
        checkpoints_after_interrupt=sorted(p.name for p in save_dir.glob("iter_*")),
    )
    resumed = launch(launcher_env, *arguments, timeout=600)
    return InterruptedThenResumed(save_dir, tensorboard_dir, resumed=resumed, **interrupted)


def test_sigterm_saves_a_checkpoint_and_exits_0(runs):
    log = runs.interrupted_log
    assert runs.interrupted_status == 0, log[-3000:]
    assert "got SIGTERM" in log
    saved = SIGNAL_EXIT_LINE.search(log)
    assert saved, log[-3000:]
    iteration = int(saved[1])
    assert 1 <= iteration < TRAIN_ITERS
    assert max(iteration_losses(log)) == iteration  # it stopped there
    assert runs.checkpoints_after_interrupt == [f"iter_{iteration:07d}"]
    assert runs.latest_after_interrupt == str(iteration)


def test_rerun_resumes_from_the_checkpoint_and_finishes(runs):
    log = runs.resumed.stdout
    assert runs.resumed.returncode == 0, runs.resumed.stderr[-3000:] + log[-3000:]
    stopped_at = int(SIGNAL_EXIT_LINE.search(runs.interrupted_log)[1])
    own = runs.save_dir / f"iter_{stopped_at:07d}"
    assert f"resuming from this run's own checkpoint {own}" in log, log[-3000:]
    assert f"loaded checkpoint {own} at iteration {stopped_at}" in log
    iterations = sorted(iteration_losses(log))
    assert iterations == list(range(stopped_at + 1, TRAIN_ITERS + 1))
    assert (runs.save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert (runs.save_dir / f"iter_{TRAIN_ITERS:07d}").is_dir()
    # Both runs ended cleanly: each cleared its save_dir lock record, so the second took nothing over.
    assert "took over the save_dir lock" not in runs.interrupted_log + log
    assert (runs.save_dir / ".megatron_muon.lock").read_text() == ""


def test_loss_falls(runs):
    losses = iteration_losses(runs.interrupted_log) | iteration_losses(runs.resumed.stdout)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    # ln(4000) = 8.29 at the start; 20 steps of 2,048 tokens bring it well below.
    assert losses[TRAIN_ITERS] < losses[1] - 0.5, losses
    validation = {int(step): float(loss) for step, loss in VALIDATION_LINE.findall(runs.resumed.stdout)}
    assert sorted(validation) == [10, 20] and validation[20] < validation[10], validation


def warning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if WARNING_LINE.search(line)]


def test_a_default_run_prints_no_warning_lines(runs):
    # Start-up, model building, training, a signal and its save (validation: the interleaved run below); then
    # the resumed run's checkpoint load.
    assert not warning_lines(runs.interrupted_log), "\n".join(warning_lines(runs.interrupted_log))
    resumed = runs.resumed.stdout + runs.resumed.stderr
    assert "loaded checkpoint" in resumed, resumed[-3000:]
    assert not warning_lines(resumed), "\n".join(warning_lines(resumed))


@pytest.mark.extended  # the filter itself is tests/unit/test_logging_setup.py; this is the flag's plumbing
def test_verbose_brings_the_known_warnings_back(tmp_path, shakespeare_data, launcher_env):
    # One process is enough to show that the filters are off (and costs a quarter of the start-up).
    result = launch(
        launcher_env,
        TINY_CONFIG,
        *("parallel.world_size=1", "parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.etp=1"),
        "training.global_batch_size=2",
        "training.train_iters=1",
        "optimizer.warmup_iters=0",
        "training.eval_interval=1",
        "training.eval_iters=1",
        f"checkpoint.save_dir={tmp_path / 'checkpoints'}",
        "logging.log_interval=1",
        "logging.tensorboard_dir=null",
        "logging.verbose=true",
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert ITERATION_LINE.search(output) and "saved checkpoint" in output, output[-4000:]
    shown = warning_lines(output)
    # Megatron's import-time fallback notices (optimizer, clip_grads, norms: 4 or more) and its GPTModel record.
    assert sum("Apex" in line for line in shown) >= 4, "\n".join(shown)
    assert any("GPTModel IS DEPRECATED" in line for line in shown), "\n".join(shown)


def test_tensorboard_has_the_metrics(runs):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(runs.tensorboard_dir), size_guidance={SCALARS: 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "loss/train",
        "loss/validation",
        "loss/validation_perplexity",
        "optimizer/lr_muon",
        "optimizer/lr_adamw",
        "optimizer/grad_norm",
        "throughput/tokens_per_s",
        "time/iteration_ms",
        "time/optimizer_step_ms",
        "memory/rss_mib",
        "muon/ns_orthogonality_error",
    }
    assert expected <= tags, sorted(expected - tags)
    assert any(tag.startswith("muon/update_rms/") for tag in tags), sorted(tags)
    # QK-clip (on in the tiny config) logs every layer's largest attention logit, on every pipeline stage.
    assert {f"attention/max_logit/layer_{n:02d}" for n in range(1, 5)} <= tags, sorted(tags)
    assert all(0 < e.value < 100 for e in events.Scalars("attention/max_logit/layer_04"))
    # Expert loads of the MoE layers (2-4; layer 1 is dense): shares of 8 experts that add up to 1.
    shares = [events.Scalars(f"moe/expert_load/layer_03/expert_{e:02d}")[-1].value for e in range(8)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6) and min(shares) >= 0, shares
    imbalance = [e.value for e in events.Scalars("moe/load_imbalance/layer_02")]
    assert len(imbalance) == TRAIN_ITERS and all(1.0 <= v <= 4.0 for v in imbalance), imbalance
    assert not any(tag.startswith("moe/load_imbalance/layer_01") for tag in tags)
    # Both runs wrote to the directory: every iteration once, validation at 10 and 20.
    assert [event.step for event in events.Scalars("loss/train")] == list(range(1, TRAIN_ITERS + 1))
    assert [event.step for event in events.Scalars("loss/validation")] == [10, 20]


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, shakespeare_data, launcher_env):
    result = launch(
        launcher_env, *run_arguments(tmp_path / "checkpoints", tmp_path / "tensorboard"), "--dry-run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"train_iters: {TRAIN_ITERS}" in out  # the resolved config
    assert "world 4 = TP2 x PP2" in out  # its arithmetic
    assert "would start 4 processes (cpu) with torchrun --standalone" in out
    assert "torch.distributed.run --standalone --nproc-per-node 4 -m megatron_muon.pretrain" in out
    assert not ITERATION_LINE.search(out)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(path.relative_to(directory)): (
            path.stat().st_mtime_ns,
            path.read_bytes() if path.is_file() else b"",
        )
        for path in sorted(directory.rglob("*"))
    }


@pytest.mark.parametrize(
    "arguments, expected",
    [
        pytest.param(
            ["launch/configs/no_such.yaml"],
            "config file 'launch/configs/no_such.yaml' does not exist",
            id="missing-config",
        ),
        pytest.param([TINY_CONFIG, "model.hiden_size=64"], "model.hiden_size", id="unknown-key"),
        pytest.param([TINY_CONFIG, "parallel.tp=3"], "parallel.tp=3", id="invalid-layout"),
        pytest.param(
            [TINY_CONFIG, "data.blend=[{prefix: /nonexistent/corpus_text_document, weight: 1.0}]"],
            "/nonexistent/corpus_text_document",
            id="missing-data",
        ),
        pytest.param(
            [TINY_CONFIG, "model.vocab_size=1024"],
            "the tokenizer has 4000 tokens but model.vocab_size=1024",
            id="vocab-too-small",
        ),
        pytest.param(
            [TINY_CONFIG, "optimizer.distributed_optimizer=true", "optimizer.muon.tp_mode=duplicated"],
            "optimizer.distributed_optimizer=true cannot serve optimizer.muon.tp_mode=duplicated",
            id="distributed-optimizer-duplicated",
        ),
        pytest.param(
            [TINY_CONFIG, "data.blend.1.prefix=data/other"],
            "data.blend has 1 entry, so '1' is not an index of it (valid indices 0..0)",
            id="list-index-out-of-range",
        ),
    ],
)
def test_bad_input_is_one_line_and_touches_no_checkpoint(
    tmp_path, shakespeare_data, launcher_env, arguments, expected
):
    save_dir = tmp_path / "checkpoints"
    (save_dir / "iter_0000007").mkdir(parents=True)
    (save_dir / "iter_0000007" / "weights").write_bytes(b"earlier run")
    (save_dir / "latest_checkpointed_iteration.txt").write_text("7")
    before = snapshot(save_dir)

    result = launch(
        launcher_env,
        *arguments,
        f"checkpoint.save_dir={save_dir}",
        f"logging.tensorboard_dir={tmp_path / 'tb'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and expected in lines[0], result.stderr[-3000:]
    assert not ITERATION_LINE.search(result.stdout)
    assert snapshot(save_dir) == before
    assert not (tmp_path / "tb").exists()


def test_a_missing_resume_path_stops_before_any_process_starts(tmp_path, shakespeare_data, launcher_env):
    """checkpoint.resume=<path> that does not exist: one line from the pre-launch check (no torchrun, no rank);
    once the run has a checkpoint of its own (a requeue after the source went away) the path is not needed."""
    save_dir, missing = tmp_path / "checkpoints", tmp_path / "no_such_checkpoint"
    arguments = [TINY_CONFIG, f"checkpoint.save_dir={save_dir}", f"checkpoint.resume={missing}"]
    started = time.monotonic()
    result = launch(launcher_env, *arguments)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: checkpoint.resume={str(missing)!r} does not exist (valid: auto, none, a checkpoint root or one "
        "of its iter_* directories)"
    ), result.stderr[-3000:]
    assert "starting" not in result.stdout and not save_dir.exists(), result.stdout
    assert elapsed < 60, elapsed  # the check alone: the ranks' start-up was 35 s before it found the path

    (save_dir / "iter_0000004").mkdir(parents=True)  # the run's own checkpoint takes precedence
    (save_dir / "iter_0000004" / "metadata.json").write_text("{}")
    (save_dir / "latest_checkpointed_iteration.txt").write_text("4\n")
    planned = launch(launcher_env, *arguments, "data.blend.0.weight=2", "--dry-run")
    assert planned.returncode == 0 and "note: checkpoint.resume" not in planned.stdout, planned.stderr[-3000:]
    assert "weight: 2.0" in planned.stdout  # a list item overridden by index


@pytest.mark.extended  # interleaving is checked exactly in test_parallel_muon (pp2_vpp2_dp2), in CI
def test_interleaved_pipeline_trains_and_its_checkpoint_loads_without_interleaving(
    tmp_path, shakespeare_data, launcher_env
):
    """Virtual pipeline stages (PP2 x VPP2: one layer per model chunk, megatron's interleaved 1F1B) through the
    trainer, then the checkpoint resumed at plain PP2."""
    save_dir = tmp_path / "checkpoints"
    common = [
        TINY_CONFIG,
        "optimizer.warmup_iters=1",
        "training.eval_interval=3",
        "training.eval_iters=1",
        f"checkpoint.save_dir={save_dir}",
        f"logging.tensorboard_dir={tmp_path / 'tensorboard'}",
        "logging.log_interval=1",
    ]
    interleaved = launch(launcher_env, *common, "parallel.vpp=2", "training.train_iters=6")
    assert interleaved.returncode == 0, interleaved.stderr[-3000:] + interleaved.stdout[-3000:]
    losses = iteration_losses(interleaved.stdout)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.1, losses
    assert [int(step) for step, _ in VALIDATION_LINE.findall(interleaved.stdout)] == [3, 6]
    # No known benign warning in a run's validation and final save either (test_a_default_run_prints_no_warning_lines).
    shown = warning_lines(interleaved.stdout + interleaved.stderr)
    assert not shown, "\n".join(shown)

    plain = launch(launcher_env, *common, "training.train_iters=8")
    assert plain.returncode == 0, plain.stderr[-3000:] + plain.stdout[-3000:]
    assert f"loaded checkpoint {save_dir / 'iter_0000006'} at iteration 6" in plain.stdout
    resumed = iteration_losses(plain.stdout)
    assert sorted(resumed) == [7, 8] and resumed[7] < losses[1] - 0.1, resumed
