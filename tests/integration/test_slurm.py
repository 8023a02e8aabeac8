"""launch/pretrain_muon.sh under a real SLURM: a one-node cluster on this host (launch/slurm/start_local_cluster.sh:
munged, slurmctld, slurmd; installed with apt-get when missing, so it needs root), `sbatch` of the launcher
with the tiny config on 4 CPU tasks, and the time-limit path: USR1 to the batch shell (what the launcher's
`#SBATCH --signal=B:USR1@120` sends) makes the run save, requeue itself and finish from its checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"
TINY_CONFIG = "launch/configs/tiny_cpu.yaml"
ITERATION_LINE = re.compile(r"^ iteration\s+(\d+)/(\d+) \|", re.MULTILINE)
REQUEUE_GRACE_S = 10  # seconds between a requeue and forcing the job's next start (see wait_until_gone)
LOCAL_CLUSTER_DIR = "MEGATRON_MUON_TEST_SLURM_DIR"  # in the fixture's environment: where the daemons log
SIGNAL_EXIT_LINE = re.compile(r"exit requested by a signal: checkpoint saved at iteration (\d+)")
# A job's states before its end.
UNFINISHED_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory, launcher_env):
    """The environment of a running local cluster (SLURM_CONF set); the daemons stop when the module ends."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (and may apt-get install them)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    state_dir = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm" / "start_local_cluster.sh"), str(state_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        if start.returncode != 0 and "apt-get" in start.stderr:
            pytest.skip(f"cannot install SLURM: {start.stderr.strip().splitlines()[-1]}")
        assert start.returncode == 0, start.stdout + start.stderr
        yield {**launcher_env, "SLURM_CONF": str(state_dir / "slurm.conf"), LOCAL_CLUSTER_DIR: str(state_dir)}
    finally:
        subprocess.run(
            ["bash", str(REPO / "launch" / "slurm" / "stop_local_cluster.sh"), str(state_dir)],
            capture_output=True,
            timeout=120,
        )


def sbatch(env: dict[str, str], output: Path, *arguments: str, ntasks: int = 4) -> str:
    """Submit the launcher with the tiny config (world size 4) on `ntasks` tasks, more than the 2 cores
    (--overcommit); the job id."""
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--ntasks={ntasks}",
            "--overcommit",
            f"--output={output}",
            str(LAUNCHER),
            TINY_CONFIG,
            *arguments,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(env: dict[str, str], job: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (kept by slurmctld for MinJobAge = 30 s after the end); None when scontrol
    failed (slurmctld busy on 2 cores: "Socket timed out", "Zero Bytes were transmitted or received"), which says
    nothing about the job."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def node_idle(env: dict[str, str]) -> bool:
    """The one node has no job left on it, completing ones included."""
    states = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
    ).stdout.split()
    return states == ["idle"]


def daemon_logs(env: dict[str, str], lines: int = 40) -> str:
    """The last lines of slurmctld's and slurmd's logs, for a failure message."""
    parts = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = Path(env[LOCAL_CLUSTER_DIR]) / "log" / name
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(missing)"]
        parts.append(f"--- {name}\n" + "\n".join(text))
    return "\n".join(parts)


def wait_until_gone(env: dict[str, str], job: str, timeout: float) -> dict[str, str]:
    """Poll squeue until the job has left the queue (accounting is off: no sacct); its final fields."""
    deadline = time.monotonic() + timeout
    requeued_since = None
    while True:
        done = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True
        )
        queued = done.stdout.split()
        # A failed squeue (slurmctld busy: "Zero Bytes were transmitted or received") says nothing about the job;
        # only an answer without it means it has left the queue, and its fields must say it finished.
        if done.returncode == 0 and not queued:
            fields = job_fields(env, job)
            if fields is not None and fields.get("JobState") not in UNFINISHED_STATES:
                return fields
        # A requeued job waits ~2 minutes (BeginTime) before it may start again; let it start sooner, but not
        # within seconds of the requeue: slurmd revokes the first run's credential, and a relaunch issued in
        # the same second is refused ("Job credential revoked") and fails the job. Also wait for the node.
        if queued == ["PENDING", "BeginTime"]:
            requeued_since = requeued_since or time.monotonic()
            if time.monotonic() - requeued_since >= REQUEUE_GRACE_S and node_idle(env):
                subprocess.run(
                    ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True
                )
        assert time.monotonic() < deadline, f"job {job} still {queued} after {timeout} s"
        time.sleep(2)


def test_sbatch_trains_and_usr1_saves_requeues_and_resumes(slurm_env, tmp_path, shakespeare_data):
    """One job (each start of 4 processes costs ~25 s on 2 cores): srun starts the processes, they train, evaluate
    and save; USR1 makes the run save, requeue itself and finish from its checkpoint."""
    output, save_dir = tmp_path / "job.out", tmp_path / "checkpoints"
    train_iters = 8
    job = sbatch(
        slurm_env,
        output,
        f"training.train_iters={train_iters}",
        "optimizer.warmup_iters=1",
        f"training.eval_interval={train_iters}",
        "training.eval_iters=1",
        f"checkpoint.save_dir={save_dir}",
        "logging.log_interval=1",
    )
    deadline = time.monotonic() + 600
    while not (output.exists() and ITERATION_LINE.search(output.read_text())):
        fields = job_fields(slurm_env, job)
        if fields is not None:  # a failed scontrol is asked again
            assert fields.get("JobState") in ("PENDING", "RUNNING"), output.read_text()[-3000:]
        assert time.monotonic() < deadline, "no iteration after 600 s"
        time.sleep(1)
    # What `#SBATCH --signal=B:USR1@120` does two minutes before the time limit: USR1 to the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=60)
    fields = wait_until_gone(slurm_env, job, timeout=900)
    log = output.read_text()  # --open-mode=append: both runs of the job
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), (
        log[-3000:] + "\n" + daemon_logs(slurm_env)
    )
    assert fields.get("Restarts") == "1", fields
    port = 20000 + int(job) % 20000
    assert f"4 processes (cpu) with srun in SLURM job {job}" in log and f"MASTER_PORT={port}" in log
    assert "got SIGUSR1" in log
    stopped_at = int(SIGNAL_EXIT_LINE.search(log)[1])
    assert stopped_at < train_iters
    assert f"checkpoint at iteration {stopped_at} of {train_iters}: requeueing SLURM job {job}" in log
    assert f"loaded checkpoint {save_dir / f'iter_{stopped_at:07d}'} at iteration {stopped_at}" in log
    iterations = [int(i) for i, _ in ITERATION_LINE.findall(log)]
    assert iterations == list(range(1, train_iters + 1)), iterations  # each once: the second run resumed
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(train_iters)
    assert (save_dir / f"iter_{train_iters:07d}").is_dir()
    assert f"validation at iteration {train_iters}" in log
    assert log.rstrip().endswith("pretrain_muon.sh: done")


def test_task_count_other_than_the_world_size_is_refused(slurm_env, tmp_path, shakespeare_data):
    output, save_dir = tmp_path / "job.out", tmp_path / "checkpoints"
    job = sbatch(slurm_env, output, f"checkpoint.save_dir={save_dir}", ntasks=2)
    fields = wait_until_gone(slurm_env, job, timeout=300)
    log = output.read_text()
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("FAILED", "2:0"), log[-3000:]
    assert log.strip().splitlines() == [
        f"pretrain_muon.sh: error: SLURM job {job} has 2 tasks but parallel.world_size=4: submit with --ntasks=4 "
        "(or --nodes=N --ntasks-per-node=M with N x M = 4)"
    ]
    assert not save_dir.exists()
