"""Import: a Hugging Face model directory -> a megatron checkpoint our trainer starts from.

The result is a checkpoint root (``latest_checkpointed_iteration.txt`` -> ``iter_0000000``) holding the model
weights only: no optimizer state, schedule or RNG, marked ``weights_only``. Train from it with
``checkpoint.resume=<root> checkpoint.finetune=true`` and the ``model`` section of its ``config.yaml``
(``checkpoint.load_checkpoint(..., finetune=True)``: weights, iteration 0). It is layout-free, as every
distributed checkpoint: tensors are stored with their global shapes and load at any TP/PP/EP/DP. A requested
layout is checked against the model (divisibility of heads, groups, vocabulary, experts, layers) so a
layout the model cannot take fails here rather than at the first training step.

Checks before anything is written: a supported architecture whose settings our model builds
(``hf_maps.model_config_from_hf``), every shard file present, exactly the expected tensors (names, count,
shapes; zero biases may be absent). The model is built at TP1/PP1/EP1 in this process, every tensor of its
``state_dict`` is filled (checked: exactly the model's tensors, one source each) and it is saved through
``checkpoint.save_weights_only`` into a staging directory renamed into place at the end.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_muon.config import ConfigError, ModelConfig, ParallelConfig
from megatron_muon.config.checks import check_model, check_parallel
from megatron_muon.convert.hf_export import (
    check_output_dir,
    compare_tensor_sets,
    make_staging_dir,
    publish_staging_dir,
)
from megatron_muon.convert.hf_files import HFReader, read_hf_config
from megatron_muon.convert.hf_maps import (
    ConversionError,
    merge_to_megatron,
    model_config_from_hf,
    tensor_mappings,
)
from megatron_muon.convert.megatron_io import build_single_process_model, single_process_group

__all__ = ["ImportReport", "Layout", "import_from_hf"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """A parallel layout to check the model against (``parallel`` section of the run config)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    world_size: int | None = None
    """None: the smallest that fits, PP x lcm(TP, EP x expert-TP)."""

    def resolved_world_size(self) -> int:
        """``world_size``, or the smallest world that holds the layout."""
        import math

        return self.world_size or self.pp * math.lcm(
            self.tp, self.ep * (self.tp if self.etp is None else self.etp)
        )

    def describe(self) -> str:
        """``TP2·PP1·EP4·ETP1 (world 8)``."""
        etp = self.tp if self.etp is None else self.etp
        vpp = f"·VPP{self.vpp}" if self.vpp else ""
        return f"TP{self.tp}·PP{self.pp}·EP{self.ep}·ETP{etp}{vpp} (world {self.resolved_world_size()})"


def check_layout(model: ModelConfig, layout: Layout) -> ParallelConfig:
    """``parallel`` config of ``layout``, validated against ``model``; ``ConversionError`` naming the obstacle."""
    parallel = ParallelConfig(
        world_size=layout.resolved_world_size(),
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        etp=layout.etp,
        vpp=layout.vpp,
    )
    try:
        check_parallel(parallel, layout.resolved_world_size(), model)
    except ConfigError as error:
        raise ConversionError(f"layout {layout.describe()} does not fit the model: {error}") from None
    return parallel


@dataclass(kw_only=True, slots=True)
class ImportReport:
    """What :func:`import_from_hf` wrote: from which model directory, where, and the layout it was checked at."""

    source: Path
    output: Path
    architecture: str
    tensors: int
    parameters: int
    layout: str

    def lines(self) -> list[str]:
        """The report, a few printable lines."""
        return [
            f"imported {self.source} ({self.architecture}, {self.tensors} tensors, {self.parameters:,} parameters) "
            f"-> {self.output}",
            f"layout-free checkpoint; checked for {self.layout}. Train from it with checkpoint.resume={self.output} "
            "checkpoint.finetune=true and the model section of its config.yaml",
        ]


def import_from_hf(
    source: str | Path,
    output: str | Path,
    *,
    layout: Layout | None = None,
    seq_length: int | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Convert the Hugging Face model directory ``source`` into the checkpoint root ``output``.

    ``layout``: check the model fits it (None: TP1); ``seq_length``: the training length recorded in the config
    (None: ``max_position_embeddings``, at most 4096); ``precision``: ``fp32`` | ``bf16`` (None: the model's
    ``torch_dtype``).

    Raises:
        ConversionError: one line; nothing is written.
    """
    from tqdm import tqdm

    from megatron_muon.config import CheckpointConfig, PretrainConfig, to_yaml
    from megatron_muon.models.gpt_moe import require_buildable
    from megatron_muon.training.checkpoint import save_weights_only

    source, output = Path(source), Path(output)
    check_output_dir(output, overwrite)
    if precision not in (None, "fp32", "bf16"):
        raise ConversionError(f"precision {precision!r} is not one of ['fp32', 'bf16']")
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory")
    arch, model = model_config_from_hf(
        read_hf_config(source), where=str(source), seq_length=seq_length, precision=precision
    )
    try:
        check_model(model)
        require_buildable(model)
    except ConfigError as error:
        raise ConversionError(f"{source}: {error}") from None
    layout = layout or Layout()
    parallel = check_layout(model, layout)
    mappings = tensor_mappings(arch, model)
    reader = HFReader(source, arch)
    expected = {name: shape for m in mappings for name, shape in zip(m.hf, m.hf_shapes, strict=True)}
    optional = {name for m in mappings if m.layout in ("zero", "unused") for name in m.hf}
    compare_tensor_sets(f"{source} does not match its config.json", reader.shapes, expected, optional)

    staging = make_staging_dir(output)
    try:
        with single_process_group(model_parallel=True):
            megatron_model = build_single_process_model(model)
            state = megatron_model.state_dict()
            filled: set[str] = set()
            groups = list(dict.fromkeys(m.group for m in mappings))
            for group in tqdm(groups, desc="import", unit="group", disable=not progress):
                for mapping in (m for m in mappings if m.group == group):
                    present = [name for name in mapping.hf if name in reader.shapes]
                    if not present:  # an optional zero bias / unused tensor that is absent
                        continue
                    tensor = merge_to_megatron(mapping, [reader.get(name) for name in mapping.hf], model)
                    if tensor is None or mapping.megatron is None:  # HF-only tensors have neither
                        continue
                    # state_dict() tensors share the parameters' storage: one tensor in memory at a time.
                    state[mapping.megatron].copy_(tensor)
                    filled.add(mapping.megatron)
            weights = {name for name in state if not name.endswith("_extra_state")}
            if filled != weights:
                missing = sorted(weights - filled)
                raise ConversionError(
                    f"{len(missing)} model tensor(s) have no Hugging Face source, e.g. {missing[:3]}"
                )
            parameters = sum(p.numel() for p in megatron_model.parameters())
            cfg = PretrainConfig(
                model=model,
                parallel=parallel,
                checkpoint=CheckpointConfig(resume=str(output.resolve()), finetune=True),
            )
            save_weights_only(staging, [megatron_model], config_yaml=to_yaml(cfg))
        reader.close()
        publish_staging_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportReport(
        source=source,
        output=output,
        architecture=arch.name,
        tensors=len(filled),
        parameters=parameters,
        layout=layout.describe(),
    )
