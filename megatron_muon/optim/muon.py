"""Muon: momentum orthogonalized by Newton–Schulz (Keller Jordan, 2024; Liu et al. 2025 "Muon is Scalable").

One step (:meth:`Muon.step`), reading top to bottom: every logical matrix's gradient is brought whole to the
rank that orthogonalizes it; there ``momentum → Newton–Schulz → optional NorMuon`` runs once
(:meth:`Muon._orthogonalize`); each holder gets its piece of the result back and applies ``scale → weight decay +
update`` to its parameter (:meth:`Muon._apply_updates`). Who computes which matrix and how pieces travel is
the placement's business (``placement.MatrixPlacement``: the plan and ``comm.MatrixTransport``), which knows
nothing of this math; on one process every matrix is local and nothing travels. The settings come validated
(``options.py``: frozen, checked once on construction); the step checks nothing again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_muon.ops.gram_newton_schulz import DEFAULT_GRAM_RESTARTS
from megatron_muon.ops.newton_schulz import newton_schulz, orthogonality_error
from megatron_muon.ops.normuon import row_normalize_
from megatron_muon.ops.scaling import update_scale
from megatron_muon.optim.layout import MatrixPiece, local_tensor, whole_tensor_pieces
from megatron_muon.optim.options import (
    MuonHyperparameters,
    MuonPlanSettings,
    NewtonSchulzSettings,
    NorMuonSettings,
)
from megatron_muon.optim.placement import MatrixPlacement
from megatron_muon.optim.plan import MatrixPlan

logger = logging.getLogger(__name__)

# Keys megatron-core's param-group builder and LR/WD scheduler put in a group (optimizer/__init__.py
# `_get_param_groups`, optimizer_param_scheduler.py). Accepted and ignored by the Muon math.
MEGATRON_GROUP_KEYS = frozenset(
    {
        "wd_mult",
        "lr_mult",
        "is_expert_parallel",
        "is_decoupled_lr",
        "default_config",
        "max_lr",
        "min_lr",
        "start_wd",
        "end_wd",
        "optimizer",
        "decoupled_weight_decay",
    }
)
MUON_GROUP_KEYS = frozenset(
    {"params", "lr", "momentum", "nesterov", "weight_decay", "scale_mode", "scale_multiplier"}
)


def momentum_input_(buffer: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Update the momentum ``buffer`` in place with ``grad`` and return what Newton–Schulz orthogonalizes.

    EMA form ``m ← β·m + (1−β)·g`` (Emerging-Optimizers / Keller Jordan's ``lerp``); Nesterov returns
    ``(1−β)·g + β·m``, otherwise ``m``. The (1−β) factor is irrelevant to the update: Newton–Schulz normalizes.
    """
    buffer.lerp_(grad, 1.0 - beta)
    if nesterov:
        return grad.lerp(buffer, beta)
    return buffer


ROW_SECOND_MOMENT = "row_second_moment"
"""Key of NorMuon's per-row second moment in a matrix's state (beside ``"momentum"``)."""


@dataclass(frozen=True, slots=True)
class NorMuonNormalization(NorMuonSettings):
    """NorMuon (Li et al. 2025) as a plug-in of Muon's one step loop: called by ``Muon._orthogonalize`` on every
    batch of freshly orthogonalized matrices, before the scale rule; keeps a per-row second moment (fp32,
    ``[rows]``) in each matrix's state. See ``ops/normuon.py`` for the math; ``beta2`` and ``eps`` are checked on
    construction (``options.NorMuonSettings``)."""

    def __call__(
        self,
        directions: torch.Tensor,
        states: list[dict[str, Any]],
        *,
        full_shape: tuple[int, int],
        **all_reduces: Any,
    ) -> torch.Tensor:
        """``directions``: ``[B, m, n]`` (shards of) orthogonalized matrices of shape ``full_shape``; ``states``:
        their B state dicts."""
        rows = directions.shape[1]
        moments = torch.stack(
            [
                moment
                if (moment := state.get(ROW_SECOND_MOMENT)) is not None
                else torch.zeros(rows, dtype=torch.float32, device=directions.device)
                for state in states
            ]
        )
        normalized = row_normalize_(
            directions,
            moments,
            beta2=self.beta2,
            eps=self.eps,
            num_rows=full_shape[0],
            num_cols=full_shape[1],
            **all_reduces,
        )
        for state, moment in zip(states, moments.unbind(0), strict=True):
            state[ROW_SECOND_MOMENT] = moment.clone()
        return normalized


