"""How a (possibly sharded, possibly fused) Megatron parameter maps to the logical matrices Muon orthogonalizes.

Megatron-Core stores weights in ways that hide the matrices Newton–Schulz must see whole:

* ``ColumnParallelLinear`` splits the weight ``(out, in)`` along dim 0 over its TP group, ``RowParallelLinear``
  along dim 1 (``param.partition_dim``).
* The fused QKV weight of ``SelfAttention.linear_qkv`` holds, per query group, ``[q heads of the group; k; v]``
  rows (``attention.py: _clip_linear_qkv`` reads it the same way); a TP rank holds a contiguous run of groups.
* Multi-head latent attention (megatron's ``MLASelfAttention``) keeps per head ``[q_C; q_R]`` rows (non-rotary
  ``qk_head_dim``, rotary ``qk_pos_emb_head_dim``) in ``linear_q_proj`` / ``linear_q_up_proj`` and ``[k_C; v]``
  rows (``qk_head_dim``, ``v_head_dim``) in ``linear_kv_up_proj``; a TP rank holds a contiguous run of heads. The
  down projections (``linear_q_down_proj``, ``linear_kv_down_proj``: ``[kv latent; shared k_R]``) are ordinary
  column-parallel matrices on the local spec.
* The SwiGLU ``linear_fc1`` weight stacks ``[gate; up]`` inside each TP shard (``mlp.py``: ``torch.chunk(x, 2)``).
* Experts live on expert-parallel ranks (``MoELayer.local_expert_indices`` gives their global ids) and are split
  again over the expert-TP group.
* Transformer Engine layers (megatron's ``extensions/transformer_engine.py``) carry the same ``partition_dim``
  attributes but keep megatron's TP group as ``_tp_group`` (TE's own ``tp_group`` is None for experts, whose
  communication megatron does itself). TE's grouped GEMM holds a layer's local experts in one module with one
  parameter per expert, ``experts.linear_fc1.weight0 … weight{n-1}``; each is keyed like the SequentialMLP weight
  ``experts.local_experts.{global id}.linear_fc1.weight``, so Muon state names an expert the same way either way.

A :class:`MatrixPiece` says, for one logical matrix, which rows of the local parameter hold it and which shard of
the logical matrix they are. The key of a logical matrix does not depend on TP/PP/EP (global layer numbers and
global expert ids), so the plan (``plan.py``) can match pieces across ranks and checkpoints can name them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LOCAL_EXPERT_RE = re.compile(r"local_experts\.(\d+)\.")
_GROUPED_EXPERT_RE = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")


@dataclass(frozen=True, slots=True)
class RowBlocks:
    """A strided set of rows of a 2-D tensor: ``repeats`` blocks of ``length`` rows, one every ``period`` rows,
    starting at ``offset``. Covers a whole tensor, a fused half, and a per-group interleave."""

    offset: int
    length: int
    period: int
    repeats: int = 1

    @property
    def num_rows(self) -> int:
        return self.length * self.repeats

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows as a ``(num_rows, cols)`` tensor (a view when possible, otherwise a copy)."""
        cols = tensor.shape[-1]
        if self.repeats == 1:
            return tensor[self.offset : self.offset + self.length]
        grouped = tensor.view(self.repeats, self.period, cols)[:, self.offset : self.offset + self.length]
        return grouped.reshape(self.num_rows, cols)

    def write(self, tensor: torch.Tensor, rows: torch.Tensor) -> None:
        """Copy ``rows`` (``(num_rows, cols)``) into these rows of ``tensor`` in place."""
        cols = tensor.shape[-1]
        if self.repeats == 1:
            tensor[self.offset : self.offset + self.length].copy_(rows)
            return
        view = tensor.view(self.repeats, self.period, cols)[:, self.offset : self.offset + self.length]
        view.copy_(rows.view(self.repeats, self.length, cols))


