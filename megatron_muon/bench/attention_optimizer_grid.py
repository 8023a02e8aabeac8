"""MLA + MoE + Muon against dense MHA + AdamW at equal active parameters, and the 2×2 of attention × optimizer
(issue #23 item 4), on Shakespeare:

    .venv/bin/python tools/attention_optimizer_grid.py --seeds 1234 1235 --markdown docs/benchmarks.md

The claims read (Muon: Training and Trade-offs with Latent Attention and MoE, 30M–200M decoders): (1) Muon reaches
a target loss with ~48–52 % of AdamW's compute; (2) MLA + MoE + Muon compounds: less KV-cache memory and a better
perplexity than the dense multi-head baseline.

The four cells, each trained in full through ``launch/pretrain_muon.sh`` once per seed:

- attention: ``mla_moe``, the config as shipped (``moonlight_proxy_cpu.yaml``: MLA + fine-grained MoE), or
  ``mha_dense``: the same config with standard multi-head attention (``num_query_groups`` = heads, no q/k norm:
  MLA's ``qk_layernorm`` is its kv-latent norm, which MHA has no counterpart of) and no MoE
  (``num_moe_experts=0``, so ``parallel.ep=1``), its SwiGLU width chosen by :func:`matched_dense_ffn_hidden_size`:
  the multiple of ``--ffn-multiple`` whose active parameters (``config/param_count.py``) are closest to the MLA + MoE
  model's. Data, tokens, schedule, sequence length, QK-clip and the TP2 · PP2 layout stay the config's.
- optimizer: ``muon`` (``optimizer.use_muon=true``: Muon at ``--muon-lr`` for the hidden matrices, AdamW at
  ``--adamw-lr`` for the rest) or ``adamw`` (``use_muon=false``: AdamW at ``--adamw-lr`` for everything). Both LRs
  default to the config's (its ``optimizer.muon.lr`` and ``optimizer.lr``), each final LR at the config's
  min/peak ratio; they are not swept (a fair sweep is ``tools/compare_optimizers.py``'s job). The only tuned AdamW
  LRs in docs/benchmarks.md are that tool's for a smaller model (hidden 64, 2 layers: 0.01 at batch 8, 0.003 at
  batch 32), not this size, so the config's 3e-3 stays.

Every evaluation is appended to ``--results`` with the run's median ``tokens/s`` (the launcher's per-iteration
log from iteration :data:`FIRST_TIMED_ITERATION` on). A rerun skips every run whose key is already there: the
config's path and SHA-256, ``--override``, the cell's model overrides, the code version (``launcher_runs.py:
code_version``), the attention, optimizer, LRs and seed. The section gives per cell the final validation loss per
seed and its mean, total and active parameters, KV-cache bytes per token (bf16, :func:`kv_cache_bytes_per_token`)
and tokens/s, then reads the differences and each claim from those numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_muon.bench.launcher_runs import (
    REPO,
    append_rows,
    code_version,
    file_sha,
    iteration_values,
    lr_text,
    read_rows,
    run_training,
)
from megatron_muon.bench.report import cpu_description, load_average, publish, rerun_command
from megatron_muon.config.checks import validate
from megatron_muon.config.errors import ConfigError
from megatron_muon.config.loading import load_config
from megatron_muon.config.param_count import count_parameters
from megatron_muon.config.schema import ModelConfig, PretrainConfig

CONFIG = "launch/configs/moonlight_proxy_cpu.yaml"
ATTENTIONS = ("mla_moe", "mha_dense")
OPTIMIZERS = ("muon", "adamw")
ATTENTION_NAMES = {"mla_moe": "MLA + MoE", "mha_dense": "dense MHA"}
OPTIMIZER_NAMES = {"muon": "Muon", "adamw": "AdamW"}
BYTES_PER_ELEMENT = 2  # the KV cache in bf16, as served
FIRST_TIMED_ITERATION = 11  # tokens/s from here on: the first iterations include allocation and warm-up
KEY_FIELDS = ("config", "config_sha", "overrides", "model_overrides", "code_version", "attention", "optimizer",
              "adamw_lr", "muon_lr", "seed")  # fmt: skip
FIELDS = [*KEY_FIELDS, "iteration", "val_loss", "tokens_per_s", "timed_iterations", "wall_s"]
# --throughput-iterations: one short run per cell on the otherwise idle machine, no evaluation (throughput.csv)
THROUGHPUT_KEY = (
    "config",
    "config_sha",
    "overrides",
    "model_overrides",
    "code_version",
    "attention",
    "optimizer",
)
THROUGHPUT_FIELDS = [*THROUGHPUT_KEY, "tokens_per_s", "timed_iterations", "load_before", "load_after"]
START, END = "<!-- attention_optimizer_grid:start -->", "<!-- attention_optimizer_grid:end -->"
# Keys each cell sets itself: an --override of one would silently change what a cell is.
CELL_KEYS = ("model.multi_latent_attention", "model.num_query_groups", "model.qk_layernorm", "model.num_moe_experts",
             "model.ffn_hidden_size", "parallel.ep", "optimizer.use_muon", "optimizer.lr", "optimizer.min_lr",
             "optimizer.muon.lr", "optimizer.muon.min_lr", "training.seed")  # fmt: skip


def kv_cache_bytes_per_token(model: ModelConfig, bytes_per_element: int = BYTES_PER_ELEMENT) -> int:
    """Bytes one token adds to the inference KV cache, summed over the layers.

    Standard attention caches K and V: 2 · num_query_groups · kv_channels per layer. MLA caches the compressed
    kv latent (``kv_lora_rank``) and the decoupled rotary key shared by the heads (``qk_pos_emb_head_dim``) per
    layer (DeepSeek-V2, arXiv:2405.04434, §2.1.2–2.1.3: keys and values are re-derived from the latent).
    """
    if model.multi_latent_attention:
        per_layer = model.kv_lora_rank + model.qk_pos_emb_head_dim
    else:
        per_layer = 2 * model.query_groups * model.head_dim
    return per_layer * bytes_per_element * model.num_layers


def dense_mha_overrides(model: ModelConfig, ffn_hidden_size: int) -> list[str]:
    """Overrides turning ``model`` (MLA + MoE) into dense multi-head attention with SwiGLU ``ffn_hidden_size``."""
    return [
        "model.multi_latent_attention=false",
        f"model.num_query_groups={model.num_attention_heads}",  # one K/V head per query head: MHA
        "model.qk_layernorm=false",  # MLA's norm is on its kv latent; plain MHA has none
        "model.num_moe_experts=0",
        f"model.ffn_hidden_size={ffn_hidden_size}",
        "parallel.ep=1",  # no experts to place
    ]


def matched_dense_ffn_hidden_size(target_active: int, dense: ModelConfig, multiple: int) -> int:
    """The SwiGLU width (a positive multiple of ``multiple``) whose dense model has the active parameter count
    closest to ``target_active``; the smaller width on a tie. ``dense``: the dense model at any width."""

    def distance(width: int) -> int:
        return abs(count_parameters(dataclasses.replace(dense, ffn_hidden_size=width))[1] - target_active)

    per_width = 3 * dense.hidden_size * dense.num_layers  # active parameters per unit of SwiGLU width
    largest = (target_active // (per_width * multiple) + 2) * multiple
    return min(range(multiple, largest + 1, multiple), key=lambda width: (distance(width), width))


@dataclasses.dataclass(frozen=True, slots=True)
class GridModels:
    """The two attention variants of the config: their model overrides and the validated configs."""

    model_overrides: dict[str, list[str]]
    """Per attention, the launcher overrides that make its model from the config (none for ``mla_moe``)."""
    configs: dict[str, PretrainConfig]
    """Per attention, the config with those overrides (and ``--override``) applied, validated."""


def grid_models(config: str, overrides: Sequence[str], ffn_multiple: int) -> GridModels:
    """Both models of the grid from ``config``. Raises ``ConfigError`` (one line) when one does not validate."""
    mla_moe = load_config(REPO / config, overrides)
    validate(mla_moe)
    target_active = count_parameters(mla_moe.model)[1]
    dense_at_any_width = load_config(
        REPO / config, [*overrides, *dense_mha_overrides(mla_moe.model, ffn_multiple)]
    )
    width = matched_dense_ffn_hidden_size(target_active, dense_at_any_width.model, ffn_multiple)
    dense_overrides = dense_mha_overrides(mla_moe.model, width)
    mha_dense = load_config(REPO / config, [*overrides, *dense_overrides])
    try:
        validate(mha_dense)
    except ConfigError as error:
        raise ConfigError(f"the dense MHA model (SwiGLU width {width}): {error}") from None
    return GridModels(
        model_overrides={"mla_moe": [], "mha_dense": dense_overrides},
        configs={"mla_moe": mla_moe, "mha_dense": mha_dense},
    )


def median_tokens_per_second(stdout: str, first_iteration: int = FIRST_TIMED_ITERATION) -> tuple[float, int]:
    """(median, count) of the ``tokens/s`` the launcher logs for iterations ≥ ``first_iteration``.
    Raises ``ValueError`` when it logged none there."""
    values = [tokens for _, tokens in iteration_values(stdout, "tokens/s", first_iteration)]
    if not values:
        raise ValueError(f"no tokens/s logged at iteration >= {first_iteration}")
    return statistics.median(values), len(values)


def run_overrides(
    cfg: PretrainConfig,
    model_overrides: Sequence[str],
    optimizer: str,
    adamw_lr: float,
    muon_lr: float,
    seed: int,
) -> list[str]:
    """The launcher overrides of one cell and seed (without ``--override``): model, optimizer, LRs, seed."""
    opt = cfg.optimizer
    overrides = [
        *model_overrides,
        f"optimizer.use_muon={'true' if optimizer == 'muon' else 'false'}",
        f"optimizer.lr={lr_text(adamw_lr)}",
        f"optimizer.min_lr={lr_text(adamw_lr * opt.min_lr / opt.lr)}",
    ]
    if optimizer == "muon":
        overrides += [
            f"optimizer.muon.lr={lr_text(muon_lr)}",
            f"optimizer.muon.min_lr={lr_text(muon_lr * opt.muon.min_lr / opt.muon.lr)}",
        ]
    return [*overrides, f"training.seed={seed}"]


def run_key(row: dict[str, str]) -> tuple[str, ...]:
    """What identifies a run in the results: everything that changes it."""
    return tuple(row[field] for field in KEY_FIELDS)


def ensure_runs(args: argparse.Namespace, models: GridModels) -> tuple[list[dict[str, str]], list[str]]:
    """Run every (attention, optimizer, seed) not yet in the results for this code version; return the rows of this
    study's keys and the runs still missing. ``--publish-only`` runs nothing; when the file has no run of this code
    version it publishes the runs of the file's latest code version (one version for every cell)."""
    results = REPO / args.results
    version, sha, overrides = code_version(), file_sha(REPO / args.config), " ".join(args.override)
    finished = read_rows(results)
    if args.publish_only and finished and version not in {row["code_version"] for row in finished}:
        version = finished[-1]["code_version"]  # the study's latest code: every cell from that one version
    wanted: set[tuple[str, ...]] = set()
    missing: list[str] = []
    for attention in ATTENTIONS:
        cfg, model_overrides = models.configs[attention], models.model_overrides[attention]
        for optimizer in OPTIMIZERS:
            for seed in args.seeds:
                key = dict(config=args.config, config_sha=sha, overrides=overrides,
                           model_overrides=" ".join(model_overrides), code_version=version, attention=attention,
                           optimizer=optimizer, adamw_lr=lr_text(args.adamw_lr),
                           muon_lr=lr_text(args.muon_lr) if optimizer == "muon" else "", seed=str(seed))  # fmt: skip
                if run_key(key) in {run_key(row) for row in read_rows(results)}:
                    wanted.add(run_key(key))
                    continue
                name = f"{ATTENTION_NAMES[attention]} + {OPTIMIZER_NAMES[optimizer]} seed {seed}"
                if args.publish_only:
                    missing.append(name)
                    continue
                wanted.add(run_key(key))
                print(f"run {name} ({time.strftime('%H:%M:%S')})", flush=True)
                launch = [*run_overrides(cfg, model_overrides, optimizer, args.adamw_lr, args.muon_lr, seed),
                          *args.override]  # fmt: skip
                run = run_training(args.config, launch)
                tokens_per_s, timed = median_tokens_per_second(run.stdout)
                append_rows(results, [{**key, "iteration": iteration, "val_loss": f"{loss:.5f}",
                                       "tokens_per_s": f"{tokens_per_s:.0f}", "timed_iterations": timed,
                                       "wall_s": f"{run.wall_s:.0f}"} for iteration, loss in run.validation],
                            FIELDS)  # fmt: skip
                print(f"  final validation loss {run.validation[-1][1]:.4f}, {tokens_per_s:.0f} tokens/s, "
                      f"{run.wall_s:.0f} s", flush=True)  # fmt: skip
    return [row for row in read_rows(results) if run_key(row) in wanted], missing


