"""tools/attention_optimizer_grid.py without training: the KV-cache arithmetic, the dense model matched to the MLA +
MoE proxy's active parameters (the real config's counts, no model built), the launcher's tokens/s parsed, the
section's table and reading from synthetic rows, finished runs skipped, and bad input."""

from __future__ import annotations

import csv

import pytest

from megatron_muon.bench import attention_optimizer_grid as grid
from megatron_muon.bench.launcher_runs import LaunchedRun, code_version, file_sha
from megatron_muon.config.schema import ModelConfig

# --------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_of_multi_head_attention_is_k_and_v_per_group_and_layer():
    mha = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=4)
    assert grid.kv_cache_bytes_per_token(mha) == 2 * 4 * 32 * 2 * 4 == 2048
    gqa = ModelConfig(
        num_layers=3, hidden_size=128, num_attention_heads=8, num_query_groups=2, kv_channels=16
    )
    assert grid.kv_cache_bytes_per_token(gqa, bytes_per_element=4) == 2 * 2 * 16 * 4 * 3 == 768


def test_kv_cache_of_mla_is_the_latent_and_the_shared_rotary_key():
    mla = ModelConfig(
        num_layers=4,
        multi_latent_attention=True,
        kv_lora_rank=64,
        qk_pos_emb_head_dim=16,
        num_query_groups=None,
    )
    assert grid.kv_cache_bytes_per_token(mla) == (64 + 16) * 2 * 4 == 640
    deepseek_v2 = ModelConfig(
        num_layers=60, multi_latent_attention=True, kv_lora_rank=512, qk_pos_emb_head_dim=64
    )
    assert grid.kv_cache_bytes_per_token(deepseek_v2) == 576 * 2 * 60 == 69_120


# ------------------------------------------------------------------------------------- the matched dense model


def test_the_dense_model_matches_the_proxys_active_parameters():
    models = grid.grid_models(grid.CONFIG, [], 64)
    mla, dense = models.configs["mla_moe"].model, models.configs["mha_dense"].model
    assert grid.count_parameters(mla) == (2_850_176, 2_112_896)
    # 4 layers x (attention 128 + 128 x 12 x 32 + 4 x 32 x 128 = 65,664; MLP 128 + 3 x 128 x F) + 2 x 4096 x 128
    # + 128 = 1,311,872 + 1,536 F; F = 512 -> 2,098,304 (-14,592), F = 576 -> 2,196,608 (+83,712)
    assert dense.ffn_hidden_size == 512
    assert grid.count_parameters(dense) == (2_098_304, 2_098_304)
    assert models.model_overrides["mha_dense"] == [
        "model.multi_latent_attention=false", "model.num_query_groups=4", "model.qk_layernorm=false",
        "model.num_moe_experts=0", "model.ffn_hidden_size=512", "parallel.ep=1",
    ]  # fmt: skip
    assert (dense.query_groups, dense.head_dim, dense.moe_layer_pattern()) == (4, 32, [0, 0, 0, 0])
    assert models.configs["mha_dense"].optimizer == models.configs["mla_moe"].optimizer
    assert models.configs["mha_dense"].training == models.configs["mla_moe"].training
    # at granularity 2 (TP2's): 801,024 / 1,536 = 521.5 -> 522 (+768)
    assert grid.grid_models(grid.CONFIG, [], 2).configs["mha_dense"].model.ffn_hidden_size == 522


def test_a_tie_between_two_widths_takes_the_smaller():
    dense = grid.grid_models(grid.CONFIG, [], 64).configs["mha_dense"].model
    halfway = 2_098_304 + 1_536 // 2  # between widths 512 and 513
    assert grid.matched_dense_ffn_hidden_size(halfway, dense, 1) == 512
    assert grid.matched_dense_ffn_hidden_size(halfway + 1, dense, 1) == 513


# ------------------------------------------------------------------------------------------ launcher output


def _iteration_line(iteration: int, tokens_per_s: float) -> str:
    # The trainer's own format (training/trainer.py: Trainer._report).
    return (
        f" iteration {iteration:>6}/200 | consumed samples {16 * iteration:>9} | consumed tokens {2048 * iteration:>11,} | "
        f"ms/iter {2048e3 / tokens_per_s:8.1f} | tokens/s {tokens_per_s:9.0f} | lr muon 2.000e-02 adamw 3.000e-03 | "
        f"lm loss 5.1234 | grad norm 0.812 | MFU n/a | skipped 0"
    )


