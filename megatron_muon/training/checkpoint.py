"""Distributed checkpoints with megatron-core's ``dist_checkpointing`` (torch_dist backend), loadable at any
parallel layout.

One checkpoint is one directory ``<root>/iter_0000010/`` written collectively by all ranks:

================================  =================================================================================
what                              where in the checkpoint
================================  =================================================================================
model weights                     ``model`` (``model0``, ``model1``… under virtual pipelining, as megatron-LM):
                                  each chunk's own ``sharded_state_dict()``; sharded tensors named by global layer
                                  and expert ids, so TP/PP/EP/DP can change on load
Muon momentum                     ``optimizer.<muon_dense|muon_expert>.momentum``: one ``ShardedTensor``
                                  ``muon.momentum.<matrix key>`` per logical matrix, full logical shape
                                  (``optim/state.py``); ``…param_groups`` (hyperparameters) in the common state;
                                  ``…fp32_param`` the fp32 main weights under bf16
AdamW state                       ``optimizer.<adamw_dense|adamw_expert>``: megatron's own
                                  ``optimizer.sharded_state_dict(model_sharded_state_dict)`` of that member
                                  (``optimizer.state.exp_avg.<param key>`` …, ``common_step``, ``param_groups``;
                                  under bf16 ``fp32_from_fp16_params``, built here with megatron's keys because
                                  megatron 0.19.2 misnumbers a bf16 model that keeps some params in fp32)
LR / WD schedule                  ``scheduler``: ``OptimizerParamScheduler.state_dict()`` (common state)
progress                          ``iteration``, ``consumed_samples`` (common state)
layout                            ``parallel_layout``: the sizes it was saved at (common state)
RNG                               ``rng_state``: one ``ShardedObject`` per global rank (python, numpy, torch CPU,
                                  accelerator, megatron's tensor-parallel tracker states)
resolved config                   ``config.yaml`` beside the shards (a plain text file)
================================  =================================================================================

Completion and integrity (``checkpoint_files.py``, ``docs/checkpoints.md``): shards go to
``iter_0000010.partial/``; after every rank finished (barrier) rank 0 adds the config, the ranks hash the files
(SHA-256, split over ranks) and rank 0 writes ``manifest.json``; then the directory is renamed to ``iter_0000010``
and only then ``latest_checkpointed_iteration.txt`` is replaced, so the marker always names a complete checkpoint.
Loading verifies the manifest first (split over ranks); a checkpoint without one is not intact (only an explicit
``checkpoint.resume`` naming it, with nothing intact to prefer, loads it, with a warning).
:func:`select_resume_checkpoint` falls back to the newest intact checkpoint of a root when the latest is damaged.

Layout changes: model, AdamW and Muon state are resharded by dist_checkpointing (every rank reads the regions
its new layout needs). RNG states are per rank and only restored when the layout is the same as at save time;
otherwise they stay as the caller seeded them (``model_parallel_cuda_manual_seed``) — a resharded run is
re-derived from the seed, not bit-identical in its random draws.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.utils import extract_sharded_base
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import get_model_config, unwrap_model
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader

from megatron_muon.training.checkpoint_files import (
    CONFIG_FILENAME,
    LATEST_MARKER,
    MANIFEST_FILENAME,
    PARTIAL_SUFFIX,
    checkpoint_files,
    fault_point,
    file_digests,
    iteration_dir,
    publish,
    read_manifest,
    read_marker,
    recover_root,
    resume_candidates,
    verify_files,
    write_manifest,
)
from megatron_muon.training.checkpoint_fsdp import FullyShardedEntries, StateDict, cut_to_held_rows
from megatron_muon.training.checkpoint_optimizer import (
    OptimizerStateError,
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from megatron_muon.training.fsdp import FullyShardedChunk

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from torch.distributed.checkpoint.stateful import Stateful

__all__ = [
    "CHECKPOINT_VERSION",
    "CONFIG_FILENAME",
    "LATEST_MARKER",
    "CheckpointError",
    "find_latest",
    "iteration_dir",
    "fault_point_on_one_rank",
    "load_checkpoint",
    "recover_checkpoint_root",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "select_resume_checkpoint",
    "verify_checkpoint",
    "save_weights_only",
    "verify_checkpoint_files",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message is one line naming the path."""


