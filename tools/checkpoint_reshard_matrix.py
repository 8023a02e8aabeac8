"""Save a checkpoint at each layout and load every one at all of them (64 pairs); print the largest loss
difference of each resumed run against the saving layout's own continuation.

    python tools/checkpoint_reshard_matrix.py [--layouts w1,tp2_dp2,...] [--json OUT]

World 1 and world 4 (TP2·PP2·EP2, DP4·EP4, TP2·DP2, PP4, TP2·EP2·expert-TP2, TP2·DP2 with the distributed
optimizer, DP4·EP2 with FSDP); all eight: ~14 minutes on 2 idle cores; ``--layouts`` runs the square of a subset (two process starts
per layout). The
logic lives in ``megatron_muon/testing/reshard_matrix.py`` (the CI test runs a covering subset of it).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from megatron_muon.testing.reshard_matrix import LAYOUTS, matrix_markdown, run_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the losses to this file")
    parser.add_argument(
        "--layouts", help=f"comma-separated subset of {', '.join(LAYOUTS)} (default: all)", default=None
    )
    args = parser.parse_args()
    names = (
        list(LAYOUTS) if args.layouts is None else [n.strip() for n in args.layouts.split(",") if n.strip()]
    )
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown or not names:
        parser.error(f"--layouts={args.layouts!r}: {unknown or 'none given'}; valid: {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory(prefix="reshard_matrix_") as root:
        result = run_matrix(root, names)
    print(matrix_markdown(result))
    if args.json:
        serializable = {
            "losses": result["losses"],
            "resumed": {
                f"{source}->{target}": values for (source, target), values in result["resumed"].items()
            },
        }
        with open(args.json, "w") as handle:
            json.dump(serializable, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