def throughput_path(results: str) -> Path:
    """Where the quiet throughput measurements of a results file go: ``throughput.csv`` beside it."""
    return (REPO / results).parent / "throughput.csv"


def measure_throughput(args: argparse.Namespace, models: GridModels, iterations: int) -> None:
    """Per cell, one run of ``iterations`` timed steps (after the warm-up ones) with no evaluation and no
    checkpoint, one after another: the cells' tokens/s on the otherwise idle machine, appended to
    ``throughput.csv`` with the load average around each run."""
    sha, overrides = file_sha(REPO / args.config), " ".join(args.override)
    for attention in ATTENTIONS:
        cfg, model_overrides = models.configs[attention], models.model_overrides[attention]
        for optimizer in OPTIMIZERS:
            launch = [*run_overrides(cfg, model_overrides, optimizer, args.adamw_lr, args.muon_lr, args.seeds[0]),
                      *args.override, f"training.train_iters={iterations + FIRST_TIMED_ITERATION - 1}",
                      "training.eval_interval=0", "logging.log_interval=1", "checkpoint.resume=none",
                      "checkpoint.save_interval=0"]  # fmt: skip
            before = load_average()
            run = run_training(args.config, launch, evaluates=False)
            tokens_per_s, timed = median_tokens_per_second(run.stdout)
            row = dict(config=args.config, config_sha=sha, overrides=overrides,
                       model_overrides=" ".join(model_overrides), code_version=code_version(), attention=attention,
                       optimizer=optimizer, tokens_per_s=f"{tokens_per_s:.0f}", timed_iterations=timed,
                       load_before=before, load_after=load_average())  # fmt: skip
            append_rows(throughput_path(args.results), [row], THROUGHPUT_FIELDS)
            print(f"throughput {ATTENTION_NAMES[attention]} + {OPTIMIZER_NAMES[optimizer]}: {tokens_per_s:.0f} "
                  f"tokens/s ({timed} iterations; load {before} -> {row['load_after']})", flush=True)  # fmt: skip


