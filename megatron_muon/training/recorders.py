"""What the training loop does around the update besides the optimizer, the same for the trainer and the GPU
rehearsal: QK-clip (measure, then clip after the update) and the expert loads, read with the step's one transfer;
and the metrics known only after the update (Muon's diagnostics, the GPU optimizer time), kept on the device and
read with the next step's transfer (``host_values.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from megatron_muon.training.host_values import DeferredMetrics
from megatron_muon.training.metrics import muon_device_stats

if TYPE_CHECKING:
    from megatron_muon.optim.qk_clip import QKClip
    from megatron_muon.training.expert_load import ExpertLoadTracker

__all__ = ["StepRecorders"]

_DEFERRED = "deferred/"


class StepRecorders:
    """Around each ``train_step``: pass :meth:`read_with_step` to it, then call :meth:`after_step` with its result.

    Args:
        optimizer: the megatron optimizer (Muon members' diagnostics are deferred).
        qk_clip: ``optim.qk_clip.QKClip`` or None; expert_load: ``training.expert_load.ExpertLoadTracker`` or None.
    """

    def __init__(
        self, optimizer: Any, qk_clip: QKClip | None = None, expert_load: ExpertLoadTracker | None = None
    ) -> None:
        self.optimizer, self.qk_clip, self.expert_load = optimizer, qk_clip, expert_load
        self.deferred = DeferredMetrics()

    def read_with_step(self) -> dict[str, Any]:
        """Device values for the step's one transfer (after the backward, before the update): this step's per-layer
        max attention logits and expert loads, and the previous step's deferred metrics."""
        values: dict[str, Any] = {}
        if self.qk_clip is not None:
            values["qk_clip/max_logits"] = self.qk_clip.reduce_maxima()
        if self.expert_load is not None:
            values["expert_load/counts"] = self.expert_load.reduce_counts()
        values.update({_DEFERRED + k: v for k, v in self.deferred.values.items()})
        return values

    def after_step(
        self, result: dict[str, Any], iteration: int
    ) -> tuple[dict[str, float], tuple[int | None, dict[str, Any]]]:
        """After ``train_step``: clip (QK-clip), turn what was read into metrics of ``iteration``, hold this step's
        deferred metrics. Returns (this iteration's metrics, (previous iteration, its deferred metrics)). A skipped
        step only forgets what was recorded."""
        read = result["read"]
        previous = self._resolve_deferred(
            {k.removeprefix(_DEFERRED): v for k, v in read.items() if k.startswith(_DEFERRED)}
        )
        metrics: dict[str, float] = {}
        skipped = result["skipped"]
        if self.qk_clip is not None:
            if skipped:
                self.qk_clip.reset()
            else:
                maxima = _as_list(read["qk_clip/max_logits"])
                if any(math.isnan(v) or v == math.inf for v in maxima):
                    raise ValueError(f"qk-clip: non-finite attention logits per layer: {maxima}")
                self.qk_clip.clip_()
                metrics.update({f"attention/max_logit/layer_{n:02d}": v for n, v in enumerate(maxima, 1)})
        if self.expert_load is not None and not skipped:
            metrics.update(self.expert_load.metrics(_as_list(read["expert_load/counts"])))
        timer = result["optimizer_timer"]
        deferred: dict[str, Any] = {} if skipped else dict(muon_device_stats(self.optimizer))
        if result["optimizer_seconds"] is None:  # a GPU: the CUDA events are read after the next sync point
            deferred["time/optimizer_step_ms"] = lambda: timer.seconds() * 1e3
        self.deferred.hold(iteration, deferred)
        return metrics, previous

    def flush(self) -> tuple[int | None, dict[str, Any]]:
        """The last step's deferred metrics, read now (one transfer, after the loop)."""
        from megatron_muon.training.host_values import read_on_host

        return self._resolve_deferred(read_on_host(self.deferred.values))

    def _resolve_deferred(self, values: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        iteration, held = self.deferred.take()
        resolved = {k: (held[k]() if callable(held[k]) else v) for k, v in values.items() if k in held}
        return iteration, resolved


def _as_list(value: Any) -> list[float]:
    return value if isinstance(value, list) else [value]
