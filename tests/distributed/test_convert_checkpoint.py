"""Checkpoint conversion megatron <-> Hugging Face (tools/convert_checkpoint.py, megatron_muon/convert/).

A tiny muP MoE GPT trained at TP2·PP2·EP2 is exported (Qwen3-MoE) and loaded with ``transformers``: same logits
(<= 1e-4) and the same 20 greedy tokens as our model at its training layout, and the same tokenizer. The export
imported back loads at TP1 and, through our trainer, at TP2·EP2 with the original logits (<= 1e-5). Hand-made HF models of every supported architecture import, match
their HF logits, and export back to the same tensors. Bad input is one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_muon.testing import run_distributed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
LAYOUT = dict(tp=2, pp=2, ep=2, etp=1)  # world 4
# QK-norm and a dense first layer: Qwen3-MoE (mlp_only_layers=[0]). 384 rows: a 300-piece tokenizer padded.
MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    moe_ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_layer_freq=1,
    first_k_dense_layers=1,
    qk_layernorm=True,
    vocab_size=384,
    seq_length=32,
    rotary_base=10000,
    norm_epsilon=1e-5,
    mup_base_hidden_size=32,  # muP, width multiplier 2: its attention scale and logit factor are folded on export
)
TRAIN_STEPS = 3
PROMPT_LENGTH, NEW_TOKENS = 8, 20
TEXT = " ".join(
    f"The {adjective} {noun} of {place} {verb} at {hour} o'clock, said {name}."
    for adjective in ("quiet", "bright", "old", "northern", "heavy")
    for noun in ("river", "bell", "garden", "tower", "ship", "letter")
    for place, verb, hour, name in (
        ("Verona", "sang", 3, "Juliet"),
        ("Denmark", "fell", 11, "Horatio"),
        ("Athens", "woke", 7, "Puck"),
    )
)


def _model_config():
    from megatron_muon.config import ModelConfig

    return ModelConfig(**MODEL)


def _batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, MODEL["seq_length"]), generator=torch.Generator().manual_seed(11))


# ---------------------------------------------------------------------------------------------------
# Our model's logits and greedy tokens at any layout (run inside the ranks).
# ---------------------------------------------------------------------------------------------------


def _build(model_config, pg, layout):
    from megatron_muon.testing.small_model import build_small_model

    return build_small_model(model_config, **layout, seed=1234, pg=pg).chunks


def _logits(chunks, pg, tokens: torch.Tensor) -> torch.Tensor | None:
    """``[batch, seq, vocab]`` logits of ``tokens`` through megatron's forward-only schedule, full vocabulary
    (gathered over TP) on the last pipeline stage; None on the others."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    from megatron_muon.models.gpt_moe import causal_attention_mask

    config = get_model_config(chunks[0])
    batch, length = tokens.shape

    def loss_func(output):
        pieces = [torch.empty_like(output) for _ in range(pg.tp.size())]
        torch.distributed.all_gather(pieces, output.contiguous(), group=pg.tp)
        return (
            output.sum() * 0,
            torch.tensor(1, dtype=torch.int),
            {"logits": torch.cat(pieces, dim=-1).detach()},
        )

    def forward_step(iterator, model):
        data = next(iterator)
        output = model(
            input_ids=data["tokens"],
            position_ids=torch.arange(length).expand(batch, length),
            attention_mask=causal_attention_mask(length),
        )
        return output, loss_func

    for chunk in chunks:
        chunk.eval()
    forward = get_forward_backward_func(
        pp_size=pg.pp.size(), vp_size=config.virtual_pipeline_model_parallel_size
    )
    with torch.no_grad():
        stored = forward(
            forward_step_func=forward_step,
            data_iterator=iter([{"tokens": tokens}]),
            model=chunks,
            num_microbatches=1,
            seq_length=length,
            micro_batch_size=batch,
            forward_only=True,
            p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=config),
            pg_collection=pg,
        )
    return stored[0]["logits"] if stored else None