def quiet_throughput(args: argparse.Namespace, models: GridModels) -> dict[tuple[str, str], dict[str, str]]:
    """Per cell, its latest quiet measurement of this config and ``--override`` (any code version)."""
    sha, overrides = file_sha(REPO / args.config), " ".join(args.override)
    found: dict[tuple[str, str], dict[str, str]] = {}
    for row in read_rows(throughput_path(args.results)):
        cell = (row["attention"], row["optimizer"])
        same_model = row["model_overrides"] == " ".join(models.model_overrides[row["attention"]])
        if (row["config"], row["config_sha"], row["overrides"]) == (
            args.config,
            sha,
            overrides,
        ) and same_model:
            found[cell] = row
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class CellResult:
    """One cell's finished runs."""

    attention: str
    optimizer: str
    final_loss: dict[str, float]
    """Per seed, the validation loss at the run's last evaluation."""
    iteration: int
    """The iteration of that last evaluation."""
    tokens_per_s: dict[str, float]
    """Per seed, the run's median logged tokens/s."""

    @property
    def mean_loss(self) -> float:
        """The final validation loss averaged over the seeds."""
        return statistics.fmean(self.final_loss.values())


def summarize(rows: Sequence[dict[str, str]]) -> dict[tuple[str, str], CellResult]:
    """Per (attention, optimizer) with rows, its final losses and throughput per seed."""
    last: dict[tuple[str, str, str], tuple[int, float, float]] = {}
    for row in rows:
        key = (row["attention"], row["optimizer"], row["seed"])
        point = (int(row["iteration"]), float(row["val_loss"]), float(row["tokens_per_s"]))
        if key not in last or point[0] > last[key][0]:
            last[key] = point
    cells: dict[tuple[str, str], CellResult] = {}
    for attention in ATTENTIONS:
        for optimizer in OPTIMIZERS:
            seeds = sorted((s for (a, o, s) in last if (a, o) == (attention, optimizer)), key=int)
            if seeds:
                cells[(attention, optimizer)] = CellResult(
                    attention=attention,
                    optimizer=optimizer,
                    final_loss={s: last[(attention, optimizer, s)][1] for s in seeds},
                    iteration=max(last[(attention, optimizer, s)][0] for s in seeds),
                    tokens_per_s={s: last[(attention, optimizer, s)][2] for s in seeds},
                )
    return cells