# ---------------------------------------------------------------------------------------------------
# Paths.
# ---------------------------------------------------------------------------------------------------


def find_latest(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``root``'s ``latest_checkpointed_iteration.txt`` names, or None when there is no marker
    (nothing saved yet: a fresh start for ``--resume auto``).

    Raises:
        CheckpointError: the marker is unreadable or names a directory that does not exist.
    """
    try:
        iteration = read_marker(root)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise CheckpointError(
            f"{Path(root) / LATEST_MARKER} names iteration {iteration} but {directory} does not exist"
        )
    return directory


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` means: itself, or the one a root's marker names.

    Raises:
        CheckpointError: ``path`` is missing, not a directory, or neither a root nor a checkpoint.
    """
    return _resolve_checkpoint_dir(Path(path))


def recover_checkpoint_root(root: str | os.PathLike[str]) -> list[str]:
    """:func:`checkpoint_files.recover_root` on rank 0 (collective); every rank gets the list of actions."""
    payload: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            payload[0] = recover_root(root)
        except OSError as error:
            payload[1] = f"cannot clean up the checkpoint root {root}: {_one_line(error)}"
    dist.broadcast_object_list(payload, src=0)
    if payload[1] is not None:
        raise CheckpointError(payload[1])
    actions: list[str] = payload[0]
    return actions


def _resolve_checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if (path / LATEST_MARKER).is_file():
        latest = find_latest(path)
        if latest is None:  # the marker was removed after the check above
            raise CheckpointError(f"{path / LATEST_MARKER} disappeared while it was being read")
        return latest
    if (path / "metadata.json").is_file() or (path / ".metadata").is_file():
        return path
    raise CheckpointError(
        f"{path} is neither a checkpoint root (no {LATEST_MARKER}) nor a checkpoint directory (no metadata.json)"
    )


def verify_checkpoint_files(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Check that ``checkpoint_dir`` is a complete torch_dist checkpoint: megatron's ``metadata.json`` (written
    last), torch's ``.metadata``, and every shard file the metadata refers to, at least as long as needed.

    Raises:
        CheckpointError: naming the directory and the first missing or truncated file.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for required in ("metadata.json", ".metadata"):
        if not (directory / required).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {required} is missing")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # a truncated or foreign .metadata
        raise CheckpointError(
            f"checkpoint {directory}: cannot read .metadata ({type(error).__name__})"
        ) from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: shard file {name} is missing")
        if path.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {directory} is incomplete: shard file {name} has {path.stat().st_size} bytes, "
                f"expected at least {size}"
            )


# ---------------------------------------------------------------------------------------------------
# Pieces of the state dict.
# ---------------------------------------------------------------------------------------------------


def _model_key(index: int, count: int) -> str:
    # megatron-LM checkpointing.py: "model" for one chunk, "model0", "model1", ... under virtual pipelining.
    return "model" if count == 1 else f"model{index}"


def _model_sharded_state_dict(
    model_chunks: Sequence[torch.nn.Module], fsdp: FullyShardedEntries | None = None
) -> StateDict:
    """megatron's sharded state dict of every chunk; a fully sharded chunk's entries cut to the rows this rank
    holds (``checkpoint_fsdp.py``), recorded in ``fsdp`` for the optimizer state and the load."""
    result: StateDict = {}
    for index, chunk in enumerate(model_chunks):
        # As megatron-LM: keys of the unwrapped model ("decoder.layers.0..."), not of the DDP wrapper ("module.").
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        dp_cp_group = getattr(chunk, "dp_cp_group", None)
        if dp_cp_group is not None:
            metadata["dp_cp_group"] = dp_cp_group
        key = _model_key(index, len(model_chunks))
        entries = unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        if isinstance(chunk, FullyShardedChunk):
            if fsdp is None:
                raise ValueError(
                    "fully sharded model chunks need a FullyShardedEntries to record their entries"
                )
            entries = cut_to_held_rows(entries, fsdp, (key,))
        result[key] = entries
    return result


