"""QK-clip (Kimi K2, "MuonClip", arXiv:2507.20534 §2.1): the per-head factors that bring the largest pre-softmax
attention logit of every head back to at most a threshold τ, by shrinking that head's query and key weights.

For a head h whose largest logit of the step was S_h: γ_h = min(1, τ / S_h). Its query rows are multiplied by
γ_h^α and its key rows by γ_h^(1−α) (α = 0.5 in K2), so the logit q·k, bilinear in both, is multiplied by γ_h
and S_h becomes at most τ. Heads with S_h ≤ τ are left exactly as they are.

Grouped-query attention (our rule; K2 describes MHA/MLA, where every head has its own key): a key head is
shared by the g query heads of its group, so it can take only one factor. It takes the most restrictive one,
k_factor = (min_{h in group} γ_h)^(1−α), and each query head keeps its own q_factor = γ_h^α. The new largest
logit of head h is then at most S_h · γ_h^α · γ_h^(1−α) = min(S_h, τ) — every head is clipped, no head is
shrunk by more than its group's worst head needs, and a group whose heads are all under τ is untouched.
(megatron-core 0.19.2's ``Attention.clip_qk`` instead applies the group's worst γ to every query head of the
group, which also clips but shrinks the other query heads of the group needlessly.)

Multi-head latent attention (K2's rule): per head, the non-rotary ("compressed") query and key parts q_C, k_C
take γ^α and γ^(1−α), the rotary query part q_R takes γ, and the rotary key k_R, shared by all heads, is left
alone.
"""

from __future__ import annotations

import torch

__all__ = ["gqa_clip_factors", "mla_clip_factors", "clip_gammas"]


def clip_gammas(max_logits: torch.Tensor, threshold: float, *, check_finite: bool = True) -> torch.Tensor:
    """γ = min(1, τ / S) per head (fp32). Non-finite logits are a ValueError: the run has diverged, and a
    factor of 0 would silently zero the head's weights. ``check_finite=False`` (the training loop, which must not
    read device values on the host per layer and checks the logged maxima itself) gives such heads γ = 1."""
    if not threshold > 0:
        raise ValueError(f"qk-clip threshold={threshold!r} must be > 0")
    max_logits = max_logits.float()
    if check_finite and (torch.isnan(max_logits).any() or torch.isinf(max_logits).any()):
        raise ValueError(f"qk-clip: non-finite attention logits per head: {max_logits.tolist()}")
    gamma = torch.clamp(threshold / max_logits.clamp_min(torch.finfo(torch.float32).tiny), max=1.0)
    return gamma if check_finite else torch.where(torch.isfinite(max_logits), gamma, torch.ones_like(gamma))


def gqa_clip_factors(
    max_logits: torch.Tensor,
    num_query_groups: int,
    threshold: float,
    alpha: float = 0.5,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors for standard (MHA/GQA) attention.

    Args:
        max_logits: ``[heads]`` largest pre-softmax logit of each query head (heads of one group adjacent, as in
            megatron's per-query-group layout).
        num_query_groups: key/value heads; must divide ``heads``.
        threshold: τ. alpha: the query's share of the exponent, in [0, 1].

    Returns ``(q_factor [heads], k_factor [groups])``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"qk-clip alpha={alpha!r} must be in [0, 1]")
    heads = max_logits.numel()
    if num_query_groups < 1 or heads % num_query_groups:
        raise ValueError(f"num_query_groups={num_query_groups} does not divide the {heads} heads")
    gamma = clip_gammas(max_logits, threshold, check_finite=check_finite)
    group_gamma = gamma.view(num_query_groups, -1).amin(dim=1)
    return gamma.pow(alpha), group_gamma.pow(1.0 - alpha)


def mla_clip_factors(
    max_logits: torch.Tensor, threshold: float, alpha: float = 0.5, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors for multi-head latent attention, per head: ``(q_compressed, q_rotary, k_compressed)`` =
    (γ^α, γ, γ^(1−α)); the shared rotary key is not scaled."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"qk-clip alpha={alpha!r} must be in [0, 1]")
    gamma = clip_gammas(max_logits, threshold, check_finite=check_finite)
    return gamma.pow(alpha), gamma, gamma.pow(1.0 - alpha)