def cell_name(attention: str, optimizer: str) -> str:
    """``MLA + MoE + Muon``, ``dense MHA + AdamW``, …"""
    return f"{ATTENTION_NAMES[attention]} + {OPTIMIZER_NAMES[optimizer]}"


def difference_reading(
    name: str, lower: CellResult | None, higher: CellResult | None
) -> tuple[str, str | None]:
    """(bullet, verdict) for the final loss of ``lower`` minus ``higher`` over their common seeds. The verdict is
    ``lower`` (negative on every seed), ``higher`` (positive on every seed), ``undecided`` (the seeds disagree or
    a difference is 0) or None when a cell has no runs."""
    if lower is None or higher is None:
        return f"- {name}: not run yet", None
    seeds = [s for s in lower.final_loss if s in higher.final_loss]
    if not seeds:
        return f"- {name}: no seed in common yet", None
    diffs = [lower.final_loss[s] - higher.final_loss[s] for s in seeds]
    verdict = "lower" if all(d < 0 for d in diffs) else "higher" if all(d > 0 for d in diffs) else "undecided"
    spread = max(max(c.final_loss.values()) - min(c.final_loss.values()) for c in (lower, higher))
    words = {
        "lower": "lower on every seed",
        "higher": "higher on every seed",
        "undecided": "the seeds disagree",
    }
    per_seed = ", ".join(f"{d:+.4f} (seed {s})" for d, s in zip(diffs, seeds, strict=True))
    return (
        f"- {name}: {statistics.fmean(diffs):+.4f} nats in the mean ({per_seed}): {words[verdict]}; the larger seed"
        f" spread of the two cells is {spread:.4f}",
        verdict,
    )