def _stdout(tokens_per_s: dict[int, float], validation: dict[int, float]) -> str:
    lines = []
    for iteration in sorted(tokens_per_s):
        lines.append(_iteration_line(iteration, tokens_per_s[iteration]))
        if iteration in validation:
            lines.append(
                f" validation at iteration {iteration:>6} | lm loss {validation[iteration]:.4f} | ppl 1.0"
            )
    return "\n".join(lines) + "\n"


def test_tokens_per_second_is_the_median_after_the_first_iterations():
    stdout = _stdout({1: 100.0, 10: 9_999.0, 20: 500.0, 30: 700.0, 40: 600.0, 50: 650.0}, {50: 5.0})
    assert grid.median_tokens_per_second(stdout) == (625.0, 4)  # 500, 600, 650, 700
    assert grid.median_tokens_per_second(stdout, first_iteration=1) == (625.0, 6)
    with pytest.raises(ValueError, match="no tokens/s logged at iteration >= 11"):
        grid.median_tokens_per_second(_stdout({1: 100.0, 10: 200.0}, {}))


# ------------------------------------------------------------------------------------- rows and the section


def _key(models: grid.GridModels, attention: str, optimizer: str, seed: int) -> dict[str, object]:
    return dict(
        config=grid.CONFIG, config_sha=file_sha(grid.REPO / grid.CONFIG), overrides="",
        model_overrides=" ".join(models.model_overrides[attention]), code_version=code_version(),
        attention=attention, optimizer=optimizer, adamw_lr="0.003", muon_lr="0.02" if optimizer == "muon" else "",
        seed=str(seed),
    )  # fmt: skip


def _write_results(path, finals: dict[tuple[str, str, int], float]) -> None:
    models = grid.grid_models(grid.CONFIG, [], 64)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=grid.FIELDS)
        writer.writeheader()
        for (attention, optimizer, seed), final in finals.items():
            for iteration, loss in ((100, final + 0.4), (200, final)):
                writer.writerow({**_key(models, attention, optimizer, seed), "iteration": iteration,
                                 "val_loss": f"{loss:.5f}", "tokens_per_s": 900 + seed, "timed_iterations": 19,
                                 "wall_s": 500})  # fmt: skip


FINALS = {
    ("mla_moe", "muon", 1): 4.80, ("mla_moe", "muon", 2): 4.82,
    ("mla_moe", "adamw", 1): 5.00, ("mla_moe", "adamw", 2): 5.04,
    ("mha_dense", "muon", 1): 4.85, ("mha_dense", "muon", 2): 4.81,
    ("mha_dense", "adamw", 1): 5.10, ("mha_dense", "adamw", 2): 5.06,
}  # fmt: skip


def _section(tmp_path, capsys, *extra: str) -> str:
    args = ["--seeds", "1", "2", "--results", str(tmp_path / "evaluations.csv"), "--publish-only", *extra]
    assert grid.main(args) == 0
    return capsys.readouterr().out


def test_the_table_and_the_reading_come_from_the_rows(tmp_path, capsys):
    _write_results(tmp_path / "evaluations.csv", FINALS)
    section = _section(tmp_path, capsys)
    assert section.startswith(grid.START) and section.rstrip().endswith(grid.END)
    assert "Not run yet" not in section
    assert (
        "| MLA + MoE | Muon | 2,850,176 / 2,112,896 | 640 | 4.8000 / 4.8200 (seeds 1, 2; iteration 200) |"
        " 4.8100 (122.7) | 901 / 902 |"
    ) in section
    assert (
        "| dense MHA | AdamW | 2,098,304 / 2,098,304 | 2,048 | 5.1000 / 5.0600 (seeds 1, 2; iteration 200) |"
        in section
    )
    assert (
        "SwiGLU width 512 is the multiple of 64 closest in active parameters (-14,592 against MLA + MoE, -0.69 %)"
        in section
    )
    assert (
        "Muon 0.02 (the config's) for the hidden matrices" in section
        and "AdamW 0.003 (the config's) for everything" in section
    )
    # Muon - AdamW: MLA -0.20 / -0.22, MHA -0.25 / -0.25; MLA - MHA: Muon -0.05 / +0.01 (disagree), AdamW -0.10 / -0.02
    assert (
        "- MLA + MoE: -0.2100 nats in the mean (-0.2000 (seed 1), -0.2200 (seed 2)): lower on every seed"
        in section
    )
    assert "- dense MHA: -0.2500 nats in the mean" in section
    assert (
        "- Muon: -0.0200 nats in the mean (-0.0500 (seed 1), +0.0100 (seed 2)): the seeds disagree" in section
    )
    assert (
        "- AdamW: -0.0600 nats in the mean (-0.1000 (seed 1), -0.0200 (seed 2)): lower on every seed"
        in section
    )
    assert (
        "- MLA + MoE + Muon − dense MHA + AdamW: -0.2700 nats in the mean (-0.3000 (seed 1), -0.2400 (seed 2))"
        in section
    )
    assert "- (1) Muon reaches the target loss with ~48–52 % of AdamW's compute: **consistent**" in section
    assert "(2) MLA + MoE + Muon compounds, less KV-cache memory and a better perplexity than dense MHA (+ AdamW):" \
           " **holds**: KV cache 640 vs 2,048 bytes/token (0.31×: lower); perplexity 122.7 vs 160.8" in section  # fmt: skip


