"""The files of a checkpoint root: naming, publication, pruning, integrity and crash recovery.

Plain filesystem code (no torch.distributed): :mod:`megatron_muon.training.checkpoint` calls it from rank 0 or
splits the hashing over ranks. A checkpoint root holds::

    iter_0000010/                      one complete checkpoint (megatron dist_checkpointing torch_dist files,
        metadata.json  .metadata         config.yaml, and manifest.json: the size and SHA-256 of every other file)
        common.pt  __0_0.distcp …  config.yaml  manifest.json
    iter_0000020/
    latest_checkpointed_iteration.txt  the iteration auto-resume starts from ("20"), as megatron-LM's
    publication_log.txt                the published iterations, oldest publication first (one per line)
    .megatron_muon.lock                the launcher's lock: one run per save_dir (``training/lifetime.py``)

Guarantees (``docs/checkpoints.md`` has the table of crash points):

* A checkpoint is written to ``iter_N.partial/`` and renamed into place only when every rank's shards, the config
  and the manifest are on disk; the marker is replaced (tmp file + ``os.replace``) only after that.
* Saving an iteration that already exists first points the marker at another complete checkpoint, then moves
  the old directory aside (``iter_N.replaced``); :func:`recover_root` puts it back if a crash left no ``iter_N``.
* Pruning keeps the ``keep_last`` most recently *published* checkpoints (the log's order, not iteration
  numbers), and never the one just published nor the one the marker names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CONFIG_FILENAME",
    "LATEST_MARKER",
    "MANIFEST_FILENAME",
    "PUBLICATION_LOG",
    "checkpoint_files",
    "fault_point",
    "file_digests",
    "iteration_dir",
    "iteration_of",
    "publication_order",
    "prune",
    "publish",
    "read_marker",
    "recover_root",
    "resume_candidates",
    "verify_files",
    "write_manifest",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)

LATEST_MARKER = "latest_checkpointed_iteration.txt"
PUBLICATION_LOG = "publication_log.txt"
CONFIG_FILENAME = "config.yaml"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_VERSION = 1
SAVE_DIR_LOCK = ".megatron_muon.lock"  # lifetime.LOCK_FILENAME: the launcher's one-run-per-save_dir lock
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
_ITERATION_DIR_RE = re.compile(r"^iter_(\d{7,})$")
_HASH_CHUNK = 8 << 20


def fault_point(name: str, iteration: int | None = None) -> None:
    """Test hook: ``MEGATRON_MUON_FAULT=<name>`` or ``<name>@<iteration>`` kills this process with SIGKILL when it
    reaches the named point (of that iteration's save or step). The fault-injection tests place crashes with it;
    a no-op unless the variable names this point."""
    wanted = os.environ.get("MEGATRON_MUON_FAULT")
    if not wanted:
        return
    point, _, at = wanted.partition("@")
    if point == name and (not at or (iteration is not None and int(at) == iteration)):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# Names.
# ---------------------------------------------------------------------------------------------------


def iteration_dir(root: str | os.PathLike[str], iteration: int) -> Path:
    """``root/iter_0000010`` for ``iteration=10``."""
    if iteration < 0:
        raise ValueError(f"iteration={iteration} must be >= 0")
    return Path(root) / f"iter_{iteration:07d}"


def iteration_of(directory: Path) -> int | None:
    """10 for ``…/iter_0000010``; None for any other name."""
    match = _ITERATION_DIR_RE.match(directory.name)
    return int(match.group(1)) if match else None


def _iteration_dirs(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    return {
        iteration: child
        for child in root.iterdir()
        if child.is_dir() and (iteration := iteration_of(child)) is not None
    }


def read_marker(root: str | os.PathLike[str]) -> int | None:
    """The iteration ``root``'s marker names; None without a marker.

    Raises:
        ValueError: the marker holds something other than an iteration number.
    """
    marker = Path(root) / LATEST_MARKER
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}; expected an iteration number")
    return int(text)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publication_order(root: str | os.PathLike[str]) -> list[int]:
    """Published iterations of ``root``, oldest publication first (an iteration published twice counts at its
    last publication)."""
    log = Path(root) / PUBLICATION_LOG
    if not log.is_file():
        return []
    order: list[int] = []
    for line in log.read_text().split():
        if line.isdigit():
            iteration = int(line)
            if iteration in order:
                order.remove(iteration)
            order.append(iteration)
    return order


def _record_publication(root: Path, iteration: int) -> None:
    order = [i for i in publication_order(root) if i != iteration and iteration_dir(root, i).is_dir()]
    order.append(iteration)
    write_text_atomically(root / PUBLICATION_LOG, "".join(f"{i}\n" for i in order))


# ---------------------------------------------------------------------------------------------------
# Integrity: a manifest of sizes and SHA-256 digests.
# ---------------------------------------------------------------------------------------------------


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory the manifest covers (relative paths, sorted): all but the manifest."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST_FILENAME
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"size": bytes, "sha256": hex}}`` of ``names`` under ``directory``."""
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in names
    }


