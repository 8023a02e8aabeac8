"""Our side of a conversion: reading the model tensors of a megatron distributed checkpoint in one process, and
writing a weights-only checkpoint from full tensors.

Reading needs no model and no model-parallel groups: ``dist_checkpointing.load_tensors_metadata`` gives every
saved ``ShardedTensor`` with its *global* shape (the checkpoint's TP/PP/EP layout does not show), and
``dist_checkpointing.load`` of such unsharded ``ShardedTensor`` s returns plain full tensors (as megatron's
``load_plain_tensors``, but a few keys at a time so a large model is never all in memory). Reading metadata
needs no process group; torch's reader of tensor data asks for one, so :func:`single_process_group` makes a
one-rank gloo group.

Saved (sharded) names -> canonical names (a TP1 model's ``state_dict`` keys, used by ``hf_maps``):

=================================================================  ================================================
saved                                                              canonical
=================================================================  ================================================
``decoder.layers.<i>.self_attention.linear_qkv.layer_norm_weight``  ``decoder.layers.<i>.input_layernorm.weight``
``decoder.layers.<i>.mlp.linear_fc1.layer_norm_weight``             ``decoder.layers.<i>.pre_mlp_layernorm.weight``
``decoder.layers.<i>.mlp.experts.experts.linear_fc1.weight``        ``…mlp.experts.local_experts.<e>.linear_fc1.weight``
``[experts, …]`` (one tensor, global expert ids)                   one per expert (same for ``linear_fc2``)
``decoder.layers.<name>`` ``[layers, …]`` (megatron's homogeneous   ``decoder.layers.<i>.<name>`` one per layer
format; ours saves per layer because ``moe_layer_freq`` is a list)
=================================================================  ================================================

Writing builds the model at TP1/PP1/EP1, loads the tensors with a strict ``load_state_dict`` and saves it with
``checkpoint.save_weights_only``: the model's own ``sharded_state_dict`` then describes the checkpoint, so it
loads at any layout.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_muon.config import ModelConfig
from megatron_muon.convert.hf_maps import ConversionError

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
from megatron_muon.training.checkpoint import (
    LATEST_MARKER,
    CheckpointError,
    find_latest,
    verify_checkpoint_files,
)

__all__ = [
    "SavedTensor",
    "build_single_process_model",
    "canonical_entries",
    "checkpoint_model_tensors",
    "load_canonical_tensors",
    "resolve_checkpoint_dir",
    "single_process_group",
]

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_RENAMES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)
_EXPERT_STACK = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.experts\.(linear_fc[12]\.weight)$")


@contextlib.contextmanager
def single_process_group(*, model_parallel: bool = False) -> Iterator[None]:
    """A one-rank gloo process group for the duration (and megatron's parallel state with every size 1 when
    ``model_parallel``), with the CPU stand-ins applied. What this process already has is reused (e.g. a
    one-rank test job) and left in place."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_muon.platform.device import choose_device, use_device

    created_group = created_state = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"conversion runs in one process; this one is rank {dist.get_rank()} of {dist.get_world_size()}"
            )
    else:
        # ignore[attr-defined]: torch.distributed re-exports HashStore from torch._C without declaring it.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
        created_group = True
    try:
        # The CPU stand-ins on a machine without CUDA; the thread count stays what this process has.
        use_device(choose_device(local_rank=0), num_threads=torch.get_num_threads())
        if model_parallel and not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
            created_state = True
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it is one checkpoint (``iter_*`` with ``metadata.json``), else the one its
    ``latest_checkpointed_iteration.txt`` names; verified complete (every shard file there, long enough)."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
        if (path / LATEST_MARKER).is_file():
            latest = find_latest(path)
            if latest is None:  # the marker was removed after the check above
                raise CheckpointError(f"{path / LATEST_MARKER} disappeared while it was being read")
            path = latest
        elif not (path / "metadata.json").is_file():
            raise CheckpointError(
                f"{path} is neither a checkpoint root (no {LATEST_MARKER}) nor a checkpoint (no metadata.json)"
            )
        verify_checkpoint_files(path)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None
    return path


@dataclass(frozen=True, slots=True)
class SavedTensor:
    """Where a canonical tensor lives in the checkpoint."""

    key: str
    """The saved ``ShardedTensor`` key."""
    index: tuple[int, ...]
    """Leading indices into it (layer of a stacked tensor, expert of an expert stack)."""
    shape: tuple[int, ...]
    """The canonical tensor's shape."""
    saved_shape: tuple[int, ...]
    """The saved tensor's global shape."""
    dtype: torch.dtype
    """Its dtype."""


def canonical_entries(
    key: str, global_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> list[tuple[str, SavedTensor]]:
    """The canonical tensors of one saved tensor (see the module docstring): ``[(name, SavedTensor), ...]``."""
    global_shape = tuple(global_shape)
    entries = [(key, SavedTensor(key, (), global_shape, global_shape, dtype))]
    stacked = key.startswith("decoder.layers.") and not key.split(".")[2].isdigit()
    if stacked:
        rest = key[len("decoder.layers.") :]
        entries = [
            (f"decoder.layers.{i}.{rest}", SavedTensor(key, (i,), global_shape[1:], global_shape, dtype))
            for i in range(global_shape[0])
        ]
    result = []
    for name, saved in entries:
        match = _EXPERT_STACK.match(name)
        if match:
            for expert in range(saved.shape[0]):
                result.append(
                    (
                        f"{match.group(1)}.local_experts.{expert}.{match.group(2)}",
                        SavedTensor(saved.key, (*saved.index, expert), saved.shape[1:], global_shape, dtype),
                    )
                )
            continue
        for old, new in _RENAMES:
            if name.endswith(old):
                name = name[: -len(old)] + new
        result.append((name, saved))
    return result


def checkpoint_model_tensors(checkpoint_dir: Path) -> dict[str, SavedTensor]:
    """Canonical name -> :class:`SavedTensor` for every model tensor of the checkpoint (optimizer state, Muon
    momentum and RNG are left out). Reads metadata only (no process group needed)."""
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    metadata = load_tensors_metadata(str(checkpoint_dir))
    found: dict[str, SavedTensor] = {}
    for key, sharded in metadata.items():
        if key.startswith(_MODEL_PREFIXES):
            found.update(canonical_entries(key, tuple(sharded.global_shape), sharded.dtype))
    return found


def load_canonical_tensors(checkpoint_dir: Path, wanted: dict[str, SavedTensor]) -> dict[str, torch.Tensor]:
    """The full tensors of ``wanted`` (canonical name -> :class:`SavedTensor`), reading only their saved keys;
    needs :func:`single_process_group` (torch's checkpoint reader asks for a process group)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    request = {
        saved.key: ShardedTensor.from_rank_offsets(
            saved.key, torch.empty(saved.saved_shape, dtype=saved.dtype)
        )
        for saved in wanted.values()
    }
    loaded = dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)
    return {
        name: loaded[saved.key][saved.index] if saved.index else loaded[saved.key]
        for name, saved in wanted.items()
    }


def build_single_process_model(model: ModelConfig) -> GPTModel:
    """Our model at TP1/PP1/EP1 (one ``GPTModel``), as the trainer builds it from ``model``; needs
    :func:`single_process_group` with ``model_parallel=True``."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_muon.models.gpt_moe import build_gpt_moe_model_chunks, build_transformer_config

    config = build_transformer_config(model, tp=1, pp=1, ep=1)
    model_parallel_cuda_manual_seed(0)
    (chunk,) = build_gpt_moe_model_chunks(model, config, ProcessGroupCollection.use_mpu_process_groups())
    return chunk