def test_claims_that_the_numbers_do_not_carry_are_not_called_held(tmp_path, capsys):
    finals = {**FINALS, ("mha_dense", "muon", 2): 5.07}  # Muon above AdamW at MHA on seed 2
    finals[("mla_moe", "muon", 2)] = 5.07  # and the compound above MHA + AdamW (5.06) on seed 2
    _write_results(tmp_path / "evaluations.csv", finals)
    section = _section(tmp_path, capsys)
    assert "(1) Muon reaches the target loss with ~48–52 % of AdamW's compute: **not shown**" in section
    assert "(+ AdamW): **does not hold**" in section and "(not lower on every seed)" in section


def test_publishing_takes_runs_of_an_earlier_code_version(tmp_path, capsys, monkeypatch):
    """Runs committed with the results keep publishing after the code moves on; a new run would train again."""
    _write_results(tmp_path / "evaluations.csv", FINALS)
    monkeypatch.setattr(grid, "code_version", lambda: "a-later-version")
    section = _section(tmp_path, capsys)
    assert "Not run yet" not in section and "4.8000 / 4.8200 (seeds 1, 2; iteration 200)" in section


def test_missing_cells_are_named_and_not_read(tmp_path, capsys):
    _write_results(tmp_path / "evaluations.csv", {k: v for k, v in FINALS.items() if k[0] == "mla_moe"})
    section = _section(tmp_path, capsys)
    assert "Not run yet (rerun the command without `--publish-only`): dense MHA + Muon seed 1," in section
    assert "- (1) Muon reaches the target loss with ~48–52 % of AdamW's compute: not read yet" in section
    assert "| dense MHA |" not in section


def test_finished_runs_are_skipped_and_new_ones_appended(tmp_path, capsys, monkeypatch):
    results = tmp_path / "evaluations.csv"
    _write_results(results, {k: v for k, v in FINALS.items() if k[2] == 1})  # seed 1 finished
    launched: list[list[str]] = []

    def fake_run(config: str, overrides: list[str]) -> LaunchedRun:
        assert config == grid.CONFIG
        launched.append(overrides)
        stdout = _stdout({1: 50.0, 10: 60.0, 20: 800.0, 30: 1_000.0, 40: 900.0}, {20: 5.5, 40: 5.2})
        return LaunchedRun(validation=[(20, 5.5), (40, 5.2)], stdout=stdout, wall_s=12.0)

    monkeypatch.setattr(grid, "run_training", fake_run)
    args = ["--seeds", "1", "2", "--results", str(results)]
    assert grid.main(args) == 0
    assert [run[-1] for run in launched] == [
        "training.seed=2"
    ] * 4  # seed 2 of the four cells, none of seed 1
    assert launched[0] == ["optimizer.use_muon=true", "optimizer.lr=0.003", "optimizer.min_lr=0.0003",
                           "optimizer.muon.lr=0.02", "optimizer.muon.min_lr=0.002", "training.seed=2"]  # fmt: skip
    assert launched[1] == ["optimizer.use_muon=false", "optimizer.lr=0.003", "optimizer.min_lr=0.0003",
                           "training.seed=2"]  # fmt: skip
    assert launched[2][:6] == grid.grid_models(grid.CONFIG, [], 64).model_overrides["mha_dense"]
    new = [row for row in csv.DictReader(results.open()) if row["seed"] == "2"]
    assert len(new) == 8 and {row["tokens_per_s"] for row in new} == {"900"}  # median of 800, 1000, 900
    assert {row["timed_iterations"] for row in new} == {"3"} and {row["val_loss"] for row in new} == {
        "5.50000",
        "5.20000",
    }
    assert (
        "| MLA + MoE | Muon | 2,850,176 / 2,112,896 | 640 | 4.8000 / 5.2000 (seeds 1, 2;"
        in capsys.readouterr().out
    )

    launched.clear()
    assert grid.main(args) == 0
    assert launched == []  # everything finished
    assert grid.main([*args, "--override", "training.eval_iters=2"]) == 0
    assert len(launched) == 8 and all(run[-1] == "training.eval_iters=2" for run in launched)  # another key


