"""Which checkpoint a run starts from, and what a resumed run does with settings that changed since the save.

Precedence (``docs/checkpoints.md``), so that a restart or a SLURM requeue never loses work:

1. The run's own newest intact checkpoint in ``checkpoint.save_dir`` — always, once one exists (a damaged latest
   one is passed over with a warning naming what is wrong; none intact is an error, never a silent fresh start).
2. Only when ``save_dir`` holds none: the explicit source — ``checkpoint.resume=<path>`` or, with
   ``resume=auto``, the latest checkpoint of ``checkpoint.load_dir`` — loaded with ``checkpoint.finetune`` as set.
   A damaged or missing explicit source is a one-line error.
3. Otherwise a fresh start. ``checkpoint.resume=none`` skips 1 and 2.

Intact means: complete structure and every file as its ``manifest.json`` lists it. A checkpoint without a
manifest is never chosen automatically; it is loaded only when ``checkpoint.resume=<path>`` names it, it is the
only candidate there (an ``iter_*`` directory, or a root holding just it) and ``save_dir`` holds nothing intact —
with a warning that its files cannot be checked. Naming one of ``save_dir``'s own directories that way is how a
run resumes from a checkpoint that lost its manifest.

Settings: every optimizer and schedule setting of the current config takes effect on resume (learning rates,
schedule, weight decay, betas, Muon momentum / Nesterov / scale / Newton–Schulz, QK-clip, NorMuon off); the trainer
logs each change. A change the saved state cannot serve is a one-line error: see :data:`CHANGES_THAT_CANNOT_RESUME`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CHANGES_THAT_CANNOT_RESUME",
    "ResumeSource",
    "SettingChange",
    "choose_resume_source",
    "explicit_resume_problem",
    "resume_setting_changes",
]

# (key, saved value, current value) → why the saved state cannot serve the current config; None: any change.
CHANGES_THAT_CANNOT_RESUME: dict[str, tuple[Any, Any, str]] = {
    "optimizer.use_muon": (
        None,
        None,
        "the checkpoint holds the other optimizer's state (Muon momentum vs AdamW moments for the hidden matrices)",
    ),
    "optimizer.muon.normuon": (
        False,
        True,
        "the checkpoint has no NorMuon second moments (turning NorMuon off on resume is allowed)",
    ),
}

# Sections whose changes are reported on resume: they configure the optimizer and its schedule.
_REPORTED_SECTIONS = ("optimizer", "training")


@dataclass(frozen=True, slots=True)
class SettingChange:
    """One setting of the reported sections whose value differs between the checkpoint's config and this run's."""

    key: str
    """Dotted path, e.g. ``optimizer.lr``."""
    saved: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.current!r}"


@dataclass(frozen=True, slots=True)
class ResumeSource:
    """Where a run starts from: ``path`` None is a fresh start; ``reason`` is the line the trainer logs."""

    path: Path | None
    finetune: bool
    own: bool
    reason: str
    manifest_required: bool = True
    """False only for an explicit ``checkpoint.resume`` that is the sole candidate (see the module docstring)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def resume_setting_changes(saved_yaml: str, current_yaml: str) -> list[SettingChange]:
    """The optimizer / training settings that differ between a checkpoint's ``config.yaml`` and this run's.

    Raises:
        ValueError: one line, for a change listed in :data:`CHANGES_THAT_CANNOT_RESUME`.
    """
    saved = _flatten(yaml.safe_load(saved_yaml) or {})
    current = _flatten(yaml.safe_load(current_yaml) or {})
    changes = [
        SettingChange(key, saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if key.split(".", 1)[0] in _REPORTED_SECTIONS and saved.get(key) != current.get(key)
    ]
    for change in changes:
        rule = CHANGES_THAT_CANNOT_RESUME.get(change.key)
        if rule is None:
            continue
        old, new, why = rule
        if (old is None or change.saved == old) and (new is None or change.current == new):
            raise ValueError(
                f"{change.key} changed from {change.saved!r} to {change.current!r} since the checkpoint was saved: "
                f"{why}; restore the setting, or start a run with another checkpoint.save_dir from these weights "
                "(checkpoint.resume=<path> checkpoint.finetune=true)"
            )
    return changes


def _holds_checkpoints(root: Path) -> bool:
    from megatron_muon.training.checkpoint_files import LATEST_MARKER, resume_candidates

    return (root / LATEST_MARKER).is_file() or bool(resume_candidates(root))


def _is_inside(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or one of its entries (symbolic links and ``..`` resolved)."""
    path, root = path.resolve(), root.resolve()
    return path == root or path.parent == root


def _is_sole_candidate(path: Path) -> bool:
    """``path`` names one checkpoint and nothing else: an ``iter_*`` directory (not a root), or a root holding
    exactly one checkpoint directory."""
    from megatron_muon.training.checkpoint_files import LATEST_MARKER, resume_candidates

    if not (path / LATEST_MARKER).is_file():
        return True
    return len([c for c in resume_candidates(path) if c.is_dir()]) == 1


def explicit_resume_problem(*, save_dir: str | None, resume: str) -> str | None:
    """One line when ``checkpoint.resume=<path>`` cannot be loaded and this run would need it (``save_dir`` holds
    no checkpoint of the run's own, which would take precedence); None otherwise. Looks at the file system only
    (no process group): the launcher calls it before any training process starts.
    """
    from megatron_muon.training.checkpoint_files import LATEST_MARKER, iteration_dir, read_marker

    if resume in ("auto", "none") or (save_dir and _holds_checkpoints(Path(save_dir))):
        return None
    path, valid = Path(resume), "auto, none, a checkpoint root or one of its iter_* directories"
    if not path.exists():
        return f"checkpoint.resume={resume!r} does not exist (valid: {valid})"
    if not path.is_dir():
        return f"checkpoint.resume={resume!r} is not a directory (valid: {valid})"
    if (path / LATEST_MARKER).is_file():
        try:
            iteration = read_marker(path)
        except ValueError as error:
            return f"checkpoint.resume={resume!r}: {error}"
        if iteration is not None and not iteration_dir(path, iteration).is_dir():
            return (
                f"checkpoint.resume={resume!r}: {LATEST_MARKER} names iteration {iteration} but "
                f"{iteration_dir(path, iteration)} does not exist"
            )
        return None
    if not ((path / "metadata.json").is_file() or (path / ".metadata").is_file()):
        return (
            f"checkpoint.resume={resume!r} is neither a checkpoint root (no {LATEST_MARKER}) nor a checkpoint "
            "directory (no metadata.json)"
        )
    return None


def choose_resume_source(
    *, save_dir: str | None, load_dir: str | None, resume: str, finetune: bool, warn: Callable[[str], None]
) -> ResumeSource:
    """Apply the precedence of the module docstring (collective: verifies the run's own checkpoints on every
    rank). ``warn(line)`` receives one line per damaged checkpoint passed over.

    Raises:
        CheckpointError: ``save_dir`` holds checkpoints but none is intact.
    """
    from megatron_muon.training.checkpoint import CheckpointError, select_resume_checkpoint

    explicit = resume not in ("auto", "none")
    nothing_yet = "no checkpoint of this run yet"
    if resume != "none" and save_dir:
        try:
            own, problems = select_resume_checkpoint(save_dir)
        except CheckpointError as error:
            # Nothing intact of the run's own: an explicit path into save_dir is the user's choice among them.
            if not (explicit and _is_inside(Path(resume), Path(save_dir))):
                raise
            warn(f"WARNING: {error}")
            own, problems, nothing_yet = None, [], "no intact checkpoint of this run"
        for problem in problems:
            warn(f"WARNING: passing over a damaged checkpoint: {problem}")
        if own is not None:
            others = []
            if resume not in ("auto", "none"):
                others.append(f"checkpoint.resume={resume}")
            elif load_dir and Path(load_dir) != Path(save_dir):
                others.append(f"checkpoint.load_dir={load_dir}")
            over = f"; it takes precedence over {others[0]}" if others else ""
            return ResumeSource(
                own,
                False,
                True,
                f"resuming from this run's own checkpoint {own} (checkpoint.save_dir holds one{over})",
            )
    if resume == "none":
        return ResumeSource(None, False, False, "checkpoint.resume=none: starting from scratch")
    weights = " (weights only: checkpoint.finetune=true)" if finetune else ""
    if explicit:
        return ResumeSource(
            Path(resume),
            finetune,
            False,
            f"{nothing_yet}: starting from checkpoint.resume={resume}{weights}",
            manifest_required=not _is_sole_candidate(Path(resume)),
        )
    if load_dir and Path(load_dir) != Path(save_dir or "") and _holds_checkpoints(Path(load_dir)):
        return ResumeSource(
            Path(load_dir),
            finetune,
            False,
            f"no checkpoint of this run yet: starting from the latest in checkpoint.load_dir={load_dir}{weights}",
        )
    where = f" in checkpoint.save_dir={save_dir}" if save_dir else ""
    return ResumeSource(None, False, False, f"no checkpoint{where}: starting from scratch")
