"""Muon for megatron-core: the optimizer, its builder and its settings, importable from here.

    from megatron_muon.optim import Muon, MuonConfig, build_optimizer

The names are loaded on first use (PEP 562), so ``import megatron_muon.optim.options`` — what loading a run config
does — imports neither megatron-core (``build.py`` does) nor the step (``muon.py``). The modules themselves:
``docs/architecture.md`` ("One Muon step").
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_muon.optim.build import build_optimizer
    from megatron_muon.optim.muon import Muon, NorMuonNormalization
    from megatron_muon.optim.options import (
        MuonConfig,
        MuonHyperparameters,
        MuonPlanSettings,
        MuonSettings,
        NewtonSchulzSettings,
        NorMuonSettings,
        QKClipConfig,
    )
    from megatron_muon.optim.placement import MatrixPlacement

_HOME_OF = {
    "Muon": "muon",
    "NorMuonNormalization": "muon",
    "build_optimizer": "build",
    "MuonConfig": "options",
    "QKClipConfig": "options",
    "MuonSettings": "options",
    "MuonHyperparameters": "options",
    "NewtonSchulzSettings": "options",
    "MuonPlanSettings": "options",
    "NorMuonSettings": "options",
    "MatrixPlacement": "placement",
}
"""Each public name -> its module in this package."""

__all__ = [
    "MatrixPlacement",
    "Muon",
    "MuonConfig",
    "MuonHyperparameters",
    "MuonPlanSettings",
    "MuonSettings",
    "NewtonSchulzSettings",
    "NorMuonNormalization",
    "NorMuonSettings",
    "QKClipConfig",
    "build_optimizer",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