def _greedy(chunks, pg, prompt: torch.Tensor, new_tokens: int, length: int) -> list[int]:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (1-D): each step runs the whole sequence right-padded
    to ``length`` (causal attention: the padding does not reach earlier positions; sequence parallelism needs a
    length divisible by TP)."""
    sequence = prompt.tolist()
    for _ in range(new_tokens):
        tokens = torch.zeros(1, length, dtype=torch.long)
        tokens[0, : len(sequence)] = torch.tensor(sequence)
        logits = _logits(chunks, pg, tokens)
        choice = torch.tensor([-1 if logits is None else int(logits[0, len(sequence) - 1].argmax())])
        torch.distributed.all_reduce(choice, op=torch.distributed.ReduceOp.MAX)
        sequence.append(int(choice))
    return sequence[len(prompt) :]


def _train_save_and_run(root: str, tokenizer_dir: str, tokens: torch.Tensor):
    """Train TRAIN_STEPS steps at LAYOUT with Muon + AdamW, save (config.yaml is the run's), then our logits of
    ``tokens`` and greedy tokens after its first PROMPT_LENGTH tokens."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import DataConfig, ParallelConfig, PretrainConfig, to_yaml
    from megatron_muon.optim.build import MuonConfig, build_optimizer
    from megatron_muon.training.checkpoint import save_checkpoint
    from megatron_muon.training.step import synthetic_batches, train_step

    pg = ProcessGroupCollection.use_mpu_process_groups()
    model_config = _model_config()
    chunks = _build(model_config, pg, LAYOUT)
    optimizer = build_optimizer(
        chunks,
        OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-3, weight_decay=0.01, clip_grad=1.0),
        MuonConfig(lr=0.02, weight_decay=0.01, compute_dtype="float32"),
        pg,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=3e-3,
        max_lr=3e-3,
        min_lr=3e-3,
        lr_warmup_steps=0,
        lr_decay_steps=10,
        lr_decay_style="constant",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    data = synthetic_batches(
        vocab_size=model_config.vocab_size,
        seq_length=model_config.seq_length,
        micro_batch_size=2,
        num_microbatches=2,
        data_parallel_rank=pg.dp.rank(),
        data_parallel_size=pg.dp.size(),
    )
    for _ in range(TRAIN_STEPS):
        kwargs = dict(
            num_microbatches=2, seq_length=model_config.seq_length, micro_batch_size=2, pg_collection=pg
        )
        assert not train_step(chunks, optimizer, data, **kwargs)["skipped"]
        scheduler.step(increment=1)
    run = PretrainConfig(
        model=model_config,
        parallel=ParallelConfig(world_size=4, **LAYOUT),
        data=DataConfig(mock=True, tokenizer_path=tokenizer_dir),
    )
    save_checkpoint(
        root,
        TRAIN_STEPS,
        chunks,
        optimizer,
        scheduler,
        consumed_samples=TRAIN_STEPS * 4,
        config_yaml=to_yaml(run),
        keep_last=0,
    )
    logits = _logits(chunks, pg, tokens)
    greedy = _greedy(chunks, pg, tokens[0, :PROMPT_LENGTH], NEW_TOKENS, model_config.seq_length)
    return logits, greedy


def _load_and_run(checkpoint: str, layout: dict, tokens: torch.Tensor):
    """Load the weights-only ``checkpoint`` at ``layout`` into a model built from its config.yaml: its logits of
    ``tokens``, the progress loaded, and the error of a load that is not ``finetune``."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config
    from megatron_muon.training.checkpoint import (
        CONFIG_FILENAME,
        CheckpointError,
        iteration_dir,
        load_checkpoint,
    )

    pg = ProcessGroupCollection.use_mpu_process_groups()
    model_config = load_config(str(iteration_dir(checkpoint, 0) / CONFIG_FILENAME)).model
    chunks = _build(model_config, pg, layout)
    try:
        load_checkpoint(checkpoint, chunks, None, None)
        full_load_error = None
    except CheckpointError as error:
        full_load_error = str(error)
    progress = load_checkpoint(checkpoint, chunks, None, None, finetune=True)
    return _logits(chunks, pg, tokens), progress, full_load_error


def _train_from(checkpoint: str, world_size: int, tokens: torch.Tensor):
    """Our trainer, configured by the checkpoint's config.yaml (resume it, finetune) on mock data: its logits of
    ``tokens`` after loading, its iteration then, and after one training step."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config, validate
    from megatron_muon.training.checkpoint import CONFIG_FILENAME, iteration_dir
    from megatron_muon.training.trainer import Trainer

    overrides = [
        "data.mock=true",
        "training.train_iters=1",
        "training.global_batch_size=2",
        "training.eval_interval=0",
        "training.exit_signal_handler=false",
    ]
    cfg = load_config(str(iteration_dir(checkpoint, 0) / CONFIG_FILENAME), overrides)
    trainer = Trainer(cfg, validate(cfg, world_size), ProcessGroupCollection.use_mpu_process_groups())
    loaded = (trainer.iteration, cfg.checkpoint.finetune, cfg.checkpoint.resume)
    logits = _logits(trainer.model, trainer.pg, tokens)
    for chunk in trainer.model:
        chunk.train()
    trainer.train()
    return logits, loaded, trainer.iteration


def _last_stage(values):
    return next(value for value in values if value[0] is not None)


def _convert(*args: str) -> subprocess.CompletedProcess:
    """tools/convert_checkpoint.py in a fresh process, on the CPU as the checkpoint it reads was trained (also on a
    GPU machine: ``MEGATRON_MUON_DEVICE=cpu``)."""
    env = {**os.environ, "MEGATRON_MUON_DEVICE": "cpu"}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


# ---------------------------------------------------------------------------------------------------
# Train at TP2·PP2·EP2, export, load with transformers, import back.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trained checkpoint (``megatron/``), its export (``hf/``, sharded) and the export imported (``imported/``)."""
    from megatron_muon.data.tokenizer import train_sentencepiece_tokenizer

    work = tmp_path_factory.mktemp("convert")
    (work / "text.txt").write_text("\n".join(TEXT.split(", ")) + "\n")
    train_sentencepiece_tokenizer([str(work / "text.txt")], str(work / "tokenizer"), vocab_size=300)
    tokens = _batch(MODEL["vocab_size"])
    per_rank = run_distributed(
        _train_save_and_run,
        4,
        **LAYOUT,
        args=(str(work / "megatron"), str(work / "tokenizer"), tokens),
        timeout_s=300,
    )
    logits, greedy = _last_stage(per_rank)
    assert all(value[1] == greedy for value in per_rank), "ranks decoded different tokens"
    exported = _convert(
        "export", str(work / "megatron"), str(work / "hf"), "--max-shard-size", "150KB", "--no-progress"
    )
    assert exported.returncode == 0, exported.stderr
    imported = _convert(
        "import",
        str(work / "hf"),
        str(work / "imported"),
        "--tp",
        "2",
        "--ep",
        "2",
        "--etp",
        "1",
        "--no-progress",
    )
    assert imported.returncode == 0, imported.stderr
    return work, tokens, logits, greedy, exported.stdout + imported.stdout


def test_export_is_a_sharded_qwen3_moe_directory(trained):
    work, _, _, _, stdout = trained
    hf = work / "hf"
    assert "architecture qwen3_moe" in stdout, stdout
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [0], config
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((hf / name).is_file() for name in shards), shards
    # 4 layers x (q, k, v, o, q_norm, k_norm, 2 norms); layer 0: a dense MLP (3); layers 1-3: a router and
    # 4 experts x 3; embeddings, final norm, lm_head. No optimizer state.
    assert len(index["weight_map"]) == 4 * 8 + 3 + 3 * (1 + 4 * 3) + 3, len(index["weight_map"])


def test_transformers_logits_and_greedy_tokens_match_ours(trained):
    work, tokens, ours, greedy, _ = trained
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        theirs = model(tokens).logits
    difference = (theirs - ours).abs().max().item()
    print(f"max |logits HF - ours at TP2·PP2·EP2| after export: {difference:.3e}")
    assert difference <= 1e-4, difference
    generated = model.generate(
        tokens[:1, :PROMPT_LENGTH],
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert generated[0, PROMPT_LENGTH:].tolist() == greedy


def test_exported_tokenizer_tokenizes_as_ours(trained):
    import sentencepiece

    work = trained[0]
    ours = sentencepiece.SentencePieceProcessor(model_file=str(work / "tokenizer" / "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(work / "hf")
    for text in ("The quiet river of Verona", "  two spaces,\nnew line", "unseen ✓ 42"):
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text


def test_import_of_the_export_loads_at_tp1_with_the_original_logits(trained):
    work, tokens, ours, _, _ = trained
    (result,) = run_distributed(
        _load_and_run, 1, args=(str(work / "imported"), dict(tp=1, pp=1, ep=1), tokens)
    )
    logits, progress, full_load_error = result
    assert progress == {"iteration": 0, "consumed_samples": 0}
    assert "weights only" in full_load_error and "finetune=True" in full_load_error, full_load_error
    difference = (logits - ours).abs().max().item()
    print(f"max |logits imported at TP1 - original at TP2·PP2·EP2|: {difference:.3e}")
    assert difference <= 1e-5, difference


def test_our_trainer_starts_from_the_import_at_tp2_ep2_with_the_original_logits(trained):
    work, tokens, ours, _, _ = trained
    per_rank = run_distributed(_train_from, 2, tp=2, ep=2, etp=1, args=(str(work / "imported"), 2, tokens))
    logits, loaded, iteration_after_one_step = per_rank[0]
    assert loaded == (0, True, str((work / "imported").resolve())), loaded
    assert iteration_after_one_step == 1
    difference = (logits - ours).abs().max().item()
    print(f"max |logits imported, trainer at TP2·EP2 - original at TP2·PP2·EP2|: {difference:.3e}")
    assert difference <= 1e-5, difference


def test_reshard_verifies_and_reports(trained):
    from megatron_muon.convert import ConversionError, Layout, verify_reshard

    work = trained[0]
    report = verify_reshard(work / "megatron", Layout(tp=1, pp=2, ep=1, world_size=4))
    text = "\n".join(report.lines())
    assert "loads directly at TP1·PP2·EP1·ETP1 (world 4)" in text and "no conversion written" in text, text
    assert report.model_tensors == 4 * 6 + 2 + 3 * (1 + 4 * 2) + 3 and report.muon_tensors > 0, text
    assert report.adam_tensors > 0 and "re-derived" in text, text
    assert "finetune" in "\n".join(verify_reshard(work / "imported", Layout(tp=2, ep=2, etp=1)).lines())
    with pytest.raises(ConversionError, match="parallel.ep=3 does not divide model.num_moe_experts=4"):
        verify_reshard(work / "megatron", Layout(ep=3, world_size=3))
    bad = _convert("reshard", str(work / "megatron"), "--tp", "3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in bad.stderr, bad.stderr


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written (these checks run before any tensor is read).
# ---------------------------------------------------------------------------------------------------


def _refused(action, output: Path) -> str:
    from megatron_muon.convert import ConversionError

    with pytest.raises(ConversionError) as error:
        action(output)
    message = str(error.value)
    assert "\n" not in message, message
    assert not output.exists() and not output.with_name(f".{output.name}.partial").exists(), message
    return message


def test_bad_inputs_fail_with_one_line_and_write_nothing(trained, tmp_path):
    from megatron_muon.convert import export_to_hf, import_from_hf
    from megatron_muon.training.checkpoint import iteration_dir

    work = trained[0]
    out = tmp_path / "out"

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    message = _refused(lambda o: import_from_hf(llama, o), out)
    assert "unsupported architecture LlamaForCausalLM (model_type 'llama')" in message, message

    message = _refused(lambda o: export_to_hf(work / "megatron", o, architecture="mixtral"), out)
    assert "mixtral: model.qk_layernorm=true" in message and "dense layers [0]" in message, message

    shapes = tmp_path / "shapes"
    shutil.copytree(work / "hf", shapes)
    config = json.loads((shapes / "config.json").read_text())
    config["moe_intermediate_size"] = 32
    (shapes / "config.json").write_text(json.dumps(config))
    message = _refused(lambda o: import_from_hf(shapes, o), out)
    assert "36 tensor(s) with another shape" in message, message  # 3 MoE layers x 4 experts x 3

    missing = tmp_path / "missing"
    shutil.copytree(work / "hf", missing)
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = _refused(lambda o: import_from_hf(missing, o), out)
    assert f"shard {shard.name} listed in model.safetensors.index.json is missing" in message, message

    broken = tmp_path / "broken"
    shutil.copytree(iteration_dir(work / "megatron", TRAIN_STEPS), broken)
    distcp = sorted(broken.glob("*.distcp"))[-1]
    distcp.unlink()
    message = _refused(lambda o: export_to_hf(broken, o), out)
    assert f"shard file {distcp.name} is missing" in message, message

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  num_layers: 4\n  num_moe_experts: 8\n  qk_layernorm: true\n")
    message = _refused(lambda o: export_to_hf(work / "megatron", o, config_path=wrong), out)
    assert "does not match its model config" in message and "with another shape" in message, message


# ---------------------------------------------------------------------------------------------------
# Hand-made Hugging Face models of every supported architecture.
# ---------------------------------------------------------------------------------------------------

HAND_MADE = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, rms_norm_eps=1e-6),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=0,
        num_experts=4,
        norm_topk_prob=True,
        qkv_bias=False,
        mlp_only_layers=[1],
        tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        norm_topk_prob=True,
        mlp_only_layers=[0],
    ),
    "glm4_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        use_qk_norm=True,
        n_group=1,
        topk_group=1,
    ),
}


def _hand_made(name: str, directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """A random HF model of architecture ``name`` saved to ``directory``; its logits of ``tokens``."""
    config = transformers.AutoConfig.for_model(
        name,
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0},
        **HAND_MADE[name],
    )
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.1)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
        model.save_pretrained(directory)
        return model(tokens).logits