@dataclass(slots=True)
class _HeldPiece:
    """A matrix piece this rank holds during one step: its parameter, param group and fp32 gradient."""

    param: torch.Tensor
    group: dict[str, Any]
    grad: torch.Tensor


def _check_param_group(group: dict[str, Any], where: str) -> None:
    """A param group's keys, and its values as ``MuonHyperparameters`` checks them; once, at construction."""
    unknown = set(group) - MUON_GROUP_KEYS - MEGATRON_GROUP_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown param-group keys {sorted(unknown)}; valid: "
            f"{sorted(MUON_GROUP_KEYS | MEGATRON_GROUP_KEYS)}"
        )
    try:
        MuonHyperparameters(**{key: group[key] for key in MUON_GROUP_KEYS - {"params"}})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


class Muon(torch.optim.Optimizer):
    """Muon for the hidden weight matrices of a network.

    Args:
        params: tensors or param groups (group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``scale_mode``, ``scale_multiplier``, plus megatron's scheduler keys; anything else is an error).
        lr: learning rate (the update of one logical matrix has spectral norm ≈ lr·scale).
        momentum: β of the momentum EMA, in [0, 1).
        nesterov: use the Nesterov look-ahead.
        weight_decay: decoupled weight decay, ``W ← W·(1 − lr·wd)`` (Moonlight's recipe).
        scale_mode: update scale rule of ``ops.scaling`` (``spectral`` default: √(fan_out/fan_in)).
        ns_steps, coefficients, compute_dtype: Newton–Schulz settings (``ops.newton_schulz``).
        ns_fp8_steps: how many of the first Newton–Schulz steps run their GEMMs in FP8 (experimental;
            ``ops/newton_schulz_fp8.py``; needs a device with FP8 ``torch._scaled_mm``).
        pieces: for each param group, for each parameter, its logical matrices (``layout.MatrixPiece``); by
            default each 2-D parameter is one matrix and each N-D one a stack.
        placement: where each matrix is orthogonalized and how its pieces travel
            (``placement.MatrixPlacement``: the plan and ``comm.MatrixTransport``); default: one process.
        post_orthogonalize: a plug-in applied to each batch of orthogonalized matrices before the scale rule
            (``NorMuonNormalization``); ``None``: plain Muon.
        ns_algorithm: ``auto`` | ``standard`` | ``gram`` Newton–Schulz for the default placement's plan
            (default ``auto``; ``standard`` with FP8 steps); with a ``placement``, its plan decides and
            this must be ``None`` or agree with it.
        ns_gram_restarts: the iterations after which Gram Newton–Schulz restarts (``ops/gram_newton_schulz.py``).

    The values are checked once, here (``options.MuonHyperparameters`` for the defaults and each param group,
    ``options.NewtonSchulzSettings``), with one-line ``ValueError``s; the step trusts them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale_mode: str = "spectral",
        ns_steps: int = 5,
        coefficients: str | Sequence[Sequence[float]] = "quintic",
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        pieces: list[list[list[MatrixPiece]]] | None = None,
        placement: MatrixPlacement | None = None,
        post_orthogonalize: NorMuonNormalization | None = None,
        ns_fp8_steps: int = 0,
        ns_algorithm: str | None = None,
        ns_gram_restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS,
    ) -> None:
        # Checked before the param groups, so a bad schedule is reported first.
        self.newton_schulz = NewtonSchulzSettings(
            steps=ns_steps,
            coefficients=coefficients,
            compute_dtype=compute_dtype,
            fp8_steps=ns_fp8_steps,
            gram_restarts=tuple(ns_gram_restarts),
        )
        defaults = MuonHyperparameters(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale_mode=scale_mode
        )
        super().__init__(params, defaults.as_group())
        for index, group in enumerate(self.param_groups):
            _check_param_group(group, f"param group {index}")
        self.post_orthogonalize = post_orthogonalize
        if pieces is None:
            pieces = [
                [whole_tensor_pieces(f"group{g}.param{i}", p) for i, p in enumerate(group["params"])]
                for g, group in enumerate(self.param_groups)
            ]
        if [len(g) for g in pieces] != [len(group["params"]) for group in self.param_groups]:
            raise ValueError("pieces must list one entry per parameter of every param group")
        self.pieces = pieces
        if placement is None:
            placement = MatrixPlacement(
                [p for group in pieces for ps in group for p in ps],
                MuonPlanSettings(
                    ns_algorithm=ns_algorithm or ("standard" if ns_fp8_steps else "auto"),
                    gram_restarts=self.newton_schulz.gram_restarts,
                ),
            )
        elif ns_algorithm is not None and ns_algorithm != placement.settings.ns_algorithm:
            raise ValueError(
                f"ns_algorithm={ns_algorithm!r} but the placement's plan was built with "
                f"{placement.settings.ns_algorithm!r}: pass it in MatrixPlacement's MuonPlanSettings (or leave "
                "ns_algorithm None)"
            )
        self.placement = placement
        self.stats: dict[str, Any] = {}
        """Diagnostics of the last step: ``update_rms/<matrix kind>`` (lr-free, over the pieces this rank
        holds) and ``ns_orthogonality_error`` of one matrix this rank orthogonalized (a different one each step),
        as 0-dim device tensors (no host read in the step); ``training.metrics.muon_stats`` reads them."""
        self._step_count = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "pieces", None) is not None:
            raise RuntimeError("Muon cannot take new param groups after construction (its plan is fixed)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Muon step over every parameter that has a gradient. Collective over the grid group: every rank
        of the grid calls it in the same step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        placement, transport = self.placement, self.placement.transport
        held = self._held_pieces()
        grads = {key: piece.grad for key, piece in held.items()}
        # 0. Matrices whose momentum stays with their shards (the distributed optimizer): each holder updates its
        #    shard's momentum here and sends the owner the Newton–Schulz input instead of the gradient.
        for key, piece in held.items():
            if placement.matrix(key).momentum_with_shards:
                grads[key] = self._momentum_input(piece.param, key, piece.grad, piece.group)

        # 1. The gradient pieces travel to the ranks that orthogonalize whole matrices (every bucket in flight).
        gathers = transport.start_gathers(grads)
        # 2. Meanwhile, the matrices orthogonalized on their shards (Gram matrix all-reduced in Newton–Schulz).
        directions = self._orthogonalize(placement.sharded_matrices(), grads, held, sharded=True)
        # 3. Bucket by bucket: whole gradients in, orthogonalized once here, each holder's piece sent back.
        returns = []
        whole_directions: dict[str, torch.Tensor] = {}
        for bucket, gather in enumerate(gathers):
            whole_grads = gather.wait()
            computed = self._orthogonalize([placement.matrix(k) for k in whole_grads], whole_grads, held)
            whole_directions.update(computed)
            returns.append(transport.start_return(bucket, computed))
        for pending in returns:
            directions.update(pending.wait())
        # 4. Scale, weight decay and update, on every parameter from the pieces of the directions it holds.
        self._apply_updates(directions)
        self._sample_orthogonality(whole_directions)
        return loss

    def _held_pieces(self) -> dict[str, _HeldPiece]:
        """Every matrix piece this rank holds, with its fp32 gradient. A parameter without gradient still takes
        part in its matrices' collectives (with zeros); a matrix held only here and without gradient is left out
        and keeps its momentum as it is (torch optimizers skip parameters whose grad is None; megatron always
        provides grads, so shared matrices always have one)."""
        held = {}
        for g, group in enumerate(self.param_groups):
            for param, pieces in zip(group["params"], self.pieces[g], strict=True):
                for piece in pieces:
                    if not piece.is_held:  # an FSDP part without rows here
                        continue
                    if param.grad is not None:
                        grad = piece.read(local_tensor(param.grad)).to(torch.float32)
                    elif self.placement.held_only_here(piece.key):
                        continue
                    else:
                        grad = torch.zeros(piece.local_shape, dtype=torch.float32, device=param.device)
                    held[piece.key] = _HeldPiece(param=param, group=group, grad=grad)
        return held

    def _orthogonalize(
        self,
        matrices: Sequence[MatrixPlan],
        grads: Mapping[str, torch.Tensor],
        held: Mapping[str, _HeldPiece],
        *,
        sharded: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``momentum → Newton–Schulz → NorMuon`` for ``matrices`` (whole, or this rank's shards when
        ``sharded``), from their ``grads``; one batched Newton–Schulz call per shape. Returns key → orthogonalized
        matrix (or shard), before the scale rule."""
        batches: dict[tuple[Any, ...], list[MatrixPlan]] = defaultdict(list)
        for matrix in matrices:
            if matrix.key not in held:
                continue
            batch_key: tuple[Any, ...] = (tuple(grads[matrix.key].shape), matrix.shape, matrix.ns_algorithm)
            if sharded:
                batch_key += (matrix.shard_group, matrix.shard_dim)
            batches[batch_key].append(matrix)
        results: dict[str, torch.Tensor] = {}
        for batch_key in sorted(batches):
            batch = batches[batch_key]
            # Momentum (fp32, in the matrix's state on the rank that computes it; already applied by the shards'
            # holders for momentum_with_shards).
            inputs = [
                grads[m.key]
                if m.momentum_with_shards
                else self._momentum_input(held[m.key].param, m.key, grads[m.key], held[m.key].group)
                for m in batch
            ]
            # Newton–Schulz, batched; on shards the Gram matrix is summed over the shard group.
            full_shape = batch[0].shape
            gram_hook: dict[str, Any] = {}
            row_reductions: dict[str, Any] = {}
            if sharded:
                all_reduce_sum = self.placement.gram_all_reduce(batch[0])
                gram_hook = {"all_reduce_sum": all_reduce_sum, "transpose": full_shape[0] > full_shape[1]}
                # NorMuon's row statistics: rows split -> sum the totals; columns split -> sum each row.
                row_reductions = {
                    "total_all_reduce" if batch[0].shard_dim == 0 else "row_sum_all_reduce": all_reduce_sum
                }
            config = self.newton_schulz
            orthogonal = newton_schulz(
                torch.stack(inputs),
                steps=config.steps,
                coefficients=config.coefficients,
                compute_dtype=config.compute_dtype,
                fp8_steps=config.fp8_steps,
                algorithm=batch[0].ns_algorithm,
                gram_restarts=config.gram_restarts,
                **gram_hook,
            )
            # NorMuon (optional): per-row normalization by a running second moment.
            if self.post_orthogonalize is not None:
                states = [self.matrix_state(held[m.key].param, m.key) for m in batch]
                orthogonal = self.post_orthogonalize(
                    orthogonal, states, full_shape=full_shape, **row_reductions
                )
            results.update(zip((m.key for m in batch), orthogonal.unbind(0), strict=True))
        return results

    def _momentum_input(
        self, param: torch.Tensor, key: str, grad: torch.Tensor, hyper: Mapping[str, Any]
    ) -> torch.Tensor:
        """Update matrix ``key``'s fp32 momentum (of the whole matrix, or of this rank's shard) with ``grad``;
        return what Newton–Schulz orthogonalizes."""
        state = self.matrix_state(param, key)
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        return momentum_input_(state["momentum"], grad, hyper["momentum"], hyper["nesterov"])

    def _apply_updates(self, directions: Mapping[str, torch.Tensor]) -> None:
        """For every parameter with a gradient: its direction assembled from its pieces, each scaled by its
        logical matrix's rule; then ``W ← W·(1 − lr·wd) − lr·D`` (decoupled weight decay)."""
        # Sums of squares stay on the device (no host read per matrix); the trainer reads them with the next
        # step's one transfer (training/host_values.py).
        update_sq: dict[str, list[Any]] = defaultdict(lambda: [0.0, 0])
        for g, group in enumerate(self.param_groups):
            for param, pieces in zip(group["params"], self.pieces[g], strict=True):
                if not pieces or param.grad is None:
                    continue
                local = local_tensor(param)  # a fully sharded parameter: this rank's slice
                direction = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
                for piece in (p for p in pieces if p.is_held):
                    scale = update_scale(group["scale_mode"], piece.shape[0], piece.shape[1])
                    scaled = directions[piece.key] * (scale * group["scale_multiplier"])
                    piece.write(direction, scaled)
                    totals = update_sq[matrix_kind(piece.key)]
                    totals[0] = totals[0] + scaled.square().sum()
                    totals[1] += scaled.numel()
                if group["weight_decay"] != 0.0:
                    local.mul_(1.0 - group["lr"] * group["weight_decay"])
                local.add_(direction.to(local.dtype), alpha=-group["lr"])
        self.stats.update({f"update_rms/{k}": (s / max(n, 1)) ** 0.5 for k, (s, n) in update_sq.items()})

    def _sample_orthogonality(self, whole_directions: Mapping[str, torch.Tensor]) -> None:
        """Orthogonality error of one matrix this rank orthogonalized whole, a different one each step."""
        self._step_count += 1
        if not whole_directions:
            return
        keys = sorted(whole_directions)
        key = keys[self._step_count % len(keys)]
        self.stats["ns_orthogonality_error"] = orthogonality_error(whole_directions[key]).detach()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep momentum (and NorMuon's second moment) in fp32:
        ``Optimizer.load_state_dict`` casts floating state to each parameter's dtype, which would turn the fp32
        momentum of a bf16 parameter into bf16."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        fp32_keys = ("momentum", ROW_SECOND_MOMENT)
        momenta = {
            pid: {
                (k, name): v[name]
                for k, v in state.items()
                if isinstance(v, dict)
                for name in fp32_keys
                if name in v
            }
            for pid, state in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params, strict=True):
            for (key, name), momentum in momenta.get(pid, {}).items():
                self.state[param][key][name] = momentum.to(
                    device=param.device, dtype=torch.float32, copy=True
                )

    def matrix_state(self, param: torch.Tensor, key: str) -> dict[str, Any]:
        """State of the logical matrix ``key`` held in ``param``'s optimizer state (created on first use)."""
        state: dict[str, Any] = self.state[param].setdefault(key, {})
        return state


def matrix_kind(key: str) -> str:
    """A short name for the kind of a logical matrix, for diagnostics: ``attention.q``, ``mlp.gate``,
    ``expert.fc2`` ... (from its layout key)."""
    module, _, part = key.partition("/")
    name = module.rsplit(".", 2)[-2] if module.endswith(".weight") else module.rsplit(".", 1)[-1]
    if "shared_expert" in module:
        prefix = "shared_expert"
    elif "experts" in module:
        prefix = "expert"
    elif "attention" in module:
        prefix = "attention"
    elif ".mlp." in module:
        prefix = "mlp"
    else:
        prefix = "matrix"
    name = name.removeprefix("linear_")
    return f"{prefix}.{part.split('.')[0]}" if part else f"{prefix}.{name}"