def claim_lines(cells: dict[tuple[str, str], CellResult], kv_bytes: dict[str, int]) -> list[str]:
    """The differences, then whether each of the paper's two claims holds here, read from the numbers."""
    lines = ["Muon − AdamW (final validation loss, same tokens):"]
    muon_verdicts: list[str | None] = []
    for attention in ATTENTIONS:
        line, verdict = difference_reading(
            ATTENTION_NAMES[attention], cells.get((attention, "muon")), cells.get((attention, "adamw"))
        )
        lines.append(line)
        muon_verdicts.append(verdict)
    lines += ["", "MLA + MoE − dense MHA (final validation loss, equal active parameters):"]
    for optimizer in OPTIMIZERS:
        line, _ = difference_reading(
            OPTIMIZER_NAMES[optimizer], cells.get(("mla_moe", optimizer)), cells.get(("mha_dense", optimizer))
        )
        lines.append(line)
    compound_line, compound = difference_reading(
        "MLA + MoE + Muon − dense MHA + AdamW",
        cells.get(("mla_moe", "muon")),
        cells.get(("mha_dense", "adamw")),
    )
    lines += ["", "The compound:", compound_line, "", "The paper's claims at this scale:"]
    if None in muon_verdicts:
        compute = "not read yet (a cell has no runs)"
    elif all(v == "lower" for v in muon_verdicts):
        compute = ("**consistent**: at the same tokens Muon ends lower than AdamW at both attentions on every seed;"
                   " the 48–52 % compute ratio itself is not measured (every run sees the same tokens)")  # fmt: skip
    elif all(v == "higher" for v in muon_verdicts):
        compute = "**does not hold**: at the same tokens Muon ends higher than AdamW at both attentions on every seed"
    else:
        compute = ("**not shown**: Muon does not end lower than AdamW at both attentions on every seed (see above);"
                   " the 48–52 % compute ratio itself is not measured (every run sees the same tokens)")  # fmt: skip
    lines.append(f"- (1) Muon reaches the target loss with ~48–52 % of AdamW's compute: {compute}")
    kv_ratio = kv_bytes["mla_moe"] / kv_bytes["mha_dense"]
    memory = (
        f"KV cache {kv_bytes['mla_moe']:,} vs {kv_bytes['mha_dense']:,} bytes/token ({kv_ratio:.2f}×: "
        + ("lower" if kv_ratio < 1 else "not lower")
        + ")"
    )
    if compound is None:
        perplexity = "perplexity not read yet (a cell has no runs)"
    else:
        mla, mha = cells[("mla_moe", "muon")], cells[("mha_dense", "adamw")]
        perplexity = (f"perplexity {math.exp(mla.mean_loss):.1f} vs {math.exp(mha.mean_loss):.1f} in the mean"
                      f" ({'lower' if compound == 'lower' else 'not lower'} on every seed)")  # fmt: skip
    holds = "**holds**" if kv_ratio < 1 and compound == "lower" else "**does not hold**"
    if compound is None:
        holds = "not read yet"
    lines.append(f"- (2) MLA + MoE + Muon compounds, less KV-cache memory and a better perplexity than dense MHA"
                 f" (+ AdamW): {holds}: {memory}; {perplexity}")  # fmt: skip
    return lines


