"""Save a checkpoint at each of six layouts and load every one at all six (36 pairs); print the largest loss
difference of each resumed run against the saving layout's own continuation.

    python tools/checkpoint_reshard_matrix.py [--json OUT]

World 1 and world 4 (TP2·PP2·EP2, DP4·EP4, TP2·DP2, PP4, TP2·EP2·expert-TP2); ~10 minutes on 2 idle cores. The
logic lives in ``megatron_muon/testing/reshard_matrix.py`` (the CI test runs a covering subset of it).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from megatron_muon.testing.reshard_matrix import matrix_markdown, run_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the losses to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reshard_matrix_") as root:
        result = run_matrix(root)
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
