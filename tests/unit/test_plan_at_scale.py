"""The cluster-scale planner (megatron_muon/planning, tools/plan_at_scale.py) on one process: ranks built on the
meta device agree with the per-rank parameter formula and with the pieces the planner derives for them; the tool
runs on a flagship config and refuses bad input with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_muon.cli.plan_at_scale import main as plan_at_scale_main
from megatron_muon.config import load_config, validate
from megatron_muon.planning.at_scale import _records_for, _template_records, rank_coordinates
from megatron_muon.planning.meta_build import build_rank_on_meta
from megatron_muon.planning.rank_params import parameters_of_stage

ROOT = Path(__file__).resolve().parents[2]
MOE_1B = ROOT / "launch/configs/moe_1b_8gpu.yaml"

# (overrides, sampled ranks): the shipped layout; PP2 with tied embeddings, expert-TP 2 and qk norms; PP3 x VPP2.
LAYOUTS = [
    ([], [0, 5, 7]),
    (
        [
            "parallel.world_size=16",
            "parallel.pp=2",
            "parallel.ep=4",
            "parallel.etp=2",
            "model.share_embeddings_and_output_weights=true",
            "model.qk_layernorm=true",
        ],
        [0, 9, 15],
    ),
    (
        [
            "parallel.world_size=12",
            "parallel.pp=3",
            "parallel.vpp=2",
            "parallel.tp=1",
            "parallel.ep=2",
            "parallel.etp=2",
            "training.global_batch_size=252",
            "training.micro_batch_size=1",
        ],
        [0, 7, 11],
    ),
]


def _config(overrides):
    cfg = load_config(MOE_1B, overrides)
    return cfg, validate(cfg)


@pytest.mark.parametrize("overrides,ranks", LAYOUTS)
def test_meta_build_matches_formula_and_derived_pieces(overrides, ranks):
    cfg, dims = _config(overrides)
    coordinates = rank_coordinates(dims)
    experts_per_rank = cfg.model.num_moe_experts // dims.ep
    templates = {}
    for rank in ranks:
        built = build_rank_on_meta(cfg, dims, rank)
        # Megatron's parallel state and the RankGenerator-derived coordinates agree.
        assert all(built.coordinates[k] == coordinates[rank][k] for k in built.coordinates), rank
        pp = built.coordinates["pp"]
        formula = parameters_of_stage(cfg.model, dims, pp, transformer_impl="local")
        assert built.parameter_count == formula.total, rank
        expert = built.expert_elements("muon") + built.expert_elements("adamw")
        assert expert == formula.expert, rank
        # Routing: every hidden matrix to Muon; embeddings, norms and the router to AdamW.
        assert built.muon_elements + built.adamw_elements == built.parameter_count
        assert all("router" not in r.name and "norm" not in r.name for r in built.routing.muon)
        # The pieces the planner derives for this rank from its stage's first rank equal the built ones.
        if pp not in templates:
            templates[pp] = _template_records(build_rank_on_meta(cfg, dims, pp * dims.stage_size))[0]
        built_pieces = sorted(
            (p.key, p.shape, p.shard_dim, p.num_shards, p.shard_index)
            for _, pieces, _ in built.muon_pieces
            for p in pieces
        )
        derived = sorted(
            (r.key, r.shape, r.shard_dim, r.num_shards, r.shard_index)
            for kind in ("dense", "expert")
            for r in _records_for(templates[pp], kind, coordinates[rank], experts_per_rank)
        )
        assert derived == built_pieces, rank


def _tool(capsys, *args) -> tuple[int, str, str]:
    """Run tools/plan_at_scale.py's main (``megatron_muon.cli.plan_at_scale``) in this process: (exit code,
    stdout, stderr)."""
    code = plan_at_scale_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tool_reports_every_mode_for_moe_1b(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, stderr = _tool(capsys, MOE_1B, "--gpu", "h200", "--json", out)
    assert code == 0, stderr[-2000:]
    report = json.loads(out.read_text())
    cfg, dims = _config([])
    assert (
        report["parameters_per_rank"]["stage0"]["total"]
        == parameters_of_stage(cfg.model, dims, 0, transformer_impl="local").total
    )
    modes = report["modes"]
    assert set(modes) == {
        "ours",
        "ours + distributed optimizer",
        "ours + FSDP",
        "megatron duplicated",
        "megatron distributed",
        "megatron layer-wise",
    }
    # Every logical matrix is orthogonalized once in the grid (owner) or by each holder: the NS work summed over
    # ranks is at least the stage's total, and our owner/duplicated plan never exceeds megatron's duplicated mode.
    assert modes["ours"]["ns_flops_max"] <= modes["megatron duplicated"]["ns_flops_max"]
    # Sharding master weights and state over DP lowers the peak memory per rank.
    assert modes["ours + distributed optimizer"]["memory_max_bytes"] < modes["ours"]["memory_max_bytes"]
    assert all(m["step_seconds"] > 0 for m in modes.values())
    assert "PREDICTED" in stdout and "| megatron layer-wise |" in stdout
    plans = report["plans"]["stage0/dense"]["matrices"]
    assert all(mode in ("owner", "duplicated", "distributed") for _, _, _, mode, _, _ in plans)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--world-size", "6"], "world_size=6"),
        (["--gpu", "a100"], "--gpu 'a100' is unknown"),
        (["parallel.ep=3"], "parallel.ep=3"),
    ],
)
def test_tool_refuses_bad_input_with_one_line(args, message, capsys):
    code, stdout, stderr = _tool(capsys, MOE_1B, *args)
    assert code != 0 and not stdout
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:") and message in stderr, stderr


def test_moonlight_mla_rank_on_meta_matches_formula():
    """The flagship MLA model: sampled ranks of a TP2 x EP8 layout built on meta hold the formula's count.
    MLA builds on the local spec: a ``ConfigError`` here is a regression and fails the test."""
    cfg = load_config(ROOT / "launch/configs/moonlight_16b_a3b_64gpu.yaml", ["parallel.world_size=16"])
    dims = validate(cfg)
    for rank in (0, 11):
        built = build_rank_on_meta(cfg, dims, rank)
        formula = parameters_of_stage(cfg.model, dims, 0, transformer_impl="local")
        assert built.parameter_count == formula.total, rank
        keys = {p.key for _, pieces, _ in built.muon_pieces for p in pieces}
        # MLA's projections are Muon matrices (kv_up split into its k and v parts by the layout).
        for part in ("linear_q_proj.weight", "linear_kv_down_proj.weight", "linear_kv_up_proj.weight/v"):
            assert any(key.endswith(part) for key in keys), part


def test_calibration_against_the_world4_benchmark():
    """Predicted Muon state per rank within 15 % and step-time ratios to ours within 30 % of the published
    benchmark (docs/benchmarks.md, bench_muon_step section)."""
    from megatron_muon.planning.calibration import MEASURED, predict

    for layout, measured in MEASURED.items():
        predicted = predict(layout)
        for mode, (step, (low, high)) in measured.items():
            step_p, (low_p, high_p) = predicted[mode]
            assert abs((low_p + high_p) / (low + high) - 1) <= 0.15, (layout, mode)
            ratio_p = step_p / predicted["ours"][0]
            ratio_m = step / measured["ours"][0]
            assert abs(ratio_p / ratio_m - 1) <= 0.30, (layout, mode, ratio_p, ratio_m)


def test_dry_run_prints_the_meta_built_rank_and_the_plan():
    from megatron_muon.pretrain import _dry_run

    cfg, dims = _config([])
    text = _dry_run(cfg, dims)
    count = parameters_of_stage(cfg.model, dims, 0).total
    assert f"parameters per rank, stage 0: {count:,}" in text
    assert f"{count:,} parameters (= the formula" in text  # the rank built on meta holds as many
    assert "Muon: 616 tensors" in text and "x self_attention.linear_qkv.weight/q (1024, 1024) /2" in text
    assert (
        "| megatron layer-wise | masters, state |" in text and "| ours + FSDP | params, grads, state" in text
    )