def markdown(
    cells: dict[tuple[str, str], CellResult],
    models: GridModels,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    missing: Sequence[str],
    versions: Sequence[str],
    quiet: dict[tuple[str, str], dict[str, str]] | None = None,
) -> str:
    """The section: how to rerun it, the setting, one row per cell, the reading."""
    quiet = quiet or {}
    counts = {a: count_parameters(models.configs[a].model) for a in ATTENTIONS}
    kv_bytes = {a: kv_cache_bytes_per_token(models.configs[a].model) for a in ATTENTIONS}
    dense, mla = models.configs["mha_dense"], models.configs["mla_moe"]
    gap = counts["mha_dense"][1] - counts["mla_moe"][1]
    config_name = Path(args.config).name
    lines = [
        START,
        "## MLA + MoE + Muon against dense MHA + AdamW at equal active parameters (issue #23 item 4)",
        "",
        "Written by `tools/attention_optimizer_grid.py` from the raw evaluations beside it; rerun to refresh:",
        "",
        "```bash",
        rerun_command("attention_optimizer_grid.py", None if argv is None else list(argv)),
        "```",
        "",
        f"- CPU: {cpu_description()}; load average at writing {load_average()}. Tokens/s is the median of the"
        f" launcher's per-iteration log from iteration {FIRST_TIMED_ITERATION} on, {mla.parallel.world_size} CPU"
        " processes on this machine: CPU throughput does not predict GPU throughput (the expert dispatch and MLA's"
        " extra projections cost differently there)",
        f"- MLA + MoE: `{config_name}` as shipped. Dense MHA: the same config with"
        f" `{' '.join(models.model_overrides['mha_dense'])}`; its SwiGLU width {dense.model.ffn_hidden_size} is the"
        f" multiple of {args.ffn_multiple} closest in active parameters ({gap:+,} against MLA + MoE,"
        f" {100 * gap / counts['mla_moe'][1]:+.2f} %). Same data, tokens ({mla.training.train_iters} steps ×"
        f" {mla.training.global_batch_size * mla.model.seq_length:,} tokens), schedule, sequence length, QK-clip"
        f" and TP{mla.parallel.tp} · PP{mla.parallel.pp} layout",
        f"- Learning rates, not swept (a fair sweep is `tools/compare_optimizers.py`'s job): Muon {args.muon_lr:g}"
        f"{_origin(args.muon_lr, mla.optimizer.muon.lr)} for the hidden matrices in the Muon cells; AdamW"
        f" {args.adamw_lr:g}{_origin(args.adamw_lr, mla.optimizer.lr)} for everything in the AdamW cells and"
        " for the embeddings, output layer, norms and router in the Muon cells; each decays to the config's"
        " min/peak ratio",
        f"- KV-cache bytes per token, bf16 ({BYTES_PER_ELEMENT} bytes per element) summed over the"
        f" {mla.model.num_layers} layers: MHA caches K and V, 2 · {dense.model.query_groups} groups ·"
        f" {dense.model.head_dim} channels; MLA its kv latent {mla.model.kv_lora_rank} + the shared rotary key"
        f" {mla.model.qk_pos_emb_head_dim}",
        "- Code version of the runs (SHA-256 of the tracked files a training run executes): "
        + (", ".join(f"`{v}`" for v in versions) or "none yet"),
        *_quiet_bullet(quiet),
        "",
        "| attention | optimizer | parameters total / active | KV cache bytes/token | final validation loss per"
        " seed | mean (perplexity) | tokens/s per seed during training (CPU) | tokens/s, quiet (CPU) |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for (attention, optimizer), cell in cells.items():
        seeds = list(cell.final_loss)
        total, active = counts[attention]
        losses = " / ".join(f"{cell.final_loss[s]:.4f}" for s in seeds)
        throughput = " / ".join(f"{cell.tokens_per_s[s]:,.0f}" for s in seeds)
        measured = quiet.get((attention, optimizer))
        quiet_cell = "—" if measured is None else f"{float(measured['tokens_per_s']):,.0f}"
        lines.append(
            f"| {ATTENTION_NAMES[attention]} | {OPTIMIZER_NAMES[optimizer]} | {total:,} / {active:,} |"
            f" {kv_bytes[attention]:,} | {losses} (seeds {', '.join(seeds)}; iteration {cell.iteration}) |"
            f" {cell.mean_loss:.4f} ({math.exp(cell.mean_loss):.1f}) | {throughput} | {quiet_cell} |"
        )
    lines += ["", *claim_lines(cells, kv_bytes)]
    if missing:
        lines += ["", f"Not run yet (rerun the command without `--publish-only`): {', '.join(missing)}."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _quiet_bullet(quiet: dict[tuple[str, str], dict[str, str]]) -> list[str]:
    if not quiet:
        return [
            "- Tokens/s, quiet: not measured (`--throughput-iterations N` runs each cell alone on the idle machine)"
        ]
    loads = "; ".join(f"{ATTENTION_NAMES[a]} + {OPTIMIZER_NAMES[o]} {row['load_before']} → {row['load_after']}"
                      for (a, o), row in quiet.items())  # fmt: skip
    versions = ", ".join(sorted({f"`{row['code_version']}`" for row in quiet.values()}))
    timed = sorted({row["timed_iterations"] for row in quiet.values()})
    return [f"- Tokens/s, quiet: each cell run alone for {'/'.join(timed)} timed iterations after the warm-up, no"
            f" evaluation (`throughput.csv` beside the results; code version {versions}); load average before →"
            f" after: {loads}"]  # fmt: skip


def _origin(value: float, configured: float) -> str:
    return " (the config's)" if lr_text(value) == lr_text(configured) else f" (the config has {configured:g})"


def _positive_lr(parser: argparse.ArgumentParser, option: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        parser.error(f"{option} {value!r}: a learning rate is a finite number > 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run what is missing, then print or write the section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG, help="an MLA + MoE config (the grid's first attention)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235])
    parser.add_argument("--adamw-lr", type=float, default=None, help="default: the config's optimizer.lr")
    parser.add_argument("--muon-lr", type=float, default=None, help="default: the config's optimizer.muon.lr")
    parser.add_argument("--ffn-multiple", type=int, default=64, help="granularity of the dense SwiGLU width")
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE added to every run")
    parser.add_argument("--results", default="docs/attention_optimizer_grid/evaluations.csv")
    parser.add_argument(
        "--publish-only", action="store_true", help="run nothing: write the section from the finished runs"
    )
    parser.add_argument(
        "--markdown", default=None, help="write the section into this file (default: print it)"
    )
    parser.add_argument(
        "--throughput-iterations",
        type=int,
        default=0,
        help="also time each cell alone for this many iterations (no evaluation; run on an idle machine)",
    )
    args = parser.parse_args(argv)
    if args.throughput_iterations < 0:
        parser.error(f"--throughput-iterations {args.throughput_iterations}: >= 0 (0: no quiet measurement)")
    if not (REPO / args.config).is_file():
        parser.error(f"--config {args.config}: not a file under {REPO}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: seeds are distinct integers >= 0")
    if args.ffn_multiple < 1:
        parser.error(f"--ffn-multiple {args.ffn_multiple}: the width granularity is an integer >= 1")
    for item in args.override:
        key = item.partition("=")[0].strip()
        if "=" not in item or not key:
            parser.error(f"--override {item!r}: not KEY=VALUE")
        if key in CELL_KEYS:
            parser.error(f"--override {item!r}: {key} is set per cell by the tool (valid: any other config key;"
                         " the LRs through --adamw-lr / --muon-lr)")  # fmt: skip
    try:
        models = grid_models(args.config, args.override, args.ffn_multiple)
    except ConfigError as error:
        parser.error(f"--config {args.config} --ffn-multiple {args.ffn_multiple}: {error}")
    shipped = models.configs["mla_moe"].model
    if not shipped.multi_latent_attention or shipped.num_moe_experts == 0:
        parser.error(f"--config {args.config}: multi_latent_attention={shipped.multi_latent_attention}, "
                     f"num_moe_experts={shipped.num_moe_experts}; valid: an MLA + MoE config")  # fmt: skip
    optimizer = models.configs["mla_moe"].optimizer
    args.adamw_lr = optimizer.lr if args.adamw_lr is None else args.adamw_lr
    args.muon_lr = optimizer.muon.lr if args.muon_lr is None else args.muon_lr
    _positive_lr(parser, "--adamw-lr", args.adamw_lr)
    _positive_lr(parser, "--muon-lr", args.muon_lr)
    rows, missing = ensure_runs(args, models)
    if args.throughput_iterations and not args.publish_only:
        measure_throughput(args, models, args.throughput_iterations)
    versions = sorted({row["code_version"] for row in rows})
    quiet = quiet_throughput(args, models)
    publish(
        markdown(summarize(rows), models, args, argv, missing, versions, quiet), args.markdown, START, END
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