def _weights_format(model_chunks: Sequence[torch.nn.Module]) -> str:
    """How the model weights are saved: ``fsdp-fp32`` (FSDP's fp32 shards, the master weights themselves),
    ``bf16+masters`` (bf16 weights, fp32 masters under the optimizer's keys) or ``fp32``."""
    if any(isinstance(chunk, FullyShardedChunk) for chunk in model_chunks):
        return "fsdp-fp32"
    return "bf16+masters" if get_model_config(model_chunks[0]).bf16 else "fp32"


def _weights_mismatch(
    checkpoint_dir: Path, saved: str | None, model_chunks: Sequence[torch.nn.Module]
) -> str | None:
    """A one-line refusal where the checkpoint's weights cannot be loaded exactly into this run's: bf16 weights with
    fp32 masters do not cross between FSDP and non-FSDP runs yet (FSDP keeps the masters as its weights and reads no
    master keys; a non-FSDP bf16 run needs them). None where they load (fp32 either way, or the same format)."""
    mine = _weights_format(model_chunks)
    saved = saved or "unknown"
    crossing = {mine, saved} == {"fsdp-fp32", "bf16+masters"}
    if not crossing:
        return None
    return (
        f"checkpoint {checkpoint_dir} holds {saved} weights and this run keeps {mine}: bf16 checkpoints do not "
        "cross between FSDP and non-FSDP runs (parallel.fsdp) yet; resume it with the setting it was saved with"
    )


def _layout(model_chunks: Sequence[torch.nn.Module]) -> dict[str, int | None]:
    config = get_model_config(model_chunks[0])
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": config.tensor_model_parallel_size,
        "pipeline_parallel": config.pipeline_model_parallel_size,
        "virtual_pipeline_parallel": config.virtual_pipeline_model_parallel_size,
        "context_parallel": config.context_parallel_size,
        "expert_parallel": config.expert_model_parallel_size,
        "expert_tensor_parallel": config.expert_tensor_parallel_size,
    }


def _rng_sharded_object(data: Any) -> ShardedObject:
    # One object per global rank: python/numpy/torch states may differ between data-parallel replicas.
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


def _rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # As plain values and a tensor: the checkpoint is read back with torch.load(weights_only=True).
        "numpy": (
            np_kind,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ),
        "torch": torch.get_rng_state(),
        # megatron-core 0.19.2: the accelerator RNG state is reachable only through this private accessor.
        "accelerator": tensor_parallel.random._get_cuda_rng_state(clone=True),
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    tensor_parallel.random._set_cuda_rng_state(
        state["accelerator"]
    )  # megatron-core 0.19.2: private, as above
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# ---------------------------------------------------------------------------------------------------
# Collective error handling: every rank raises together, so none is left waiting in a collective.
# ---------------------------------------------------------------------------------------------------


def _raise_if_any_rank_failed(message: str | None) -> None:
    failure = _first_failure(message)
    if failure is not None:
        raise CheckpointError(failure)


def _run_on_rank_zero(action: Callable[..., object], *args: object) -> None:
    """Run ``action`` on rank 0 and raise its error on every rank."""
    message = None
    if dist.get_rank() == 0:
        try:
            action(*args)
        except Exception as error:
            message = _one_line(error)
    payload = [message]
    dist.broadcast_object_list(payload, src=0)
    if payload[0] is not None:
        raise CheckpointError(payload[0])


# ---------------------------------------------------------------------------------------------------
# Save.
# ---------------------------------------------------------------------------------------------------


def _first_failure(message: str | None) -> str | None:
    """Every rank's ``message`` gathered; the first one (with the rank that reported it), or None."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    for rank, text in enumerate(messages):
        if text is not None:
            return text if rank == dist.get_rank() else f"{text} (reported by rank {rank})"
    return None


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _space_left(directory: Path) -> str:
    """`` (out of space: N bytes left on its file system)`` when that is nearly nothing, else ``""``.

    A full disk reaches us wrapped: torch's writer fails on a short write ("unexpected pos ...") and megatron
    reports "Worker failure"; the free space says what happened."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    return f" (out of space: {free} bytes left on its file system)" if free < (1 << 20) else ""


