"""The one parser of the trainer's per-iteration log line that the launcher-driven tools share."""

from __future__ import annotations

import math

from megatron_muon.bench.launcher_runs import iteration_values

LOG = """\
checkpoint.resume=none: starting from scratch
 iteration      1/500 | consumed samples        16 | consumed tokens       2,048 | ms/iter   1000.0 | tokens/s      2048 | lr muon 1.000e-04 adamw 1.000e-04 | lm loss 8.3400 | grad norm 1.000 | MFU n/a | skipped 0
 validation at iteration 250 | lm loss 4.7000 | perplexity 109.95
 iteration     12/500 | consumed samples       192 | consumed tokens      24,576 | ms/iter    812.5 | tokens/s      2521 | lr muon 1.000e-04 adamw 1.000e-04 | lm loss nan | grad norm 1.000 | MFU 1.2% | skipped 1
 iteration    500/500 | consumed samples      8000 | consumed tokens   1,024,000 | ms/iter    950.0 | tokens/s      2156 | lr muon 1.000e-04 adamw 1.000e-04 | lm loss 4.0210 | grad norm 1.000 | MFU n/a | skipped 0
"""


def test_each_field_of_the_iteration_line_reads_by_name():
    assert iteration_values(LOG, "ms/iter") == [(1, 1000.0), (12, 812.5), (500, 950.0)]
    assert iteration_values(LOG, "tokens/s", first_iteration=11) == [(12, 2521.0), (500, 2156.0)]
    assert iteration_values(LOG, "consumed tokens")[-1] == (500, 1_024_000.0)  # thousands separators
    losses = iteration_values(LOG, "lm loss")  # the validation line is not an iteration line
    assert [i for i, _ in losses] == [1, 12, 500] and math.isnan(losses[1][1]) and losses[2][1] == 4.021


def test_a_field_the_line_lacks_gives_nothing():
    assert (
        iteration_values(LOG, "loss") == [] and iteration_values(LOG, "MFU") == []
    )  # "n/a" / "1.2%" are no numbers
