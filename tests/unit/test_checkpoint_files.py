"""The file-level guarantees of a checkpoint root (``training/checkpoint_files.py``) and the resume rules
(``training/resume.py``), on hand-made directories: publication, pruning by recency of publication, crash recovery,
the manifest, and which settings may change on resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_muon.training import checkpoint_files as files
from megatron_muon.training.resume import resume_setting_changes


def _staged(root: Path, iteration: int, payload: str = "shard") -> Path:
    """A complete staging directory for ``iteration`` as a save leaves it before publication."""
    staging = root / f"iter_{iteration:07d}.partial"
    staging.mkdir(parents=True)
    (staging / "__0_0.distcp").write_text(f"{payload} {iteration}")
    (staging / "metadata.json").write_text("{}")
    names = files.checkpoint_files(staging)
    files.write_manifest(staging, iteration, files.file_digests(staging, names))
    return staging


def _publish(root: Path, iteration: int, keep_last: int = 0, payload: str = "shard") -> None:
    files.publish(root, _staged(root, iteration, payload), iteration, keep_last)


def _iterations(root: Path) -> list[int]:
    return sorted(i for child in root.iterdir() if (i := files.iteration_of(child)) is not None)


def test_publish_marks_latest_and_logs_the_order(tmp_path):
    _publish(tmp_path, 10)
    _publish(tmp_path, 20)
    assert files.read_marker(tmp_path) == 20
    assert files.publication_order(tmp_path) == [10, 20]
    assert not list(tmp_path.glob("*.partial"))


def test_pruning_keeps_the_most_recently_published_not_the_highest_numbers(tmp_path):
    # A run restarted from iteration 10 publishes 15 after 20 and 30 exist (e.g. a fallback past damaged ones).
    for iteration in (10, 20, 30):
        _publish(tmp_path, iteration)
    _publish(tmp_path, 15, keep_last=2)
    assert files.read_marker(tmp_path) == 15
    assert _iterations(tmp_path) == [15, 30], "the checkpoint just published must survive its own pruning"
    assert files.publication_order(tmp_path) == [30, 15]


def test_pruning_never_deletes_the_marked_checkpoint(tmp_path):
    for iteration in (1, 2, 3):
        _publish(tmp_path, iteration)
    files.write_text_atomically(tmp_path / files.LATEST_MARKER, "1\n")
    deleted = files.prune(tmp_path, 1, just_published=3)
    assert deleted == [2] and _iterations(tmp_path) == [1, 3]


def test_resaving_an_iteration_replaces_it_and_keeps_the_marker_on_a_complete_checkpoint(
    tmp_path, monkeypatch
):
    _publish(tmp_path, 10)
    _publish(tmp_path, 20, payload="old")
    seen = []
    real_rename = os.rename

    def watching_rename(source, target):
        real_rename(source, target)
        marked = files.iteration_dir(tmp_path, files.read_marker(tmp_path))
        seen.append((Path(source).name, marked.name, (marked / files.MANIFEST_FILENAME).is_file()))

    monkeypatch.setattr(files.os, "rename", watching_rename)
    _publish(tmp_path, 20, payload="new")
    assert all(complete for _, _, complete in seen), seen  # after each rename the marker names a complete one
    assert seen[0][1] == "iter_0000010", "the marker moves off iteration 20 before it is moved aside"
    assert (tmp_path / "iter_0000020" / "__0_0.distcp").read_text() == "new 20"
    assert files.read_marker(tmp_path) == 20 and not list(tmp_path.glob("*.replaced"))


def test_recovery_restores_a_replaced_checkpoint_and_deletes_partial_saves(tmp_path):
    _publish(tmp_path, 20)
    os.rename(tmp_path / "iter_0000020", tmp_path / "iter_0000020.replaced")  # crash between the renames
    _staged(tmp_path, 30)  # crash before publication
    (tmp_path / ".latest_checkpointed_iteration.txt.tmp123").write_text("3")
    actions = files.recover_root(tmp_path)
    assert len(actions) == 3, actions
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000020",
        files.LATEST_MARKER,
        files.PUBLICATION_LOG,
    ]
    assert files.read_marker(tmp_path) == 20


def test_recovery_and_pruning_leave_foreign_entries_alone(tmp_path):
    """A save_dir shared with the user's files: only names the checkpoint code writes are ever touched."""
    foreign_dirs = ["notes.partial", "data.replaced", "iter_x", "iter_12.partial"]
    for name in foreign_dirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    foreign_files = [".mine.tmp", ".latest_checkpointed_iteration.txt.tmpfoo", "results.tmp"]
    for name in foreign_files:
        (tmp_path / name).write_text(name)
    _publish(tmp_path, 10)
    _publish(tmp_path, 20)
    _staged(tmp_path, 30)  # a crash before publication: ours, removed
    (tmp_path / ".publication_log.txt.tmp77").write_text("x")  # ours, removed
    actions = files.recover_root(tmp_path)
    files.prune(tmp_path, keep_last=1, just_published=20)
    for name in foreign_dirs:
        assert (tmp_path / name / "keep.txt").read_text() == name
    for name in foreign_files:
        assert (tmp_path / name).read_text() == name
    assert not (tmp_path / "iter_0000030.partial").exists()
    assert not (tmp_path / ".publication_log.txt.tmp77").exists()
    assert not (tmp_path / "iter_0000010").exists() and (tmp_path / "iter_0000020").is_dir()
    assert any("left alone 7 entries" in action for action in actions), actions


