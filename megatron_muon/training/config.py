"""Former home of the pretraining config, kept for the user-facing names only: the config is the package
:mod:`megatron_muon.config` (schema, checks, loading, command line). ``python -m megatron_muon.training.config``
still runs the config command line (``python -m megatron_muon.config``)."""

from megatron_muon.config import (
    ConfigError,
    PretrainConfig,
    load_config,
    to_yaml,
    validate,
    validate_tokenizer,
)

__all__ = ["ConfigError", "PretrainConfig", "load_config", "to_yaml", "validate", "validate_tokenizer"]

if __name__ == "__main__":
    import sys

    from megatron_muon.config.cli import main

    sys.exit(main())