def _import_load_and_export(names: list[str], root: str, tokens: torch.Tensor):
    """In one process: import each ``root/<name>/hf``, load it with our model at TP1, its logits, and export
    it back to ``root/<name>/back``."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config
    from megatron_muon.convert import export_to_hf, import_from_hf
    from megatron_muon.training.checkpoint import CONFIG_FILENAME, iteration_dir, load_checkpoint

    pg = ProcessGroupCollection.use_mpu_process_groups()
    results = {}
    for name in names:
        work = Path(root) / name
        report = import_from_hf(work / "hf", work / "megatron", progress=False)
        model_config = load_config(str(iteration_dir(work / "megatron", 0) / CONFIG_FILENAME)).model
        chunks = _build(model_config, pg, dict(tp=1, pp=1, ep=1))
        load_checkpoint(work / "megatron", chunks, None, None, finetune=True)
        export_to_hf(work / "megatron", work / "back", progress=False)
        results[name] = (report.architecture, _logits(chunks, pg, tokens))
    return results


def test_hand_made_models_of_every_architecture_import_match_and_export_back(tmp_path):
    from safetensors import safe_open

    from megatron_muon.convert import ARCHITECTURES

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = {name: _hand_made(name, tmp_path / name / "hf", tokens) for name in ARCHITECTURES}
    (results,) = run_distributed(
        _import_load_and_export, 1, args=(list(ARCHITECTURES), str(tmp_path), tokens)
    )
    for name, (architecture, logits) in results.items():
        assert architecture == name
        difference = (logits - expected[name]).abs().max().item()
        print(f"{name}: max |logits ours (imported, TP1) - HF|: {difference:.3e}")
        assert difference <= 1e-4, (name, difference)
        original, back = (
            tmp_path / name / "hf" / "model.safetensors",
            tmp_path / name / "back" / "model.safetensors",
        )
        with safe_open(str(original), "pt") as before, safe_open(str(back), "pt") as after:
            extra = set(after.keys()) - set(before.keys())
            assert not set(before.keys()) - set(after.keys()), name
            assert all(name == "qwen2_moe" and key.endswith("_proj.bias") for key in extra), (name, extra)
            for key in before.keys():
                if key.endswith(
                    "shared_expert_gate.weight"
                ):  # gates a 0-wide expert: no effect, written as 0
                    continue
                assert torch.equal(before.get_tensor(key), after.get_tensor(key)), (name, key)