def _prepare_staging(root: Path, staging: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # a save of this iteration that died midway
    staging.mkdir()


def _hash_split_over_ranks(directory: Path) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every file of ``directory`` (collective): rank r hashes files r, r + world, …"""
    names: list[list[str]] = [checkpoint_files(directory) if dist.get_rank() == 0 else []]
    dist.broadcast_object_list(names, src=0)
    mine: dict[str, dict[str, int | str]] = {}
    message = None
    try:
        mine = file_digests(directory, names[0][dist.get_rank() :: dist.get_world_size()])
    except OSError as error:
        message = f"cannot hash the checkpoint files in {directory}: {_one_line(error)}"
    failure = _first_failure(message)
    if failure is not None:
        raise CheckpointError(failure)
    gathered: list[dict[str, dict[str, int | str]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, mine)
    return {name: entry for part in gathered for name, entry in part.items()}


def _keep_the_writer_in_this_process() -> None:
    """Make dist_checkpointing's save report its write results through an in-process queue.

    megatron-core 0.19.2: every save (synchronous ones too) takes its results queue from
    ``filesystem_async.get_write_results_queue()``, which starts a ``multiprocessing`` Manager: a spawned server
    process (~745 MB RSS on CPU, plus a resource tracker) per rank, alive for the rest of the run and orphaned,
    never exiting, when the rank is killed. Our saves are synchronous (``dist_checkpointing.save`` runs the write
    in this process, on threads, and reads the results right after), so a ``queue.Queue`` serves: no writer
    process exists to outlive its rank. An asynchronous save would need the Manager back (none is made here).
    """
    if filesystem_async._results_queue is None:
        # megatron-core 0.19.2: get_write_results_queue() would start a multiprocessing Manager process per rank.
        filesystem_async._results_queue = queue.Queue()


def _write_staged_checkpoint(
    root: Path, iteration: int, state: StateDict, config_yaml: str, keep_last: int, what: str
) -> Path:
    """Write ``state`` to ``root/iter_N.partial`` (collective), add config and manifest, publish; return the final
    directory. Any rank's failure (a full disk, a lost file system) stops every rank with one line; nothing
    published before is touched."""
    final = iteration_dir(root, iteration)
    staging = final.with_name(final.name + PARTIAL_SUFFIX)
    _run_on_rank_zero(_prepare_staging, root, staging)
    message = None
    _keep_the_writer_in_this_process()
    try:
        dist_checkpointing.save(state, str(staging), validate_access_integrity=True)
    # torch's CheckpointException (how a failed write on any rank surfaces) derives from BaseException.
    except (Exception, CheckpointException) as error:
        message = f"saving {what} to {staging} failed{_space_left(staging)}: {_one_line(error)}"
    fault_point_on_one_rank("during_save", iteration)
    failure = _first_failure(message)  # also the barrier: every rank's shards are on disk
    if failure is not None:
        # The unpublished staging directory goes, so that the space it took is free for the next attempt.
        _run_on_rank_zero(shutil.rmtree, staging, True)
        raise CheckpointError(f"{failure}; the checkpoints published before are intact")
    _run_on_rank_zero((staging / CONFIG_FILENAME).write_text, config_yaml)
    digests = _hash_split_over_ranks(staging)
    _run_on_rank_zero(write_manifest, staging, iteration, digests)
    fault_point_on_one_rank("before_publish", iteration)
    _run_on_rank_zero(publish, root, staging, iteration, keep_last)
    return final


def fault_point_on_one_rank(name: str, iteration: int) -> None:
    """:func:`checkpoint_files.fault_point` on rank ``MEGATRON_MUON_FAULT_RANK`` (default 0) only."""
    if dist.get_rank() == int(os.environ.get("MEGATRON_MUON_FAULT_RANK", "0")):
        fault_point(name, iteration)


def save_checkpoint(
    root: str | os.PathLike[str],
    iteration: int,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: Stateful,
    *,
    consumed_samples: int,
    rng: bool = True,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Save a checkpoint to ``root/iter_<iteration:07d>`` (collective: every rank calls it); return that path.

    Args:
        root: checkpoint root, shared by all ranks.
        iteration: the number of completed training steps.
        model_chunks: this rank's (DDP-wrapped) model chunks.
        optimizer: the megatron ``ChainedOptimizer`` from ``optim.build.build_optimizer`` (or one member).
        scheduler: megatron ``OptimizerParamScheduler`` (or anything with ``state_dict``/``load_state_dict``).
        consumed_samples: training samples consumed so far (to restart the data stream).
        rng: also save every rank's RNG states.
        config_yaml: the resolved run config, stored as ``config.yaml`` beside the shards.
        keep_last: keep this many newest checkpoints under ``root`` (0: keep all); older ones are deleted
            only once this one is complete and marked latest.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
    root = Path(root)
    fsdp = FullyShardedEntries()
    model_state = _model_sharded_state_dict(model_chunks, fsdp)
    state: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "parallel_layout": _layout(model_chunks),
        "weights": _weights_format(model_chunks),
        "rng_saved": bool(rng),
        "scheduler": scheduler.state_dict(),
        "optimizer": optimizer_sharded_state_dict(optimizer, model_state, is_loading=False, fsdp=fsdp),
        **model_state,
    }
    if rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    final = _write_staged_checkpoint(root, iteration, state, config_yaml, keep_last, "the checkpoint")
    logger.info("Saved checkpoint %s", final)
    return final


def save_weights_only(
    root: str | os.PathLike[str], model_chunks: list[torch.nn.Module], *, config_yaml: str
) -> Path:
    """Save the model weights alone as ``root/iter_0000000`` (collective), marked latest; return that path.

    No optimizer, schedule, progress or RNG: :func:`load_checkpoint` loads it with ``finetune=True`` only, at any
    layout (e.g. a Hugging Face import, ``megatron_muon.convert``). ``root`` must hold no checkpoint yet.
    """
    root = Path(root)
    state: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        "consumed_samples": 0,
        "parallel_layout": _layout(model_chunks),
        "rng_saved": False,
        "weights_only": True,
        **_model_sharded_state_dict(model_chunks, FullyShardedEntries()),
    }
    final = _write_staged_checkpoint(root, 0, state, config_yaml, 0, "the weights")
    logger.info("Saved weights-only checkpoint %s", final)
    return final


# ---------------------------------------------------------------------------------------------------
# Load.
# ---------------------------------------------------------------------------------------------------


def _mismatch_with_checkpoint(checkpoint_dir: Path, request: StateDict) -> str | None:
    """One line describing the sharded keys of ``request`` that the checkpoint lacks or holds with another
    global shape; None when everything requested is there."""
    saved = load_sharded_metadata(str(checkpoint_dir))
    expanded, _, _ = load_preprocess(request)  # factories applied on a copy
    sharded, _ = extract_sharded_base(expanded)
    missing: set[str] = set()
    wrong_shape: set[str] = set()
    for item in nested_values(sharded):
        key = item.unique_key if isinstance(item, ShardedObject) else item.key
        if key not in saved:
            missing.add(key)
        elif isinstance(item, ShardedTensor) and tuple(saved[key].global_shape) != tuple(item.global_shape):
            wrong_shape.add(f"{key} {tuple(saved[key].global_shape)} != {tuple(item.global_shape)}")
    if not missing and not wrong_shape:
        return None
    parts = []
    if missing:
        names = sorted(missing)
        parts.append(f"{len(names)} tensor(s) missing, e.g. {', '.join(names[:3])}")
    if wrong_shape:
        names = sorted(wrong_shape)
        parts.append(
            f"{len(names)} tensor(s) with another shape (saved != wanted), e.g. {'; '.join(names[:3])}"
        )
    return f"checkpoint {checkpoint_dir} does not fit this model: {'; '.join(parts)}"


def _verify_structure_and_read_manifest(
    directory: Path, manifest_required: bool
) -> tuple[str | None, dict[str, dict[str, int | str]] | None]:
    try:
        if not directory.is_dir():
            return f"checkpoint directory {directory} does not exist", None
        manifest = read_manifest(directory)
        verify_checkpoint_files(directory)
    except (CheckpointError, ValueError, OSError) as error:
        return str(error).splitlines()[0], None
    if manifest is None and manifest_required:
        return (
            f"checkpoint {directory} has no {MANIFEST_FILENAME}, so its files cannot be checked (an interrupted or "
            "damaged copy?); to load it anyway, name it alone: checkpoint.resume=<that iter_* directory>"
        ), None
    if manifest is None:
        logger.warning(
            "Checkpoint %s has no %s: only its structure is verified; a truncated or altered shard would go "
            "unnoticed (loaded because checkpoint.resume names it and nothing else is available)",
            directory,
            MANIFEST_FILENAME,
        )
    return None, manifest


def verify_checkpoint(directory: str | os.PathLike[str], *, manifest_required: bool = True) -> str | None:
    """Check that ``directory`` is a complete, undamaged checkpoint (collective; every rank gets the same answer).

    Rank 0 checks the structure (megatron's and torch's metadata, every shard file the metadata names, long
    enough); then the ranks split the manifest's files and compare each one's size and SHA-256. Returns None,
    or one line naming the checkpoint and the first bad file. A checkpoint without ``manifest.json`` is not
    intact, unless ``manifest_required`` is False (an explicit ``checkpoint.resume`` that is the only
    candidate): then its structure alone is checked, with a warning.
    """
    directory = Path(directory)
    payload: list[Any] = [None, None]
    if dist.get_rank() == 0:
        payload = list(_verify_structure_and_read_manifest(directory, manifest_required))
    dist.broadcast_object_list(payload, src=0)
    message: str | None = payload[0]
    manifest: dict[str, dict[str, int | str]] | None = payload[1]
    if message is not None or manifest is None:
        return message
    names = sorted(manifest)[dist.get_rank() :: dist.get_world_size()]
    try:
        local = verify_files(directory, manifest, names)
    except OSError as error:
        local = f"checkpoint {directory}: {_one_line(error)}"
    return _first_failure(local)


def select_resume_checkpoint(root: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of ``root`` for an automatic resume (collective), and one warning per damaged
    one passed over (best first: the marker's, then by recency of publication, ``checkpoint_files``).

    Returns ``(None, [])`` when ``root`` holds no checkpoint at all (a fresh start).

    Raises:
        CheckpointError: ``root`` holds checkpoints (or a marker) but none is intact — never a silent fresh start.
    """
    root = Path(root)
    marker_problem: str | None
    try:
        marked = read_marker(root)
    except ValueError as error:
        marked, marker_problem = None, str(error)
    else:
        marker_problem = None
    candidates = resume_candidates(root)
    if not candidates and marked is None and marker_problem is None:
        return None, []
    warnings = [marker_problem] if marker_problem else []
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate, warnings
        warnings.append(problem)
    raise CheckpointError(
        f"{root} holds no intact checkpoint to resume from ({'; '.join(warnings) or 'no iter_* directory'}); "
        "repair or move it, name one of its iter_* directories with checkpoint.resume=<path>, or set "
        "checkpoint.resume=none to start afresh"
    )


def load_checkpoint(
    root_or_iter_dir: str | os.PathLike[str],
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    scheduler: Stateful | None,
    *,
    finetune: bool = False,
    manifest_required: bool = True,
) -> dict[str, int]:
    """Load a checkpoint into ``model_chunks``, ``optimizer`` and ``scheduler`` at this run's layout
    (collective). Returns ``{"iteration": ..., "consumed_samples": ...}``.

    ``root_or_iter_dir``: a checkpoint root (its ``latest_checkpointed_iteration.txt`` picks the directory) or
    one ``iter_*`` directory. ``finetune``: weights only (no optimizer, scheduler, RNG), iteration and
    consumed samples 0. ``optimizer`` / ``scheduler`` may be None to skip them. ``manifest_required`` False
    accepts a checkpoint without ``manifest.json`` (structure checked, a warning): only for a checkpoint the
    user named explicitly with nothing intact beside it (``training/resume.py``).

    Raises:
        CheckpointError: one line naming the path: missing directory, missing marker in a root, missing,
            truncated or corrupted files (manifest sizes and SHA-256), tensors the model needs that the checkpoint lacks (e.g. Muon momentum of
            matrices it never saw) or holds with another shape. Nothing is loaded in these cases.
    """
    checkpoint_dir = _resolve_checkpoint_dir(Path(root_or_iter_dir))
    problem = verify_checkpoint(checkpoint_dir, manifest_required=manifest_required)
    if problem is not None:
        raise CheckpointError(problem)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    version = common.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} has version {version!r}; expected {CHECKPOINT_VERSION}"
        )
    if common.get("weights_only") and not finetune:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} holds model weights only (no optimizer, schedule or progress); "
            "load it with finetune=True (checkpoint.finetune=true)"
        )

    fsdp = FullyShardedEntries()
    problem = _weights_mismatch(checkpoint_dir, common.get("weights"), model_chunks)
    if problem is not None and not finetune:
        raise CheckpointError(problem)
    model_state = _model_sharded_state_dict(model_chunks, fsdp)
    request: dict[str, Any] = dict(model_state)
    with_optimizer = not finetune and optimizer is not None
    same_layout = common.get("parallel_layout") == _layout(model_chunks)
    restore_rng = not finetune and same_layout and common.get("rng_saved", False)
    if with_optimizer:
        request["optimizer"] = optimizer_sharded_state_dict(
            optimizer, model_state, is_loading=True, fsdp=fsdp
        )
    if restore_rng:
        request["rng_state"] = _rng_sharded_object(None)
    _raise_if_any_rank_failed(_mismatch_with_checkpoint(checkpoint_dir, request))

    try:
        loaded = dist_checkpointing.load(
            request,
            str(checkpoint_dir),
            # megatron-core 0.19.2: the default fully-parallel load wrapper moves tensors with .cuda(); the plain
            # torch_dist strategy loads on any device.
            sharded_strategy=TorchDistLoadShardedStrategy(),
            validate_access_integrity=True,
        )
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"cannot load checkpoint {checkpoint_dir}: {type(error).__name__}: {first_line}"
        ) from error

    fsdp.copy_loaded_(loaded)  # fully sharded chunks: the loaded rows into the local shards
    for index, chunk in enumerate(model_chunks):
        values = loaded[_model_key(index, len(model_chunks))]
        if isinstance(chunk, FullyShardedChunk):
            # Its parameters are loaded above; the modules' extra states (Transformer Engine's FP8 metadata) here.
            extra = {k: v for k, v in values.items() if k.endswith("_extra_state")}
            unwrap_model(chunk).load_state_dict(extra, strict=False)
            continue
        unwrap_model(chunk).load_state_dict(values, strict=True)
    if optimizer is not None:
        optimizer.reload_model_params()  # bf16: main params from the loaded weights (overwritten below if saved)
    if finetune:
        logger.info("Loaded weights from %s (finetune: iteration 0)", checkpoint_dir)
        return {"iteration": 0, "consumed_samples": 0}

    if with_optimizer:
        try:
            load_optimizer_state(optimizer, loaded["optimizer"])
        except OptimizerStateError as error:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: {error}") from None
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        _set_rng_state(loaded["rng_state"])
    elif not same_layout:
        logger.warning(
            "Checkpoint %s was saved at layout %s, this run is %s: RNG states are not restored (re-derived from "
            "the seed)",
            checkpoint_dir,
            common.get("parallel_layout"),
            _layout(model_chunks),
        )
    logger.info("Loaded checkpoint %s (iteration %d)", checkpoint_dir, loaded["iteration"])
    return {"iteration": int(loaded["iteration"]), "consumed_samples": int(loaded["consumed_samples"])}
