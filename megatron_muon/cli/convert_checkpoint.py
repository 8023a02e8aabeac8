"""Convert checkpoints between megatron (ours, any TP/PP/EP/DP layout) and Hugging Face, and verify a checkpoint
for another layout. One CPU process; no GPU, no model-parallel groups. See docs/conversion.md.

    # megatron -> Hugging Face (config.json, model*.safetensors, tokenizer when the run has one)
    .venv/bin/python tools/convert_checkpoint.py export checkpoints/tiny_cpu hf/tiny [--architecture auto]
    # Hugging Face -> megatron weights-only checkpoint (train with checkpoint.finetune=true)
    .venv/bin/python tools/convert_checkpoint.py import hf/tiny checkpoints/from_hf [--tp 2 --ep 2]
    # megatron -> megatron at another layout: verified and reported (the trainer loads it directly)
    .venv/bin/python tools/convert_checkpoint.py reshard checkpoints/tiny_cpu --tp 1 --pp 2 --ep 1 --world-size 4

Errors are one line on stderr (exit status 2) and leave nothing written.
"""

from __future__ import annotations

import argparse
import sys


def _add_layout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    parser.add_argument(
        "--world-size", type=int, default=None, help="processes (default: the smallest that fits the layout)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The subcommand (export, import or reshard) and its options from ``argv`` (None: ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="megatron checkpoint -> Hugging Face model directory")
    export.add_argument("checkpoint", help="checkpoint root (its latest) or one iter_* directory")
    export.add_argument("output", help="Hugging Face model directory to write")
    export.add_argument(
        "--architecture",
        default="auto",
        choices=["auto", "mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe"],
        help="auto: the first that represents the model exactly",
    )
    export.add_argument(
        "--config", default=None, help="the run's YAML (default: config.yaml in the checkpoint)"
    )
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    export.add_argument(
        "--tokenizer", default=None, help="SentencePiece model or directory (default: the run's)"
    )
    export.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")

    imported = commands.add_parser("import", help="Hugging Face model directory -> megatron checkpoint")
    imported.add_argument("source", help="Hugging Face model directory (config.json + safetensors)")
    imported.add_argument("output", help="checkpoint root to write")
    _add_layout(imported)
    imported.add_argument(
        "--seq-length", type=int, default=None, help="training sequence length for config.yaml"
    )
    imported.add_argument(
        "--precision", default=None, choices=["fp32", "bf16"], help="default: the model's dtype"
    )

    reshard = commands.add_parser("reshard", help="verify a checkpoint for another layout (no conversion)")
    reshard.add_argument("checkpoint", help="checkpoint root (its latest) or one iter_* directory")
    _add_layout(reshard)
    reshard.add_argument(
        "--config", default=None, help="the run's YAML (default: config.yaml in the checkpoint)"
    )

    for sub in (export, imported):
        sub.add_argument("--force", action="store_true", help="replace a non-empty output")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    """Run the subcommand; the report lines."""
    from megatron_muon.convert import Layout, export_to_hf, import_from_hf, verify_reshard

    if args.command == "export":
        report = export_to_hf(
            args.checkpoint,
            args.output,
            architecture=args.architecture,
            config_path=args.config,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer=args.tokenizer,
            with_tokenizer=not args.no_tokenizer,
            overwrite=args.force,
            progress=not args.no_progress,
        )
        return report.lines()
    layout = Layout(
        tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp, world_size=args.world_size
    )
    if args.command == "import":
        import_report = import_from_hf(
            args.source,
            args.output,
            layout=layout,
            seq_length=args.seq_length,
            precision=args.precision,
            overwrite=args.force,
            progress=not args.no_progress,
        )
        return import_report.lines()
    return verify_reshard(args.checkpoint, layout, config_path=args.config).lines()


def _quiet_libraries() -> None:
    """Keep stderr to our own line: the import-time warnings of torch / megatron-core on a CPU machine (no CUDA,
    no Transformer Engine or Apex, deprecations) say nothing about the conversion."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.utils.cpp_extension", "megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion ``argv`` asks for and print its report; exit status 0, or 2 with one line on error."""
    args = parse_args(argv)
    _quiet_libraries()
    # Imported after argument parsing so that --help is instant.
    from megatron_muon.convert import ConversionError

    try:
        lines = run(args)
    except (ConversionError, OSError) as error:
        print(f"convert_checkpoint {args.command}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(f"convert_checkpoint {args.command}: {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
