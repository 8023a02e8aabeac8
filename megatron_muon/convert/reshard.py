"""Reshard: megatron -> megatron at another TP/PP/EP/DP layout. Our trainer makes it unnecessary, so this
verifies and reports instead of converting.

Why nothing needs converting: a checkpoint (``training/checkpoint.py``) is megatron ``dist_checkpointing`` with
every tensor stored under a layout-independent name and its *global* shape (layers by global index, experts by
global id, Muon momentum per logical matrix, AdamW state in the parameter's own sharding), and every rank of a
run reads the regions its layout needs. ``tests/distributed/test_checkpoint.py`` loads a TP2·PP2·EP2 checkpoint
at TP1·PP2·DP2 and TP2·EP2 and checks the weights, the Muon momentum and the next losses.

What :func:`verify_reshard` checks, from metadata only (no tensor data, no process group):

- the checkpoint is complete: ``metadata.json``, ``.metadata`` and every shard file, long enough;
- the model tensors are exactly those its config implies (names, count, global shapes);
- the optimizer state is consistent: every AdamW state tensor (``optimizer.state.<name>.<param>``) belongs to a
  saved model tensor and has its shape; every Muon momentum (``muon.momentum.<matrix>[/part]``) belongs to a
  model matrix, with its columns, and its parts add up to the matrix;
- the requested layout fits the model (``config.checks.check_parallel``: heads, groups, vocabulary, FFN and experts
  divisible, layers per stage, sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_muon.convert.hf_export import compare_tensor_sets, load_run_config
from megatron_muon.convert.hf_import import Layout, check_layout
from megatron_muon.convert.hf_maps import ConversionError, megatron_shapes
from megatron_muon.convert.megatron_io import canonical_entries, resolve_checkpoint_dir

__all__ = ["ReshardReport", "verify_reshard"]

_MUON_PREFIX = "muon.momentum."
_ADAM_PREFIX = "optimizer.state."


@dataclass(kw_only=True, slots=True)
class ReshardReport:
    """What :func:`verify_reshard` found: the checkpoint, its saved layout, the layout checked and what it holds."""

    checkpoint: Path
    saved_layout: dict[str, int | None] | None
    layout: str
    iteration: int
    weights_only: bool
    model_tensors: int
    adam_tensors: int
    muon_tensors: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report, a few printable lines, with the config to resume at the new layout."""
        saved = self.saved_layout or {}
        saved_text = (
            f"TP{saved.get('tensor_parallel')}·PP{saved.get('pipeline_parallel')}·EP{saved.get('expert_parallel')}"
            f"·ETP{saved.get('expert_tensor_parallel')} (world {saved.get('world_size')})"
        )
        lines = [
            f"checkpoint {self.checkpoint} (iteration {self.iteration}, saved at {saved_text}) is complete and "
            f"consistent: {self.model_tensors} model tensors, {self.adam_tensors} AdamW state tensors, "
            f"{self.muon_tensors} Muon momentum tensors",
            f"it loads directly at {self.layout}: no conversion written. Start the trainer with that parallel "
            f"section and checkpoint.resume={self.checkpoint}"
            + (" checkpoint.finetune=true" if self.weights_only else ""),
        ]
        return lines + self.notes


def _check_muon(metadata: dict[str, Any], model: dict[str, tuple[int, ...]]) -> int:
    """Muon momentum keys -> their matrices; raises on a momentum without a matrix or with a wrong shape."""
    parts: dict[str, int] = {}
    count = 0
    for key, sharded in metadata.items():
        if not key.startswith(_MUON_PREFIX):
            continue
        count += 1
        name, _, part = key[len(_MUON_PREFIX) :].partition("/")
        shape = tuple(sharded.global_shape)
        if name not in model:
            raise ConversionError(f"Muon momentum {key} belongs to no model tensor")
        full = model[name]
        if shape[1:] != full[1:] or (not part and shape != full):
            raise ConversionError(f"Muon momentum {key} has shape {shape}, its matrix {name} {full}")
        parts[name] = parts.get(name, 0) + shape[0]
    for name, rows in parts.items():
        if rows != model[name][0]:
            raise ConversionError(
                f"the Muon momentum parts of {name} have {rows} rows, the matrix {model[name][0]}"
            )
    return count


def _check_adam(metadata: dict[str, Any]) -> int:
    """AdamW / main-param state keys -> the saved model tensor of the same name and shape."""
    count = 0
    saved_model = {
        key: tuple(value.global_shape)
        for key, value in metadata.items()
        if not key.startswith(("optimizer.", "muon."))
    }
    for key, sharded in metadata.items():
        if not key.startswith(_ADAM_PREFIX):
            continue
        count += 1
        _, _, param = key[len(_ADAM_PREFIX) :].partition(".")
        if param not in saved_model:
            raise ConversionError(f"optimizer state {key} belongs to no model tensor")
        if tuple(sharded.global_shape) != saved_model[param]:
            raise ConversionError(
                f"optimizer state {key} has shape {tuple(sharded.global_shape)}, {param} {saved_model[param]}"
            )
    return count


def _layout_dict(layout: Layout) -> dict[str, int | None]:
    """``layout`` as ``checkpoint._layout`` records it."""
    return {
        "world_size": layout.resolved_world_size(),
        "tensor_parallel": layout.tp,
        "pipeline_parallel": layout.pp,
        "virtual_pipeline_parallel": layout.vpp,
        "context_parallel": 1,
        "expert_parallel": layout.ep,
        "expert_tensor_parallel": layout.tp if layout.etp is None else layout.etp,
    }


def verify_reshard(
    checkpoint: str | Path, layout: Layout, *, config_path: str | Path | None = None
) -> ReshardReport:
    """Verify that ``checkpoint`` loads at ``layout`` as it is (see the module docstring).

    Raises:
        ConversionError: one line naming the checkpoint and the first problem found.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    model, _ = load_run_config(checkpoint_dir, config_path)
    check_layout(model, layout)
    metadata = load_tensors_metadata(str(checkpoint_dir))
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    canonical: dict[str, tuple[int, ...]] = {}
    for key, sharded in metadata.items():
        if key.startswith(("embedding.", "decoder.", "output_layer.")):
            for name, saved in canonical_entries(key, tuple(sharded.global_shape)):
                canonical[name] = saved.shape
    compare_tensor_sets(
        f"checkpoint {checkpoint_dir} does not match its model config", canonical, megatron_shapes(model)
    )
    try:
        muon = _check_muon(metadata, canonical)
        adam = _check_adam(metadata)
    except ConversionError as error:
        raise ConversionError(f"checkpoint {checkpoint_dir}: {error}") from None
    saved_layout = common.get("parallel_layout")
    notes = []
    if common.get("weights_only"):
        notes.append("weights only (no optimizer state): load it with checkpoint.finetune=true")
    elif saved_layout and saved_layout != _layout_dict(layout):
        notes.append("RNG states are per rank: at another layout they are re-derived from training.seed")
    return ReshardReport(
        checkpoint=checkpoint_dir,
        saved_layout=saved_layout,
        layout=layout.describe(),
        iteration=int(common.get("iteration", 0)),
        weights_only=bool(common.get("weights_only", False)),
        model_tensors=len(canonical),
        adam_tensors=adam,
        muon_tensors=muon,
        notes=notes,
    )