def shard_shape(shape: tuple[int, int], shard_dim: int, num_shards: int) -> tuple[int, int]:
    """Shape of one of ``num_shards`` equal shards of a ``shape`` matrix split along ``shard_dim``."""
    rows, cols = shape
    return (rows // num_shards, cols) if shard_dim == 0 else (rows, cols // num_shards)


@dataclass(frozen=True, slots=True)
class RowRuns:
    """Some rows of one shard of a logical matrix, held in a fully sharded (FSDP) parameter: each run is
    ``(local_row, shard_row, length)``: ``length`` rows starting at row ``local_row`` of this rank's slice of the
    parameter are rows ``shard_row …`` of the shard."""

    runs: tuple[tuple[int, int, int], ...]
    cut: tuple[int, int] = (0, 0)
    """(rows of the parameter, FSDP ranks) it was cut from (``fsdp_part_pieces``)."""

    @property
    def num_rows(self) -> int:
        return sum(length for _, _, length in self.runs)

    @property
    def shard_rows(self) -> tuple[tuple[int, int], ...]:
        """``(shard_row, length)`` per run: which rows of the shard these are, whatever the local tensor."""
        return tuple((shard_row, length) for _, shard_row, length in self.runs)

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [tensor[local : local + length] for local, _, length in self.runs]
        if not parts:
            return tensor[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def write(self, tensor: torch.Tensor, rows: torch.Tensor) -> None:
        offset = 0
        for local, _, length in self.runs:
            tensor[local : local + length].copy_(rows[offset : offset + length])
            offset += length


@dataclass(frozen=True, slots=True)
class MatrixPiece:
    """The part of one logical matrix that one local parameter holds.

    ``key`` names the logical matrix independently of the parallel layout; ``shape`` is its full
    ``(fan_out, fan_in)``. The local rows ``rows`` of ``param[index]`` are shard ``shard_index`` of ``num_shards``
    equal shards of the logical matrix along ``shard_dim`` (0: rows, 1: columns). With a fully sharded parameter
    (``parallel.fsdp``) this rank holds only ``part`` of that shard's rows, read from its slice of the parameter
    (``fsdp_part_pieces``); ``rows`` then still describes the whole parameter.
    """

    key: str
    shape: tuple[int, int]
    rows: RowBlocks
    shard_dim: int = 0
    num_shards: int = 1
    shard_index: int = 0
    index: tuple[int, ...] = ()
    part: RowRuns | None = None

    @property
    def is_held(self) -> bool:
        """False for an FSDP part without rows on this rank (kept only to be announced)."""
        return self.part is None or self.part.num_rows > 0

    @property
    def shard_shape(self) -> tuple[int, int]:
        """Shape of the whole shard ``shard_index``."""
        return shard_shape(self.shape, self.shard_dim, self.num_shards)

    @property
    def local_shape(self) -> tuple[int, int]:
        """Shape of what this rank holds: the shard, or its ``part``."""
        rows, cols = self.shard_shape
        return (rows if self.part is None else self.part.num_rows), cols

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece out of the local parameter (or gradient) ``tensor``: a fully sharded parameter's slice."""
        if self.part is not None:
            return self.part.read(tensor)
        return self.rows.read(tensor[self.index] if self.index else tensor)

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        if self.part is not None:
            self.part.write(tensor, value)
            return
        self.rows.write(tensor[self.index] if self.index else tensor, value)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a fully sharded (FSDP2 ``DTensor``) parameter or gradient; any other tensor as is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def fsdp_chunk(rows: int, ranks: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that FSDP rank ``rank`` of ``ranks`` holds of a ``rows``-row parameter
    (``torch.chunk`` over dim 0, as FSDP2 shards: the last ranks may hold fewer rows, or none)."""
    chunk = -(-rows // ranks)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def fsdp_shard(param: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, FSDP ranks, this rank's index) of a fully sharded (``DTensor``) parameter; None for any other."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return None
    return param.shape[0], mesh.size(), mesh.get_local_rank()


def fsdp_row_range(param: torch.Tensor) -> tuple[int, int] | None:
    """Rows ``[start, stop)`` of a fully sharded parameter held on this rank; None for a parameter that is not a
    ``DTensor``."""
    shard = fsdp_shard(param)
    if shard is None:
        return None
    start, stop = fsdp_chunk(*shard)
    local = local_tensor(param).shape[0]
    if stop - start != local:
        raise RuntimeError(
            f"FSDP holds {local} rows of a {shard[0]}-row parameter here; expected {stop - start}"
        )
    return start, stop


def part_runs(blocks: RowBlocks, start: int, stop: int) -> tuple[tuple[int, int, int], ...]:
    """The rows of ``blocks`` (a piece's rows of its parameter) inside parameter rows ``[start, stop)``, as
    ``RowRuns.runs``: ``(row in the slice, row of the shard, rows)``."""
    runs = []
    for repeat in range(blocks.repeats):
        first = repeat * blocks.period + blocks.offset
        lo, hi = max(first, start), min(first + blocks.length, stop)
        if lo < hi:
            runs.append((lo - start, repeat * blocks.length + lo - first, hi - lo))
    return tuple(runs)


def fsdp_part_pieces(pieces: list[MatrixPiece], rows: int, ranks: int, rank: int) -> list[MatrixPiece]:
    """The parts of ``pieces`` (of one ``rows``-row parameter) that FSDP rank ``rank`` of ``ranks`` holds: each
    piece cut to the runs of its rows in that rank's slice (``fsdp_chunk``); pieces without such rows are left
    kept as empty parts (``MatrixPiece.is_held`` False: announced, so that peers can be derived, never read). Each
    part records the cut (``RowRuns.cut``), so any rank can tell what another holds."""
    start, stop = fsdp_chunk(rows, ranks, rank)
    result = []
    for piece in pieces:
        if piece.index:
            raise ValueError(f"{piece.key}: FSDP parts of stacked (N-D) parameters are not supported")
        runs = part_runs(piece.rows, start, stop)
        result.append(dataclasses.replace(piece, part=RowRuns(runs, cut=(rows, ranks))))
    return result


def whole_tensor_pieces(name: str, param: torch.Tensor) -> list[MatrixPiece]:
    """Pieces of an unsharded, unfused parameter: a matrix, or a stack of matrices (leading batch dims)."""
    if param.ndim < 2:
        raise ValueError(f"parameter {name!r} has shape {tuple(param.shape)}; Muon needs a matrix or a stack")
    rows, cols = param.shape[-2:]
    block = RowBlocks(offset=0, length=rows, period=rows)
    if param.ndim == 2:
        return [MatrixPiece(key=name, shape=(rows, cols), rows=block)]
    pieces = []
    for index in (
        torch.cartesian_prod(*[torch.arange(n) for n in param.shape[:-2]])
        .reshape(-1, param.ndim - 2)
        .tolist()
    ):
        index = tuple(index)
        suffix = ".".join(str(i) for i in index)
        pieces.append(MatrixPiece(key=f"{name}[{suffix}]", shape=(rows, cols), rows=block, index=index))
    return pieces


@dataclass(frozen=True, slots=True)
class LayoutConfig:
    """Choices about what counts as one logical matrix."""

    split_qkv: bool = True
    """Orthogonalize Q, K and V of a fused QKV weight separately (megatron-core's ``muon_split_qkv``); with MLA,
    the K and V parts of ``linear_kv_up_proj``."""
    qkv_per_head: bool = False
    """Orthogonalize every query head and every key/value group on its own (implies ``split_qkv``); with MLA,
    every head of the query and of the K and V up-projections."""
    split_gate_up: bool = True
    """Orthogonalize the gate and up halves of a SwiGLU ``linear_fc1`` separately."""


def _shard_info(param: Any, tp_group: Any) -> tuple[int | None, int, int, int]:
    """(partition dim or None, number of shards, this rank's shard index, partition stride) from megatron's
    TP attributes."""
    if not getattr(param, "tensor_model_parallel", False) or getattr(param, "partition_dim", -1) < 0:
        return None, 1, 0, 1
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    return int(param.partition_dim), size, rank, int(getattr(param, "partition_stride", 1))


def module_tp_group(module: torch.nn.Module) -> Any:
    """The group a linear layer's weight is split over: ``_tp_group`` on megatron's Transformer Engine wrappers
    (the expert-TP group for experts), ``tp_group`` on megatron's local layers; None: not split."""
    if hasattr(module, "_tp_group"):
        return module._tp_group
    return getattr(module, "tp_group", None)


def _global_key(name: str, module_path: dict[str, torch.nn.Module]) -> str:
    """Replace local layer and expert indices in ``name`` by global ones so keys survive re-layouts.

    ``module_path`` maps the module names of the same root module ``name`` comes from (DDP prefixes included).
    A TE grouped-GEMM expert weight ``….experts.linear_fc1.weight3`` is named as local expert 3 of a SequentialMLP.
    """
    param_name = name
    name = _GROUPED_EXPERT_RE.sub(r".experts.local_experts.\2.\1.weight", name)
    key = name
    # Global layer number: megatron names layers by their index inside this pipeline stage / model chunk;
    # ``TransformerLayer.layer_number`` is global and 1-based.
    match = _LAYER_RE.search(key)
    if match is not None:
        layer = module_path.get(key[: match.end() - 1].lstrip("."))
        layer_number = getattr(layer, "layer_number", None)
        if layer_number is None:
            raise ValueError(f"cannot find the global layer number of parameter {param_name!r}")
        start, end = match.span(1)
        key = key[:start] + str(layer_number - 1) + key[end:]
    match = _LOCAL_EXPERT_RE.search(name)
    if match is not None:
        moe_layer: Any = None
        # The innermost enclosing module with local_expert_indices (a lookup per prefix of the name, not a scan of
        # every module per parameter: tens of thousands of expert weights per rank at Kimi-K2 scale).
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            module = module_path.get(".".join(parts[:end]))
            if module is not None and hasattr(module, "local_expert_indices"):
                moe_layer = module
                break
        if moe_layer is None:
            raise ValueError(f"cannot find the MoE layer of expert parameter {param_name!r}")
        global_index = moe_layer.local_expert_indices[int(match.group(1))]
        key_match = _LOCAL_EXPERT_RE.search(key)
        assert key_match is not None  # key is name with its layer index made global
        start, end = key_match.span(1)
        key = key[:start] + str(global_index) + key[end:]
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _split_pieces(
    key: str,
    fused: list[tuple[str, int]],
    groups_local: int,
    cols: int,
    shard_dim: int | None,
    num_shards: int,
    shard_index: int,
) -> list[MatrixPiece]:
    """Pieces of a weight whose local rows are ``groups_local`` repeats of the fused blocks ``fused``
    (name, rows per repeat). A TP shard holds whole repeats, so each logical matrix is sharded along dim 0."""
    period = sum(rows for _, rows in fused)
    pieces = []
    offset = 0
    for part, rows in fused:
        block = RowBlocks(offset=offset, length=rows, period=period, repeats=groups_local)
        full_rows = rows * groups_local * num_shards
        pieces.append(
            MatrixPiece(
                key=f"{key}/{part}",
                shape=(full_rows, cols),
                rows=block,
                shard_dim=0,
                num_shards=num_shards if shard_dim is not None else 1,
                shard_index=shard_index if shard_dim is not None else 0,
            )
        )
        offset += rows
    return pieces


def _per_head_pieces(
    key: str, heads_per_group: int, head_dim: int, groups_local: int, cols: int, group_offset: int
) -> list[MatrixPiece]:
    """Each query head and each K / V group of a fused QKV weight as its own (unsharded) matrix."""
    period = (heads_per_group + 2) * head_dim
    pieces = []
    for g in range(groups_local):
        global_group = group_offset + g
        base = g * period
        for h in range(heads_per_group):
            block = RowBlocks(offset=base + h * head_dim, length=head_dim, period=head_dim)
            global_head = global_group * heads_per_group + h
            pieces.append(MatrixPiece(key=f"{key}/q.head{global_head}", shape=(head_dim, cols), rows=block))
        for j, part in enumerate(("k", "v")):
            block = RowBlocks(
                offset=base + (heads_per_group + j) * head_dim, length=head_dim, period=head_dim
            )
            pieces.append(
                MatrixPiece(key=f"{key}/{part}.group{global_group}", shape=(head_dim, cols), rows=block)
            )
    return pieces


def _per_head_parts(
    key: str, parts: list[tuple[str, int]], heads_local: int, cols: int, head_offset: int
) -> list[MatrixPiece]:
    """Each head's part ``(name, rows)`` of a weight whose local rows are ``heads_local`` repeats of ``parts`` as
    its own (unsharded) matrix ``{key}/{name}.head{global head}``."""
    period = sum(rows for _, rows in parts)
    pieces = []
    for h in range(heads_local):
        offset = h * period
        for part, rows in parts:
            block = RowBlocks(offset=offset, length=rows, period=rows)
            pieces.append(
                MatrixPiece(key=f"{key}/{part}.head{head_offset + h}", shape=(rows, cols), rows=block)
            )
            offset += rows
    return pieces


def _mla_pieces(
    name: str,
    key: str,
    module_name: str,
    config: Any,
    options: LayoutConfig,
    shape: tuple[int, int],
    shard: tuple[int | None, int, int],
) -> list[MatrixPiece] | None:
    """Pieces of MLA's per-head up projections (None: not one of them, or kept whole by ``options``).

    ``linear_kv_up_proj`` holds ``[k_C; v]`` per head: with ``split_qkv`` its K and V parts are two logical
    matrices, sharded over TP by heads like the QKV split per query group. ``linear_q_proj`` /
    ``linear_q_up_proj`` hold only queries and stay whole unless ``qkv_per_head``."""
    shard_dim, num_shards, shard_index = shard
    is_kv_up = module_name == "linear_kv_up_proj"
    if not (options.qkv_per_head or (is_kv_up and options.split_qkv)):
        return None
    heads = config.num_attention_heads
    heads_local = heads // num_shards if shard_dim is not None else heads
    if is_kv_up:
        parts = [("k", config.qk_head_dim), ("v", config.v_head_dim)]
    else:
        parts = [("q", config.qk_head_dim + config.qk_pos_emb_head_dim)]
    rows, cols = shape
    if shard_dim not in (None, 0) or rows != heads_local * sum(r for _, r in parts):
        raise ValueError(
            f"{name}: local MLA shape {tuple(shape)} (split along {shard_dim}) does not match {heads_local} heads x "
            f"{' + '.join(f'{p}={r}' for p, r in parts)} rows"
        )
    if options.qkv_per_head:
        return _per_head_parts(key, parts, heads_local, cols, shard_index * heads_local)
    return _split_pieces(key, parts, heads_local, cols, shard_dim, num_shards, shard_index)


def megatron_param_pieces(
    name: str,
    param: torch.Tensor,
    module: torch.nn.Module,
    config: Any,
    module_path: dict[str, torch.nn.Module],
    options: LayoutConfig = LayoutConfig(),
) -> list[MatrixPiece]:
    """The logical-matrix pieces of the weight ``param`` (named ``name``) of the linear layer ``module``.

    ``config`` is the megatron ``TransformerConfig``; ``module_path`` maps module names of the model to modules
    (for global layer and expert indices). The TP group is the module's own (``module_tp_group``: the expert-TP
    group for experts), so nothing here reads megatron's global parallel state.
    """
    if param.ndim != 2:
        raise ValueError(f"Muon parameter {name!r} has shape {tuple(param.shape)}; expected a 2-D weight")
    key = _global_key(name, module_path)
    shard_dim, num_shards, shard_index, stride = _shard_info(param, module_tp_group(module))
    rows, cols = param.shape
    module_name = name.rsplit(".", 2)[-2] if "." in name else name

    if module_name == "linear_qkv" and (options.split_qkv or options.qkv_per_head):
        if getattr(config, "attention_output_gate", False):
            raise ValueError(
                f"{name}: attention_output_gate=True fuses a gate into linear_qkv; the Muon QKV split "
                "does not support it (set split_qkv=False to orthogonalize the fused weight whole)"
            )
        head_dim = config.kv_channels
        heads_per_group = config.num_attention_heads // config.num_query_groups
        groups_local = (
            config.num_query_groups // num_shards if shard_dim is not None else config.num_query_groups
        )
        if rows != groups_local * (heads_per_group + 2) * head_dim:
            raise ValueError(
                f"{name}: local QKV shape {tuple(param.shape)} does not match {groups_local} query groups x "
                f"({heads_per_group} q heads + k + v) x kv_channels={head_dim}"
            )
        if options.qkv_per_head:
            return _per_head_pieces(
                key, heads_per_group, head_dim, groups_local, cols, shard_index * groups_local
            )
        fused = [("q", heads_per_group * head_dim), ("k", head_dim), ("v", head_dim)]
        return _split_pieces(key, fused, groups_local, cols, shard_dim, num_shards, shard_index)

    if module_name in ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj") and getattr(
        config, "multi_latent_attention", False
    ):
        pieces = _mla_pieces(
            name, key, module_name, config, options, (rows, cols), (shard_dim, num_shards, shard_index)
        )
        if pieces is not None:
            return pieces

    if module_name == "linear_fc1" and options.split_gate_up and getattr(config, "gated_linear_unit", False):
        if rows % 2:
            raise ValueError(f"{name}: gated linear_fc1 has an odd number of rows {rows}")
        if shard_dim not in (None, 0):
            raise ValueError(
                f"{name}: gated linear_fc1 split along dim {shard_dim}; expected column-parallel"
            )
        # megatron gives gated fc1 partition_stride=2 so its *initialization* slices [gate_t; up_t]; the
        # forward always reads the local rows as [gate_t; up_t] (mlp.py: torch.chunk(x, 2)), whatever the stride.
        fused = [("gate", rows // 2), ("up", rows // 2)]
        return _split_pieces(key, fused, 1, cols, shard_dim, num_shards, shard_index)

    if stride != 1 and module_name == "linear_fc1" and num_shards > 1:
        # Each TP shard holds [gate_t; up_t], not a contiguous block of the fused [gate; up] matrix.
        raise ValueError(
            f"{name}: split_gate_up=False with tensor parallelism ({num_shards} shards) is not supported; "
            "the fused [gate; up] matrix is interleaved across TP ranks (use split_gate_up=True)"
        )
    if stride != 1 and num_shards > 1:
        raise ValueError(f"{name}: partition_stride={stride} is only understood for a gated linear_fc1")
    whole = RowBlocks(offset=0, length=rows, period=rows)
    if shard_dim is None:
        return [MatrixPiece(key=key, shape=(rows, cols), rows=whole)]
    full = (rows * num_shards, cols) if shard_dim == 0 else (rows, cols * num_shards)
    return [
        MatrixPiece(
            key=key,
            shape=full,
            rows=whole,
            shard_dim=shard_dim,
            num_shards=num_shards,
            shard_index=shard_index,
        )
    ]