def test_quiet_throughput_times_each_cell_alone_and_fills_its_column(tmp_path, capsys, monkeypatch):
    results = tmp_path / "evaluations.csv"
    _write_results(results, FINALS)
    launched: list[tuple[list[str], bool]] = []

    def fake_run(config: str, overrides: list[str], evaluates: bool = True) -> LaunchedRun:
        launched.append((overrides, evaluates))
        return LaunchedRun(
            validation=[], stdout=_stdout({11: 1_000.0, 12: 1_200.0, 13: 1_100.0}, {}), wall_s=9.0
        )

    monkeypatch.setattr(grid, "run_training", fake_run)
    args = ["--seeds", "1", "2", "--results", str(results)]
    assert grid.main(args) == 0
    assert launched == [] and "| — |" in capsys.readouterr().out  # finished runs, no quiet measurement yet
    assert grid.main([*args, "--throughput-iterations", "3"]) == 0
    assert len(launched) == 4 and not any(
        evaluates for _, evaluates in launched
    )  # one per cell, no evaluation
    assert all(
        {"training.train_iters=13", "training.eval_interval=0", "training.seed=1"} <= set(o)
        for o, _ in launched
    )
    out = capsys.readouterr().out
    assert out.count("| 901 / 902 | 1,100 |") == 4  # during training (per seed) and quiet (the median)
    assert "- Tokens/s, quiet: each cell run alone for 3 timed iterations" in out
    assert (tmp_path / "throughput.csv").exists()
    assert grid.main([*args, "--publish-only"]) == 0 and len(launched) == 4  # publishing reads it back
    assert capsys.readouterr().out.count("| 1,100 |") == 4


def test_a_learning_rate_is_part_of_the_key(tmp_path, capsys, monkeypatch):
    _write_results(tmp_path / "evaluations.csv", FINALS)
    section = _section(tmp_path, capsys, "--adamw-lr", "0.01")
    assert (
        "Not run yet" in section and "MLA + MoE + Muon seed 1" in section and "| MLA + MoE |" not in section
    )


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adamw-lr", "0"], "--adamw-lr 0.0: a learning rate is a finite number > 0"),
        (["--muon-lr", "nan"], "--muon-lr nan: a learning rate is a finite number > 0"),
        (["--ffn-multiple", "0"], "--ffn-multiple 0: the width granularity is an integer >= 1"),
        (["--ffn-multiple", "1"], "--config launch/configs/moonlight_proxy_cpu.yaml --ffn-multiple 1: the dense MHA model (SwiGLU width 521): parallel.tp=2 does not divide model.ffn_hidden_size=521"),
        (["--seeds", "3", "3"], "--seeds 3 3: seeds are distinct integers >= 0"),
        (["--override", "optimizer.lr=0.1"], "--override 'optimizer.lr=0.1': optimizer.lr is set per cell by the tool"),
        (["--override", "model.hidden_size"], "--override 'model.hidden_size': not KEY=VALUE"),
        (["--config", "launch/configs/none.yaml"], "--config launch/configs/none.yaml: not a file under"),
        (["--config", "launch/configs/tiny_cpu.yaml"], "--config launch/configs/tiny_cpu.yaml: multi_latent_attention=False, num_moe_experts=8; valid: an MLA + MoE config"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        grid.main(["--results", str(tmp_path / "r.csv"), "--publish-only", *extra])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert f": error: {message}" in error[-1]
