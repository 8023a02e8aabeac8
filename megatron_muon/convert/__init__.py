"""Checkpoint conversion: megatron (ours) <-> Hugging Face ``transformers`` MoE architectures, and a layout
check for megatron -> megatron. ``tools/convert_checkpoint.py`` is the command line; docs/conversion.md the guide.

- ``hf_maps``: the explicit name / layout maps and config translation per architecture (pure).
- ``megatron_io``: reading a distributed checkpoint's model tensors in one process; building our model.
- ``hf_files``: safetensors directories (index, shards, fused or per-expert experts).
- ``hf_export`` / ``hf_import`` / ``reshard``: the three subcommands.
"""

from megatron_muon.convert.hf_export import ExportReport, export_to_hf
from megatron_muon.convert.hf_import import ImportReport, Layout, import_from_hf
from megatron_muon.convert.hf_maps import ARCHITECTURES, ConversionError
from megatron_muon.convert.reshard import ReshardReport, verify_reshard

__all__ = [
    "ARCHITECTURES",
    "ConversionError",
    "ExportReport",
    "ImportReport",
    "Layout",
    "ReshardReport",
    "export_to_hf",
    "import_from_hf",
    "verify_reshard",
]
