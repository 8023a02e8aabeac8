"""The pretraining config, one way from bottom to top (no module imports one above it):

- ``errors.py``: :class:`ConfigError` and the one-line checks;
- ``schema.py``: the typed dataclasses, one per section, composed in :class:`PretrainConfig`;
- ``checks.py``: whether a config can run, decided in one place per field (:func:`validate`);
- ``loading.py``: YAML + dotted overrides into the schema with OmegaConf (:func:`load_config`, :func:`to_yaml`);
- ``param_count.py``: the parameters of the model a ``ModelConfig`` describes (beside ``schema.py``: arithmetic on
  it alone, for ``cli.py``, the trainer's MFU and the dry runs);
- ``cli.py``: ``python -m megatron_muon.config CONFIG [overrides] [--print]`` and :func:`describe`.

The model builder (``megatron_muon/models/``) takes the ``ModelConfig`` itself. This initializer re-exports the
public names of ``errors``, ``schema``, ``checks`` and ``loading``.
"""

from megatron_muon.config.checks import validate, validate_tokenizer
from megatron_muon.config.errors import ConfigError
from megatron_muon.config.loading import load_config, to_yaml
from megatron_muon.config.schema import (
    CheckpointConfig,
    DataBlendEntry,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizationConfig,
    ParallelConfig,
    ParallelDims,
    PretrainConfig,
    TrainingConfig,
    padded_vocab_size,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataBlendEntry",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizationConfig",
    "ParallelConfig",
    "ParallelDims",
    "PretrainConfig",
    "TrainingConfig",
    "load_config",
    "padded_vocab_size",
    "to_yaml",
    "validate",
    "validate_tokenizer",
]
