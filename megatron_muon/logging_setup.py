"""The one place where known, benign third-party warnings are silenced, so a run's output is the launcher's lines,
the iteration lines and real problems.

Each entry below names the warning, who emits it and why a user of this project cannot act on it. Everything
else still prints. ``logging.verbose: true`` in the run's config (or the override ``logging.verbose=true``)
skips this module and prints them all. Must run before megatron-core is imported: most of these are emitted at
import time. Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_WARNINGS", "KnownWarning", "silence_known_warnings"]


@dataclass(frozen=True, slots=True)
class KnownWarning:
    """A benign message: a ``warnings.warn`` (``logger`` None) or a record of the named ``logging`` logger."""

    message: str
    """Regular expression matched against the start of the message."""
    why: str
    """Who emits it and why it needs no action here."""
    category: type[Warning] = UserWarning
    """For ``warnings.warn`` messages: the warning class."""
    logger: str | None = None
    """For log records: the emitting logger's name."""
    cpu_only: bool = False
    """Silenced only without CUDA (on a GPU the advice is worth following)."""


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        r"No CUDA runtime is found",
        "torch.utils.cpp_extension at import, on every CPU machine: this project compiles no extension",
        logger="torch.utils.cpp_extension",
        cpu_only=True,
    ),
    KnownWarning(
        r"(Transformer Engine and )?Apex (is|are) not installed",
        "megatron-core 0.19.2 at import (optimizer, clip_grads, FSDP, norms, layer specs): Apex and Transformer "
        "Engine are optional here; megatron's torch fallbacks are the intended path on CPU and without TE",
    ),
    KnownWarning(
        r"full scope is deprecated\. Use empty cuda_graph_modules",
        "megatron-core 0.19.2's TransformerConfig warns about its own default cuda_graph_scope; CUDA graphs are off",
    ),
    KnownWarning(
        r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1",
        "megatron-core 0.19.2 expert linears at expert-TP 1 under a TP > 1 model: sequence parallelism is "
        "required by MoE + TP and is correctly off inside the experts",
    ),
    KnownWarning(
        r"When using sequence parallelism it is recommended to set the environment variable "
        r"CUDA_DEVICE_MAX_CONNECTIONS",
        "megatron-core 0.19.2 tensor_parallel layers: a CUDA kernel-ordering hint, meaningless on the CPU",
        cpu_only=True,
    ),
    KnownWarning(
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        "torch 2.14 on megatron-core 0.19.2's collectives (DDP buffers, sequence parallelism): megatron's call "
        "sites, fixed by upgrading megatron-core, not by the user",
        category=FutureWarning,
    ),
    KnownWarning(
        r"GPTModel IS DEPRECATED",
        "megatron-core 0.19.2 when building a GPTModel: it is the model class 0.19.2 supports for this spec",
        logger="megatron.core.models.gpt.gpt_model",
    ),
    KnownWarning(
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
        r"single process",
        "torch's distributed checkpoint on every checkpoint load: megatron-core 0.19.2's torch strategy calls it "
        "with no_dist=True on purpose (each rank reads the shards megatron planned for it)",
    ),
    KnownWarning(
        r"The argument order of load has been changed",
        "torch's distributed checkpoint on every checkpoint load: megatron-core 0.19.2's call site",
    ),
    KnownWarning(
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "torch's distributed checkpoint planner on every checkpoint load: megatron-core 0.19.2's "
        "dist_checkpointing is built on torch's ShardedTensor",
        category=FutureWarning,
    ),
    KnownWarning(
        r"MCore's async save is deprecated",
        "megatron-core 0.19.2 dist_checkpointing's torch strategy on every save, also a synchronous one",
        logger="megatron.core.dist_checkpointing.strategies.torch",
    ),
)


class _DropMessages(logging.Filter):
    """A ``logging`` filter that drops records whose message starts with one of the patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def silence_known_warnings(*, verbose: bool = False, cuda: bool | None = None) -> None:
    """Silence ``KNOWN_WARNINGS`` in this process (nothing when ``verbose``).

    ``cuda``: whether this process runs on a GPU (default: ``torch.cuda.is_available()``); entries marked
    ``cpu_only`` stay audible on a GPU. Calling it twice adds nothing new.
    """
    if verbose:
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    by_logger: dict[str, list[str]] = {}
    for known in KNOWN_WARNINGS:
        if known.cpu_only and cuda:
            continue
        if known.logger is None:
            warnings.filterwarnings("ignore", message=known.message, category=known.category)
        else:
            by_logger.setdefault(known.logger, []).append(known.message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(patterns))
