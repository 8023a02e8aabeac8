"""Pure tensor math of Muon: Newton–Schulz orthogonalization and update scale rules.

No torch.distributed and no megatron imports here; communication comes in as a callable
(``newton_schulz(..., all_reduce_sum=...)``).
"""

from megatron_muon.ops.newton_schulz import (
    COEFFICIENT_SCHEDULES,
    DEFAULT_GRAM_RESTARTS,
    NORMALIZATION_SAFETY,
    NS_ALGORITHMS,
    choose_ns_algorithm,
    newton_schulz,
    newton_schulz_flops,
    ns_algorithm_flops,
    orthogonality_error,
    resolve_coefficients,
)
from megatron_muon.ops.scaling import SCALE_MODES, update_scale

__all__ = [
    "COEFFICIENT_SCHEDULES",
    "DEFAULT_GRAM_RESTARTS",
    "NORMALIZATION_SAFETY",
    "NS_ALGORITHMS",
    "SCALE_MODES",
    "choose_ns_algorithm",
    "newton_schulz",
    "newton_schulz_flops",
    "ns_algorithm_flops",
    "orthogonality_error",
    "resolve_coefficients",
    "update_scale",
]