def write_manifest(directory: Path, iteration: int, digests: dict[str, dict[str, int | str]]) -> None:
    """``directory/manifest.json`` listing ``digests`` (written last into a staging directory)."""
    manifest = {"version": MANIFEST_VERSION, "iteration": iteration, "files": dict(sorted(digests.items()))}
    write_text_atomically(directory / MANIFEST_FILENAME, json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: Path) -> dict[str, dict[str, int | str]] | None:
    """The ``files`` of ``directory``'s manifest; None when the checkpoint has none (saved before manifests).

    Raises:
        ValueError: the manifest is unreadable.
    """
    path = directory / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {error})") from error
    return files


def verify_files(
    directory: Path, expected: dict[str, dict[str, int | str]], names: Iterable[str]
) -> str | None:
    """Check ``names`` (a subset of the manifest's files) against ``expected``: present, same size, same digest.
    Returns one line naming the first bad file, or None."""
    for name in names:
        path = directory / name
        entry = expected[name]
        if not path.is_file():
            return f"checkpoint {directory}: file {name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"checkpoint {directory}: file {name} has {size} bytes, the manifest says {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"checkpoint {directory}: file {name} is corrupted (SHA-256 differs from the manifest)"
    return None


# ---------------------------------------------------------------------------------------------------
# Publication, pruning, recovery (rank 0).
# ---------------------------------------------------------------------------------------------------


def _newest_other_checkpoint(root: Path, excluded: int) -> int | None:
    """The most recently published complete checkpoint other than ``excluded`` (has its manifest)."""
    for iteration in reversed(publication_order(root)):
        directory = iteration_dir(root, iteration)
        if iteration != excluded and (directory / MANIFEST_FILENAME).is_file():
            return iteration
    return None


def publish(root: Path, staging: Path, iteration: int, keep_last: int) -> None:
    """Move the complete ``staging`` directory to ``root/iter_<iteration>``, mark it latest, prune.

    Every step leaves the marker naming a complete checkpoint (or, between the two renames of a same-iteration
    re-save with no other checkpoint to point at, a state :func:`recover_root` repairs)."""
    final = iteration_dir(root, iteration)
    replaced = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():
        try:
            marked = read_marker(root)
        except ValueError:  # an unreadable marker is replaced below anyway
            marked = None
        if marked == iteration:
            other = _newest_other_checkpoint(root, excluded=iteration)
            if other is not None:
                write_text_atomically(root / LATEST_MARKER, f"{other}\n")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        fault_point("between_renames", iteration)
    os.rename(staging, final)
    _fsync_directory(root)
    fault_point("after_rename", iteration)
    _record_publication(root, iteration)
    write_text_atomically(root / LATEST_MARKER, f"{iteration}\n")
    fault_point("after_marker", iteration)
    shutil.rmtree(replaced, ignore_errors=True)
    prune(root, keep_last, just_published=iteration)


def prune(root: Path, keep_last: int, *, just_published: int) -> list[int]:
    """Delete all but the ``keep_last`` most recently published checkpoints (0: keep all); return what went.

    Directories that were never published (no log entry: a crash before the marker, or an older layout of the
    root) count as older than every published one. Never deletes ``just_published`` or the marker's target."""
    if keep_last <= 0:
        return []
    directories = _iteration_dirs(root)
    order = [i for i in publication_order(root) if i in directories]
    unlisted = sorted(i for i in directories if i not in order)
    by_recency = list(reversed(unlisted + order))  # newest publication first
    protected = {just_published, read_marker(root)}
    kept = [i for i in by_recency if i in protected]
    for iteration in by_recency:
        if len(kept) >= keep_last:
            break
        if iteration not in kept:
            kept.append(iteration)
    deleted = [i for i in by_recency if i not in kept]
    for iteration in deleted:
        shutil.rmtree(directories[iteration])
        logger.info("Deleted checkpoint %s (checkpoint.keep_last=%d)", directories[iteration], keep_last)
    if deleted:
        remaining = [i for i in publication_order(root) if i not in deleted]
        write_text_atomically(root / PUBLICATION_LOG, "".join(f"{i}\n" for i in remaining))
    return deleted


def _temporary_name_re(target: str) -> re.Pattern[str]:
    """The names :func:`write_text_atomically` gives its temporary file for ``target``: ``.<target>.tmp<pid>``."""
    return re.compile(rf"^\.{re.escape(target)}\.tmp\d+$")


_STAGING_DIR_RE = re.compile(r"^iter_(\d{7,})" + re.escape(PARTIAL_SUFFIX) + "$")
_REPLACED_DIR_RE = re.compile(r"^iter_(\d{7,})" + re.escape(REPLACED_SUFFIX) + "$")
_ROOT_TEMPORARY_RES = (_temporary_name_re(LATEST_MARKER), _temporary_name_re(PUBLICATION_LOG))


def recover_root(root: str | os.PathLike[str]) -> list[str]:
    """Repair what a crash during a save can leave in ``root``; return one line per action (for the log).

    Only names this module writes are touched; everything else in ``root`` is the user's and is left alone:
    * ``iter_<digits>.partial``: a save that never completed: deleted.
    * ``iter_<digits>.replaced``: the old copy of a re-saved iteration: put back when ``iter_<digits>`` is
      missing, else deleted.
    * ``.latest_checkpointed_iteration.txt.tmp<pid>`` / ``.publication_log.txt.tmp<pid>``: deleted.
    Any other entry (``notes.partial/``, ``.mine.tmp``, ``iter_x/``, ...) is reported once as ignored.
    Call it before any process of a new run writes into ``root`` (the trainer does at start-up, on rank 0).
    """
    root = Path(root)
    actions: list[str] = []
    if not root.is_dir():
        return actions
    foreign: list[str] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.is_symlink() and _STAGING_DIR_RE.match(child.name):
            shutil.rmtree(child)
            actions.append(f"deleted the incomplete save {child}")
        elif child.is_dir() and not child.is_symlink() and _REPLACED_DIR_RE.match(child.name):
            original = child.with_name(child.name[: -len(REPLACED_SUFFIX)])
            if original.exists():
                shutil.rmtree(child)
                actions.append(
                    f"deleted {child} (left by an interrupted re-save; {original.name} is complete)"
                )
            else:
                os.rename(child, original)
                actions.append(f"restored {original} from {child.name} (a re-save was interrupted)")
        elif child.is_file() and any(pattern.match(child.name) for pattern in _ROOT_TEMPORARY_RES):
            child.unlink()
            actions.append(f"deleted the temporary file {child}")
        elif not _is_checkpoint_entry(child):
            foreign.append(child.name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        actions.append(f"left alone {len(foreign)} entries of {root} that are not checkpoint files: {shown}")
    return actions


def _is_checkpoint_entry(child: Path) -> bool:
    """True for the names a checkpoint root of ours holds once recovered (published directories, marker, log, and
    the launcher's lock file, ``training/lifetime.py``)."""
    if child.name in (LATEST_MARKER, PUBLICATION_LOG, SAVE_DIR_LOCK):
        return child.is_file()
    return child.is_dir() and iteration_of(child) is not None


def resume_candidates(root: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints of ``root`` to try for an automatic resume, best first: the marker's, then the others by
    recency of publication, then never-published ones by iteration (newest first)."""
    root = Path(root)
    directories = _iteration_dirs(root)
    ordered: list[int] = []
    try:
        marked = read_marker(root)
    except ValueError:
        marked = None
    if marked is not None:
        ordered.append(marked)
    for iteration in reversed(publication_order(root)):
        if iteration not in ordered:
            ordered.append(iteration)
    for iteration in sorted(directories, reverse=True):
        if iteration not in ordered:
            ordered.append(iteration)
    return [iteration_dir(root, i) for i in ordered]
