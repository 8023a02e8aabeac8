"""The planner against the optimizer benchmark (``tools/bench_muon_step.py``, docs/benchmarks.md): the same
model and world-4 layouts with the CPU cost model, predicted Muon state per rank and step-time ratios between
contenders, next to the figures the benchmark measured. Run: ``python -m megatron_muon.planning.calibration``."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The benchmark's model (ModelConfig in docs/benchmarks.md), fp32, router in Muon (megatron's routing).
MODEL = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.ffn_hidden_size=512",
    "model.moe_ffn_hidden_size=256",
    "model.num_attention_heads=8",
    "model.num_query_groups=4",
    "model.num_moe_experts=8",
    "model.vocab_size=512",
    "model.first_k_dense_layers=1",
    "model.precision=fp32",
    "optimizer.muon.router=muon",
    "optimizer.muon.compute_dtype=float32",
    "parallel.world_size=4",
    "parallel.pp=1",
    "parallel.vpp=null",
    "parallel.etp=1",
    "training.global_batch_size=8",
    "training.micro_batch_size=1",
]
LAYOUTS = {"TP2·DP2": ["parallel.tp=2", "parallel.ep=1"], "TP2·EP2": ["parallel.tp=2", "parallel.ep=2"]}

# Measured (docs/benchmarks.md, bench_muon_step section as of commit c7d9b8e: the last run with every contender; the
# section since times only ours auto and megatron's layer-wise modes): step median (ms) and Muon state per rank
# min–max (MiB) per contender.
MEASURED = {
    "TP2·DP2": {
        "ours": (479, (5.50, 5.88)),
        "megatron duplicated": (1315, (20.27, 20.27)),
        "megatron distributed": (1657, (20.27, 20.27)),
        "megatron layer-wise": (499, (5.27, 6.01)),
    },
    "TP2·EP2": {
        "ours": (539, (5.50, 5.88)),
        "megatron duplicated": (983, (11.27, 11.27)),
        "megatron distributed": (1084, (11.27, 11.27)),
        "megatron layer-wise": (646, (5.27, 6.01)),
    },
}


def predict(layout: str) -> dict[str, tuple[float, tuple[float, float]]]:
    """Contender → (predicted step seconds, (min, max) Muon state MiB per rank) on the CPU cost model."""
    from megatron_muon.config import load_config, validate
    from megatron_muon.planning.report import plan_at_scale

    cfg = load_config(ROOT / "launch/configs/tiny_cpu.yaml", MODEL + LAYOUTS[layout])
    dims = validate(cfg)
    report = plan_at_scale(cfg, dims, "cpu", with_matrices=False)
    result = {}
    for mode in MEASURED[layout]:
        entry = report["modes"][mode]
        state = [b / 2**20 for b in entry["muon_state_bytes"]]
        result[mode] = (entry["step_seconds"], (min(state), max(state)))
    return result


def table() -> str:
    lines = [
        "| layout | contender | Muon state per rank, predicted (MiB) | measured (MiB) | error | "
        "step ÷ ours, predicted | measured | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, measured in MEASURED.items():
        predicted = predict(layout)
        ours_p, ours_m = predicted["ours"][0], measured["ours"][0]
        for mode, (step_m, (low_m, high_m)) in measured.items():
            step_p, (low_p, high_p) = predicted[mode]
            mean_p, mean_m = (low_p + high_p) / 2, (low_m + high_m) / 2
            ratio_p, ratio_m = step_p / ours_p, step_m / ours_m
            lines.append(
                f"| {layout} | {mode} | {low_p:.2f}–{high_p:.2f} | {low_m:.2f}–{high_m:.2f} | "
                f"{(mean_p / mean_m - 1) * 100:+.0f} % | {ratio_p:.2f} | {ratio_m:.2f} | "
                f"{(ratio_p / ratio_m - 1) * 100:+.0f} % |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
