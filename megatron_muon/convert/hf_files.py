"""Hugging Face model directories on disk: ``config.json`` and ``model*.safetensors`` (one file, or shards with
``model.safetensors.index.json``), read lazily and written shard by shard. Needs ``safetensors`` (not
``transformers``).

Expert weights are read in both layouts ``transformers`` uses: the per-expert tensors every hub checkpoint has
(``…experts.<e>.gate_proj.weight``; Mixtral ``…block_sparse_moe.experts.<e>.w1.weight``), which
``save_pretrained`` still writes by default, and the fused tensors of transformers >= 5 models in memory
(``…mlp.experts.gate_up_proj`` ``[experts, 2·ffn, hidden]`` = per expert ``[gate; up]``, ``…mlp.experts.down_proj``
``[experts, hidden, ffn]``), which ``save_pretrained(save_original_format=False)`` writes.
"""

from __future__ import annotations

import json
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_muon.convert.hf_maps import Architecture, ConversionError

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "HFReader",
    "SafetensorsWriter",
    "parse_size",
    "read_hf_config",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FUSED_EXPERTS = re.compile(
    r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$"
)


def _safetensors() -> types.ModuleType:
    try:
        import safetensors
        import safetensors.torch
    except ImportError:  # pragma: no cover - the dev extra installs it
        raise ConversionError(
            "Hugging Face conversion needs the safetensors package: pip install safetensors"
        ) from None
    return safetensors


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5·10⁹ bytes, ``"200KB"``, ``"64MiB"``, or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConversionError(f"size {text!r} is not a number of bytes like 5GB, 200MB or 1048576")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def read_hf_config(directory: Path) -> dict[str, Any]:
    """``directory/config.json``; ``ConversionError`` when it is missing or not JSON."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory} is not a Hugging Face model directory: no {CONFIG_FILE}")
    try:
        config: dict[str, Any] = json.loads(path.read_text())
        return config
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index: tensor name -> shard file name, both strings."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise ConversionError(f"{index_path} is not a JSON object with a weight_map: {error}") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise ConversionError(f"{index_path}: weight_map must map tensor names to shard file names (strings)")
    return weight_map


def _check_shard_name(directory: Path, name: str) -> None:
    """A shard named by an index must be a file inside ``directory``: a relative name without ``..`` that
    resolves (symbolic links followed) inside it. The index is input (it comes with a downloaded model), so it
    never makes the reader open a file elsewhere.

    One exception keeps the Hugging Face hub cache readable in place: its ``snapshots/<revision>/`` directories
    hold symbolic links into the same repository's ``blobs/`` (``huggingface_hub`` writes them, not the index).
    """
    path = Path(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ConversionError(
            f"{directory}: shard name {name!r} in {INDEX_FILE} is not a file name inside the model directory "
            "(absolute paths, '..' and backslashes are refused)"
        )
    inside = directory.resolve()
    allowed = [inside]
    if inside.parent.name == "snapshots":
        allowed.append(inside.parent.parent / "blobs")
    target = (directory / path).resolve()
    if not any(target.is_relative_to(root) for root in allowed):
        raise ConversionError(
            f"{directory}: shard {name!r} in {INDEX_FILE} resolves to {target}, outside the model directory "
            "(a symbolic link out of it)"
        )


@dataclass(frozen=True, slots=True)
class _Source:
    file: str
    key: str
    expert: int | None
    rows: slice | None
    shape: tuple[int, ...]


class HFReader:
    """The tensors of a Hugging Face model directory by name, shapes from the file headers, data on demand.

    Raises ``ConversionError`` (one line naming the directory and file) for: no weights, ``.bin`` weights only,
    a shard name in the index that is absolute, holds ``..`` or resolves outside the directory, a shard listed in
    the index that is missing, an index entry its shard does not hold.
    """

    def __init__(self, directory: Path, arch: Architecture) -> None:
        self.directory = directory
        safetensors = _safetensors()
        index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.is_file():
            weight_map = _read_weight_map(index_path)
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [SINGLE_FILE]
        elif any(directory.glob("*.bin")):
            raise ConversionError(
                f"{directory}: only PyTorch .bin weights; convert them to safetensors first"
            )
        else:
            raise ConversionError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")
        for name in files:
            _check_shard_name(directory, name)
            if not (directory / name).is_file():
                raise ConversionError(f"{directory}: shard {name} listed in {INDEX_FILE} is missing")
        self._sources: dict[str, _Source] = {}
        stored: set[str] = set()
        for name in files:
            try:
                with safetensors.safe_open(str(directory / name), framework="pt") as handle:
                    for key in handle.keys():
                        stored.add(key)
                        self._add(name, key, tuple(handle.get_slice(key).get_shape()), arch)
            except ConversionError:
                raise
            except Exception as error:  # a truncated or foreign file
                raise ConversionError(
                    f"{directory}: cannot read {name} ({type(error).__name__}: {error})"
                ) from None
        if weight_map is not None:
            missing = sorted(set(weight_map) - stored)
            if missing:
                raise ConversionError(
                    f"{directory}: {len(missing)} tensor(s) listed in {INDEX_FILE} are in no shard, e.g. {missing[0]}"
                )
        self._open: dict[str, Any] = {}

    def _add(self, file: str, key: str, shape: tuple[int, ...], arch: Architecture) -> None:
        fused = _FUSED_EXPERTS.match(key)
        if not fused:
            if arch.moe_block != "mlp":  # transformers >= 5 renames Mixtral's block_sparse_moe to mlp
                key = key.replace(".mlp.", f".{arch.moe_block}.")
            self._sources[key] = _Source(file, key, None, None, shape)
            return
        prefix, which = fused.groups()
        gate, up, down = arch.expert_projections
        for expert in range(shape[0]):
            base = f"{prefix}.{arch.moe_block}.experts.{expert}"
            if which == "down_proj":
                self._sources[f"{base}.{down}.weight"] = _Source(file, key, expert, None, shape[1:])
            else:
                ffn = shape[1] // 2
                for name, rows in ((gate, slice(0, ffn)), (up, slice(ffn, 2 * ffn))):
                    self._sources[f"{base}.{name}.weight"] = _Source(file, key, expert, rows, (ffn, shape[2]))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name (per-expert names for fused experts) -> shape."""
        return {name: source.shape for name, source in self._sources.items()}

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a copy, contiguous)."""
        source = self._sources[name]
        if source.file not in self._open:
            self._open[source.file] = _safetensors().safe_open(
                str(self.directory / source.file), framework="pt"
            )
        handle = self._open[source.file]
        if source.expert is None:
            tensor: torch.Tensor = handle.get_tensor(source.key)
            return tensor
        part: torch.Tensor = handle.get_slice(source.key)[source.expert]
        return (part[source.rows] if source.rows is not None else part).contiguous().clone()

    def close(self) -> None:
        """Forget the open safetensors files."""
        self._open.clear()


class SafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes`` (a larger
    single tensor gets a shard of its own) and ``model.safetensors.index.json``; one shard is ``model.safetensors``
    without an index, as ``save_pretrained`` does."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise ConversionError(f"max shard size {max_shard_bytes} must be >= 1 byte")
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` (each name once); writes a shard when the next one would not fit."""
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size
        self.names.add(name)

    def _flush(self) -> None:
        temporary = f"shard-{len(self._shards):05d}.tmp"
        _safetensors().torch.save_file(
            self._buffer, str(self.directory / temporary), metadata={"format": "pt"}
        )
        self._shards.append((temporary, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names, write the index when there are several; the file names."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        final = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for (temporary, names), name in zip(self._shards, final, strict=True):
            os.replace(self.directory / temporary, self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final
