"""Export: a megatron distributed checkpoint (saved at any TP/PP/EP/DP layout) -> a Hugging Face model directory.

One CPU process, no model and no model-parallel groups (``megatron_io``: plain tensors read per layer). Writes
``config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json``) and, when the run's
SentencePiece tokenizer is found, ``tokenizer.model`` + ``tokenizer_config.json`` (a ``LlamaTokenizer`` without
added prefix space or BOS/EOS, which tokenizes as our tokenizer does). Optimizer state, Muon momentum and RNG
are dropped. A muP model's attention scale and logit multiplier are folded into ``q_norm`` / ``q_proj`` and
``lm_head`` (``hf_maps.mup_folding``).

Checks before anything is written: the checkpoint is complete (every shard file, long enough), its model tensors
are exactly those its config implies (count, names, global shapes), and an architecture represents the model
(``hf_maps.obstacles``). Files go to a staging directory beside the output, renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_muon.config import ConfigError, ModelConfig
from megatron_muon.config.checks import check_model
from megatron_muon.convert.hf_files import CONFIG_FILE, INDEX_FILE, SafetensorsWriter, parse_size
from megatron_muon.convert.hf_maps import (
    ConversionError,
    choose_architecture,
    fold_into_hf,
    hf_config_from_model,
    megatron_shapes_of,
    split_to_hf,
    tensor_mappings,
)
from megatron_muon.convert.megatron_io import (
    checkpoint_model_tensors,
    load_canonical_tensors,
    resolve_checkpoint_dir,
    single_process_group,
)
from megatron_muon.training.checkpoint import CONFIG_FILENAME

__all__ = [
    "ExportReport",
    "check_output_dir",
    "compare_tensor_sets",
    "export_to_hf",
    "load_run_config",
    "make_staging_dir",
    "publish_staging_dir",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEEP_FP32 = (
    "e_score_correction_bias",
)  # transformers keeps the expert bias in fp32 (_keep_in_fp32_modules)


@dataclass(kw_only=True, slots=True)
class ExportReport:
    """What :func:`export_to_hf` wrote: from which checkpoint, where, as which architecture and dtype."""

    checkpoint: Path
    output: Path
    architecture: str
    dtype: str
    tensors: int
    parameters: int
    files: list[str] = field(default_factory=list)
    tokenizer: str = "none"

    def _describe_files(self) -> str:
        if len(self.files) == 1:
            return self.files[0]
        return f"{len(self.files)} shards {self.files[0]} ... {self.files[-1]} + {INDEX_FILE}"

    def lines(self) -> list[str]:
        """The report, a few printable lines."""
        return [
            f"exported {self.checkpoint} -> {self.output}",
            f"architecture {self.architecture}, {self.tensors} tensors, {self.parameters:,} parameters, {self.dtype}",
            f"files: {self._describe_files()}; tokenizer: {self.tokenizer}",
        ]


def load_run_config(checkpoint_dir: Path, config_path: str | Path | None) -> tuple[ModelConfig, object]:
    """The run config saved beside the shards (``config.yaml``) or ``config_path``: (model section, whole)."""
    from megatron_muon.config import load_config

    path = Path(config_path) if config_path is not None else checkpoint_dir / CONFIG_FILENAME
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; pass the run's config with --config RUN.yaml")
    try:
        cfg = load_config(str(path))
        check_model(cfg.model)
    except ConfigError as error:
        raise ConversionError(f"{path}: {error}") from None
    return cfg.model, cfg


def compare_tensor_sets(
    what: str,
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    optional: Collection[str] = frozenset(),
) -> None:
    """Raise one line when ``found`` (name -> shape) is not exactly ``expected``: counts and first examples of
    missing, unexpected and wrongly shaped tensors. ``optional`` names may be absent."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{name} {tuple(found[name])} (expected {tuple(expected[name])})"
        for name in set(found) & set(expected)
        if tuple(found[name]) != tuple(expected[name])
    )
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
        if items:
            parts.append(f"{len(items)} tensor(s) {label}, e.g. {'; '.join(items[:3])}")
    if parts:
        raise ConversionError(f"{what}: {len(found)} tensors, expected {len(expected)}: {'; '.join(parts)}")


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an ``output`` that is a file, or a non-empty directory unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"output {output} exists and is not empty (--force replaces it)")


def make_staging_dir(output: Path) -> Path:
    """A fresh ``.<name>.partial`` directory beside ``output``, renamed into place by :func:`publish_staging_dir`."""
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_staging_dir(staging: Path, output: Path) -> None:
    """Replace ``output`` by the complete ``staging`` directory."""
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def _find_tokenizer(cfg: object, tokenizer: str | Path | None) -> Path | None:
    """The SentencePiece model to ship: ``tokenizer`` (a directory or file), else the run's
    ``data.tokenizer_path`` when it exists here."""
    candidate = (
        tokenizer if tokenizer is not None else getattr(getattr(cfg, "data", None), "tokenizer_path", None)
    )
    if candidate is None:
        return None
    path = Path(candidate)
    path = path / "tokenizer.model" if path.is_dir() else path
    if path.is_file():
        return path
    if tokenizer is not None:
        raise ConversionError(f"tokenizer {tokenizer}: no tokenizer.model there")
    return None


