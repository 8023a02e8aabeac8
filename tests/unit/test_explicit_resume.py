"""The pre-launch check of an explicit ``checkpoint.resume=<path>`` (``training/resume.py``,
``explicit_resume_problem``): one line naming the value and what is valid, file system only, and no check when the
run's own checkpoints would take precedence (a requeued run whose source has gone)."""

from __future__ import annotations

from pathlib import Path

from megatron_muon.training import checkpoint_files as files
from megatron_muon.training.resume import explicit_resume_problem


def _checkpoint_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    return directory


def test_a_missing_or_foreign_resume_path_is_one_line(tmp_path):
    save_dir = str(tmp_path / "run")
    cases = {
        tmp_path
        / "nowhere": "does not exist (valid: auto, none, a checkpoint root or one of its iter_* directories)",
        tmp_path / "a_file": "is not a directory",
        tmp_path
        / "empty": "is neither a checkpoint root (no latest_checkpointed_iteration.txt) nor a checkpoint",
    }
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, expected in cases.items():
        problem = explicit_resume_problem(save_dir=save_dir, resume=str(path))
        assert problem is not None and "\n" not in problem, problem
        assert problem.startswith(f"checkpoint.resume={str(path)!r}") and expected in problem, problem

    root = tmp_path / "root"
    _checkpoint_dir(root / "iter_0000005")
    (root / files.LATEST_MARKER).write_text("9\n")
    problem = explicit_resume_problem(save_dir=save_dir, resume=str(root))
    assert problem is not None and "names iteration 9 but" in problem, problem
    (root / files.LATEST_MARKER).write_text("5\n")
    assert explicit_resume_problem(save_dir=save_dir, resume=str(root)) is None
    assert explicit_resume_problem(save_dir=save_dir, resume=str(root / "iter_0000005")) is None
    for keyword in ("auto", "none"):
        assert explicit_resume_problem(save_dir=save_dir, resume=keyword) is None


def test_the_runs_own_checkpoint_makes_the_explicit_source_irrelevant(tmp_path):
    save_dir = tmp_path / "run"
    _checkpoint_dir(save_dir / "iter_0000003")
    (save_dir / files.LATEST_MARKER).write_text("3\n")
    assert explicit_resume_problem(save_dir=str(save_dir), resume=str(tmp_path / "deleted_source")) is None
