"""The pieces every config section shares: :class:`ConfigError`, the one-line checks, the valid choices."""

from __future__ import annotations

import typing
from typing import Any

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
PRECISIONS = ("fp32", "bf16")
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}
"""Our fp8 names -> megatron's ``TransformerConfig.fp8_recipe`` (per-tensor current scaling is "tensorwise")."""
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
RESUME_MODES = ("auto", "none")


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line naming the key, the value and what is valid."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    _require(dividend % divisor == 0, f"{divisor_name}={divisor} does not divide {dividend_name}={dividend}")


def _require_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    _require(value in choices, f"{name}={value!r} is not one of {choices}")


def _product(factors: list[tuple[str, int]]) -> tuple[str, int]:
    """("parallel.pp=2 x parallel.vpp=2 = 4", 4) for [("parallel.pp", 2), ("parallel.vpp", 2)]."""
    value = 1
    for _, factor in factors:
        value *= factor
    text = " x ".join(f"{name}={factor}" for name, factor in factors)
    return (text if len(factors) == 1 else f"{text} = {value}"), value


def _require_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 1, f"{section}.{name}={value} must be >= 1")