def _write_tokenizer(model_file: Path, staging: Path, model: ModelConfig) -> tuple[int | None, int | None]:
    """Copy the SentencePiece model and describe it for ``AutoTokenizer``; returns (bos id, eos id)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    shutil.copyfile(model_file, staging / "tokenizer.model")
    ids = {name: getattr(processor, f"{name}_id")() for name in ("bos", "eos", "unk", "pad")}
    tokens = {name: processor.id_to_piece(i) for name, i in ids.items() if i >= 0}
    config = {
        # Our tokenizer adds no dummy prefix and no BOS/EOS (data/tokenizer.py); LlamaTokenizer with these
        # settings splits text exactly as SentencePiece does (checked in tests/distributed/test_convert_checkpoint.py).
        "tokenizer_class": "LlamaTokenizer",
        "add_prefix_space": False,
        "legacy": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model.seq_length,
        **{f"{name}_token": piece for name, piece in tokens.items()},
    }
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return (ids["bos"] if ids["bos"] >= 0 else None), (ids["eos"] if ids["eos"] >= 0 else None)


def export_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    architecture: str = "auto",
    config_path: str | Path | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    tokenizer: str | Path | None = None,
    with_tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Export ``checkpoint`` (a checkpoint root: its latest; or one ``iter_*`` directory) to ``output``.

    ``architecture``: an ``hf_maps.ARCHITECTURES`` name or ``auto`` (the first that represents the model);
    ``config_path``: the run YAML when the checkpoint has no usable ``config.yaml``; ``dtype``: ``float32`` |
    ``bfloat16`` | ``float16`` (None: the checkpoint's); ``tokenizer``: the SentencePiece model or its directory
    (None: the run's ``data.tokenizer_path`` if present).

    Raises:
        ConversionError: one line; nothing is written.
    """
    from tqdm import tqdm

    output = Path(output)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(_DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    check_output_dir(output, overwrite)
    # Every check reads metadata and config only; the process group is needed to read tensor data.
    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    model, cfg = load_run_config(checkpoint_dir, config_path)
    arch = choose_architecture(model, architecture)
    mappings = tensor_mappings(arch, model)
    saved = checkpoint_model_tensors(checkpoint_dir)
    expected = megatron_shapes_of(mappings)
    compare_tensor_sets(
        f"checkpoint {checkpoint_dir} does not match its model config",
        {name: entry.shape for name, entry in saved.items()},
        expected,
    )
    target = _DTYPES[dtype] if dtype is not None else saved["embedding.word_embeddings.weight"].dtype
    dtype_name = next(name for name, value in _DTYPES.items() if value == target)
    model_file = _find_tokenizer(cfg, tokenizer) if with_tokenizer else None

    staging = make_staging_dir(output)
    try:
        writer = SafetensorsWriter(staging, max_shard_bytes)
        groups = list(dict.fromkeys(m.group for m in mappings))
        parameters = 0
        with single_process_group():
            for group in tqdm(groups, desc="export", unit="group", disable=not progress):
                members = [m for m in mappings if m.group == group]
                wanted = {m.megatron: saved[m.megatron] for m in members if m.megatron is not None}
                tensors = load_canonical_tensors(checkpoint_dir, wanted)
                for mapping in members:
                    tensor = tensors.get(mapping.megatron) if mapping.megatron is not None else None
                    parts = split_to_hf(mapping, tensor, model)
                    for name, part, shape in zip(mapping.hf, parts, mapping.hf_shapes, strict=True):
                        assert tuple(part.shape) == shape, (name, tuple(part.shape), shape)
                        part = fold_into_hf(name, part, model)
                        if not name.endswith(_KEEP_FP32):
                            part = part.to(target)
                        writer.add(name, part)
                        parameters += part.numel() if mapping.layout not in ("zero", "unused") else 0
        written = len(writer.names)
        wanted_count = sum(len(m.hf) for m in mappings)
        if written != wanted_count:
            raise ConversionError(f"wrote {written} tensors, expected {wanted_count}")
        files = writer.close()
        bos, eos = _write_tokenizer(model_file, staging, model) if model_file is not None else (None, None)
        config = hf_config_from_model(arch, model, dtype=dtype_name, bos_token_id=bos, eos_token_id=eos)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        publish_staging_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(
        checkpoint=checkpoint_dir,
        output=output,
        architecture=arch.name,
        dtype=dtype_name,
        tensors=written,
        parameters=parameters,
        files=files,
        tokenizer=str(model_file) if model_file is not None else "none",
    )
