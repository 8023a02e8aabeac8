"""The bottom of the config package: :class:`ConfigError` and the one-line checks every section uses.

Imports nothing of the package, so any module (the schema, the model builder's bridge, the platform checks) can
raise a ``ConfigError`` without pulling in the rest of the config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line naming the key, the value and what is valid."""


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def require_divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    require(dividend % divisor == 0, f"{divisor_name}={divisor} does not divide {dividend_name}={dividend}")


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, f"{name}={value!r} is not one of {choices}")


def require_positive(section: str, obj: Any, *names: str) -> None:
    """Each ``obj.<name>`` is >= 1 (messages name ``section.<name>``)."""
    for name in names:
        value = getattr(obj, name)
        require(value >= 1, f"{section}.{name}={value} must be >= 1")


def product(factors: list[tuple[str, int]]) -> tuple[str, int]:
    """("parallel.pp=2 x parallel.vpp=2 = 4", 4) for [("parallel.pp", 2), ("parallel.vpp", 2)]."""
    value = 1
    for _, factor in factors:
        value *= factor
    text = " x ".join(f"{name}={factor}" for name, factor in factors)
    return (text if len(factors) == 1 else f"{text} = {value}"), value
