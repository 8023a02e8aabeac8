"""muP coordinate check: does every layer's activation size stay put as the model widens?

Trains a few steps at several widths, with muP (the config as given) and with the standard parametrization
(``--standard`` overrides: muP off, Muon's Moonlight scale), and measures on one fixed batch, per layer type:

- activation RMS after the steps, RMS(h_t), and
- activation update RMS, RMS(h_t − h_0): how far the steps moved the activation (TP5's coordinate check,
  Yang et al. 2022, arXiv:2203.03466, §D.1 / Fig. 5 plots the same against width).

Under muP both should be flat in width; under SP they grow. Writes ``coord_check.csv``, ``coord_check.md`` (the
table) and ``coord_check.png`` (the plot) into ``--out``. Every run is one process (our Trainer, in-process).

    .venv/bin/python tools/coord_check.py launch/configs/mup_shakespeare.yaml --widths 64 128 256 512 --steps 5 \\
        --out runs/coord_check
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from collections import defaultdict
from pathlib import Path

LAYER_TYPES = ("embedding", "attention", "mlp", "moe", "router_logits", "block_output", "logits")
"""What is measured: the embedding output, attention output (after linear_proj), dense MLP output, MoE layer output,
router logits (d_model → experts), each transformer layer's output (the residual stream) and the output logits
(after megatron's muP multiplier)."""

STANDARD_OVERRIDES = (
    "model.mup_base_hidden_size=null model.mup_base_head_dim=null optimizer.muon.scale_mode=moonlight"
)


def _rms(tensor) -> float:
    return float(tensor.double().pow(2).mean().sqrt())


class ActivationRecorder:
    """Forward hooks on one megatron ``GPTModel`` that keep the outputs of each layer type (``LAYER_TYPES``)."""

    def __init__(self, gpt) -> None:
        import torch.nn.functional as F
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.outputs: dict[str, list] = defaultdict(list)
        self._handles = []

        def keep(kind):
            def hook(module, inputs, output):
                tensor = output[0] if isinstance(output, tuple) else output
                self.outputs[kind].append(tensor.detach().clone())

            return hook

        def router_logits(module, inputs):
            self.outputs["router_logits"].append(F.linear(inputs[0], module.weight).detach().clone())

        self._handles.append(gpt.embedding.register_forward_hook(keep("embedding")))
        for layer in gpt.decoder.layers:
            self._handles.append(layer.self_attention.register_forward_hook(keep("attention")))
            is_moe = isinstance(layer.mlp, MoELayer)
            self._handles.append(layer.mlp.register_forward_hook(keep("moe" if is_moe else "mlp")))
            if is_moe:
                self._handles.append(layer.mlp.router.register_forward_pre_hook(router_logits))
            self._handles.append(layer.register_forward_hook(keep("block_output")))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def record(model, batch) -> dict[str, list]:
    """Activations of ``model`` (a DDP-wrapped megatron GPTModel) on ``batch``, forward only, by layer type."""
    import torch

    from megatron_muon.models.gpt_moe import causal_attention_mask

    gpt = model.module
    recorder = ActivationRecorder(gpt)
    gpt.eval()
    try:
        with torch.no_grad():
            logits = model(
                input_ids=batch["tokens"],
                position_ids=batch["position_ids"],
                attention_mask=causal_attention_mask(batch["tokens"].shape[1]),
            )
    finally:
        gpt.train()
        recorder.close()
    outputs = dict(recorder.outputs)
    outputs["logits"] = [logits.detach().clone()]
    return outputs


def router_lr_overrides(base, width: int, router_lr_power: float | None) -> list[str]:
    """Overrides that give the router an AdamW LR ∝ m^−p (p = ``router_lr_power``) instead of muP's rule
    (``mup.adamw_multipliers``: 1/m), through its base multiplier: × m^(1−p). None: the rule as it is."""
    if router_lr_power is None:
        return []
    if base.model.mup_base_hidden_size is None:
        raise SystemExit("--router-lr-power needs muP on (model.mup_base_hidden_size)")
    m = width / base.model.mup_base_hidden_size
    return [
        f"optimizer.router_lr_multiplier={base.optimizer.router_lr_multiplier * m ** (1 - router_lr_power)!r}"
    ]


def measure(
    config: str,
    overrides: list[str],
    width: int,
    steps: int,
    out: Path,
    pg,
    router_lr_power: float | None = None,
) -> list[dict]:
    """Rows (layer_type, act_rms, update_rms) of one run: ``steps`` training steps at ``width``."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_muon.bench.local_run import trial_config, width_overrides
    from megatron_muon.config import load_config, validate
    from megatron_muon.data import build_microbatch_iterator
    from megatron_muon.training.trainer import Trainer

    base = load_config(config, overrides)
    cfg = trial_config(
        config,
        [
            *overrides,
            *width_overrides(base, width),
            *router_lr_overrides(base, width, router_lr_power),
            f"training.train_iters={steps}",
            "training.eval_iters=1",
        ],
        out / "tensorboard" / f"{'mup' if base.model.mup_base_hidden_size else 'standard'}_w{width}",
    )
    cfg.optimizer.warmup_iters = 0
    cfg.optimizer.decay_style = "constant"  # the steps run at the peak LR
    cfg.logging.log_interval = max(steps, 1)
    trainer = Trainer(cfg, validate(cfg, world_size=1), pg)
    batch = next(
        build_microbatch_iterator(
            trainer.valid_dataset,
            micro_batch_size=cfg.training.micro_batch_size,
            consumed_samples=0,
            data_parallel_rank=0,
            data_parallel_size=1,
            num_workers=0,
        )
    )
    model = trainer.model[0]
    before = record(model, batch)
    trainer.train()
    after = record(model, batch)
    get_moe_metrics_tracker().clear()
    rows = []
    for kind in LAYER_TYPES:
        if kind not in after:
            continue
        act = [_rms(a) for a in after[kind]]
        update = [_rms(a - b) for a, b in zip(after[kind], before[kind], strict=True)]
        rows.append(
            {
                "layer_type": kind,
                "act_rms": sum(act) / len(act),
                "update_rms": sum(update) / len(update),
                "act_rms_init": sum(_rms(b) for b in before[kind]) / len(before[kind]),
            }
        )
    return rows


def run_coord_check(
    config,
    overrides,
    standard_overrides,
    widths,
    steps,
    out: Path,
    which,
    router_lr_power: float | None = None,
) -> list[dict]:
    from megatron_muon.bench.local_run import single_process_world

    runs = []
    if which in ("mup", "both"):
        runs.append(
            ("mup" if router_lr_power is None else f"mup, router LR m^-{router_lr_power:g}", list(overrides))
        )
    if which in ("standard", "both"):
        runs.append(("standard", [*overrides, *standard_overrides]))
    rows = []
    with single_process_world() as pg:
        for parametrization, run_overrides in runs:
            for width in widths:
                power = router_lr_power if parametrization.startswith("mup") else None
                for row in measure(config, run_overrides, width, steps, out, pg, power):
                    rows.append({"parametrization": parametrization, "width": width, "steps": steps, **row})
    return rows


def write_outputs(rows: list[dict], out: Path) -> str:
    """CSV, markdown table and PNG plot into ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ["parametrization", "width", "steps", "layer_type", "act_rms", "update_rms", "act_rms_init"]
    with open(out / "coord_check.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    widths = sorted({r["width"] for r in rows})
    lines = [
        "| parametrization | layer type | "
        + " | ".join(f"act RMS w{w}" for w in widths)
        + " | "
        + " | ".join(f"update RMS w{w}" for w in widths)
        + f" | act RMS w{widths[-1]} / w{widths[0]} |",
        "|" + " --- |" * (3 + 2 * len(widths)),
    ]
    by_key = {(r["parametrization"], r["layer_type"], r["width"]): r for r in rows}
    for parametrization in dict.fromkeys(r["parametrization"] for r in rows):
        for kind in LAYER_TYPES:
            if (parametrization, kind, widths[0]) not in by_key:
                continue
            cells = [by_key[(parametrization, kind, w)] for w in widths]
            ratio = cells[-1]["act_rms"] / cells[0]["act_rms"]
            lines.append(
                f"| {parametrization} | {kind} | "
                + " | ".join(f"{c['act_rms']:.3g}" for c in cells)
                + " | "
                + " | ".join(f"{c['update_rms']:.3g}" for c in cells)
                + f" | {ratio:.2f} |"
            )
    table = "\n".join(lines)
    (out / "coord_check.md").write_text(table + "\n")
    _plot(rows, widths, out / "coord_check.png")
    return table


def _plot(rows, widths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parametrizations = list(dict.fromkeys(r["parametrization"] for r in rows))
    figure, axes = plt.subplots(
        2, len(parametrizations), figsize=(6 * len(parametrizations), 8), squeeze=False, sharey="row"
    )
    for column, parametrization in enumerate(parametrizations):
        for row_index, (metric, label) in enumerate(
            (("act_rms", "activation RMS after the steps"), ("update_rms", "RMS(h_t - h_0)"))
        ):
            axis = axes[row_index][column]
            for kind in LAYER_TYPES:
                points = sorted(
                    (r["width"], r[metric])
                    for r in rows
                    if r["parametrization"] == parametrization and r["layer_type"] == kind
                )
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", label=kind)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(widths, [str(w) for w in widths])
            axis.set_xlabel("width (d_model)")
            axis.set_title(f"{parametrization}: {label}")
            axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config with muP on (model.mup_base_hidden_size set)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. data.mock=true")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=5, help="training steps before measuring")
    parser.add_argument("--out", type=Path, default=Path("runs/coord_check"))
    parser.add_argument("--standard", default=STANDARD_OVERRIDES, help="overrides that make the SP baseline")
    parser.add_argument("--which", choices=("both", "mup", "standard"), default="both")
    parser.add_argument(
        "--router-lr-power",
        type=float,
        default=None,
        help="muP runs: the router's AdamW LR ∝ m^-P instead of the rule in mup.py (through its base multiplier)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    rows = run_coord_check(
        args.config,
        args.overrides,
        shlex.split(args.standard),
        args.widths,
        args.steps,
        args.out,
        args.which,
        args.router_lr_power,
    )
    table = write_outputs(rows, args.out)
    print(table)
    print(
        f"wrote {args.out / 'coord_check.csv'}, {args.out / 'coord_check.md'}, {args.out / 'coord_check.png'}"
    )
    return 0 if all(math.isfinite(r["act_rms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