def test_resume_candidates_try_the_marker_then_recent_publications(tmp_path):
    for iteration in (30, 10, 20):
        _publish(tmp_path, iteration)
    files.write_text_atomically(tmp_path / files.LATEST_MARKER, "10\n")
    (tmp_path / "iter_0000040").mkdir()  # renamed into place, never marked or logged
    assert [files.iteration_of(p) for p in files.resume_candidates(tmp_path)] == [10, 20, 30, 40]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "__0_0.distcp").unlink(), "is missing"),
        (lambda d: (d / "__0_0.distcp").write_text("sha"), "bytes, the manifest says"),
        (lambda d: (d / "__0_0.distcp").write_text("shard X"), "corrupted"),
    ],
)
def test_manifest_detects_missing_truncated_and_corrupted_files(tmp_path, damage, expected):
    _publish(tmp_path, 1)
    directory = files.iteration_dir(tmp_path, 1)
    manifest = files.read_manifest(directory)
    assert files.verify_files(directory, manifest, sorted(manifest)) is None
    damage(directory)
    problem = files.verify_files(directory, manifest, sorted(manifest))
    assert problem is not None and expected in problem and "__0_0.distcp" in problem and "\n" not in problem


def test_a_setting_change_takes_effect_and_is_reported():
    saved = "optimizer:\n  lr: 0.003\n  muon:\n    momentum: 0.95\n    nesterov: true\nmodel:\n  seq_length: 128\n"
    now = (
        "optimizer:\n  lr: 0.001\n  muon:\n    momentum: 0.9\n    nesterov: true\nmodel:\n  seq_length: 128\n"
    )
    changes = {change.key: (change.saved, change.current) for change in resume_setting_changes(saved, now)}
    assert changes == {"optimizer.lr": (0.003, 0.001), "optimizer.muon.momentum": (0.95, 0.9)}


@pytest.mark.parametrize(
    ("saved", "now", "allowed"),
    [
        ("optimizer:\n  use_muon: true\n", "optimizer:\n  use_muon: false\n", False),
        ("optimizer:\n  muon:\n    normuon: false\n", "optimizer:\n  muon:\n    normuon: true\n", False),
        ("optimizer:\n  muon:\n    normuon: true\n", "optimizer:\n  muon:\n    normuon: false\n", True),
    ],
)
def test_a_change_the_saved_state_cannot_serve_is_a_one_line_error(saved, now, allowed):
    if allowed:
        assert resume_setting_changes(saved, now)
        return
    with pytest.raises(ValueError) as error:
        resume_setting_changes(saved, now)
    assert "\n" not in str(error.value) and "changed from" in str(error.value)


def test_fault_point_kills_only_at_the_named_point(tmp_path):
    code = "from megatron_muon.training.checkpoint_files import fault_point; fault_point('a'); fault_point('b'); print('survived')"
    survived = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MEGATRON_MUON_FAULT": "c"},
        capture_output=True,
        text=True,
    )
    killed = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MEGATRON_MUON_FAULT": "b"},
        capture_output=True,
        text=True,
    )
    assert survived.returncode == 0 and "survived" in survived.stdout
    assert killed.returncode == -9 and "survived" not in killed.stdout


@pytest.fixture
def own_checkpoints_verified_by_structure(monkeypatch):
    """``select_resume_checkpoint`` without processes: the first candidate with a manifest is intact."""
    from megatron_muon.training import checkpoint

    def select(root):
        candidates = files.resume_candidates(root)
        intact = [c for c in candidates if (c / files.MANIFEST_FILENAME).is_file()]
        return (intact[0] if intact else None), []

    monkeypatch.setattr(checkpoint, "select_resume_checkpoint", select)


@pytest.mark.parametrize(
    ("resume", "load_dir", "finetune"),
    [("auto", None, False), ("SOURCE", None, True), ("auto", "SOURCE", False), ("SOURCE", None, False)],
)
def test_the_runs_own_checkpoint_wins_over_an_explicit_source(
    tmp_path, own_checkpoints_verified_by_structure, resume, load_dir, finetune
):
    from megatron_muon.training.resume import choose_resume_source

    source, save_dir = tmp_path / "source", tmp_path / "run"
    _publish(source, 100)
    resume = str(source) if resume == "SOURCE" else resume
    load_dir = str(source) if load_dir == "SOURCE" else None
    kwargs = dict(save_dir=str(save_dir), load_dir=load_dir, resume=resume, finetune=finetune, warn=print)

    first = choose_resume_source(**kwargs)  # the run has nothing of its own yet
    if resume == "auto" and load_dir is None:
        assert first.path is None and "starting from scratch" in first.reason
    else:
        assert first.path == source and first.finetune == finetune and not first.own, first

    _publish(save_dir, 7)  # the run saved (then was requeued)
    again = choose_resume_source(**kwargs)
    assert again.path == files.iteration_dir(save_dir, 7) and again.own and not again.finetune, again
    if resume != "auto" or load_dir:
        assert "takes precedence over" in again.reason and str(source) in again.reason, again.reason


def test_resume_none_starts_from_scratch_even_with_own_checkpoints(
    tmp_path, own_checkpoints_verified_by_structure
):
    from megatron_muon.training.resume import choose_resume_source

    _publish(tmp_path, 3)
    chosen = choose_resume_source(
        save_dir=str(tmp_path), load_dir=None, resume="none", finetune=False, warn=print
    )
    assert chosen.path is None and "resume=none" in chosen.reason
