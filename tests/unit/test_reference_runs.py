"""tools/reference_runs.py with the launcher replaced by a canned log: which runs train, what is recorded, and the
section written from the recorded rows alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from megatron_muon.bench import reference_runs as tool
from megatron_muon.bench.launcher_runs import VALIDATION

LOG = """\
 iteration      1/500 | consumed samples        16 | consumed tokens       2,048 | ms/iter   1000.0 | tokens/s      2048 | lr muon 1.000e-04 adamw 1.000e-04 | lm loss 8.3400 | grad norm 1.000 | MFU n/a | skipped 0
 validation at iteration 250 | lm loss 4.7000 | perplexity 109.95
 iteration    500/500 | consumed samples      8000 | consumed tokens   1,024,000 | ms/iter   1000.0 | tokens/s      2048 | lr muon 1.000e-04 adamw 1.000e-04 | lm loss 4.0210 | grad norm 1.000 | MFU n/a | skipped 0
 validation at iteration 500 | lm loss 4.3800 | perplexity 79.84
"""


@pytest.fixture
def launcher(monkeypatch):
    """The launcher and the corpus replaced: every run prints LOG; the unigram entropy is 6.3."""
    calls = []

    def run_training(config, overrides):
        calls.append((config, overrides))
        validation = [(int(m[1]), float(m[2])) for m in VALIDATION.finditer(LOG)]
        return SimpleNamespace(validation=validation, stdout=LOG, wall_s=600.0)

    monkeypatch.setattr(tool, "run_training", run_training)
    monkeypatch.setattr(tool, "validation_unigram_nats", lambda prefix, split: 6.3)
    return calls


def test_runs_train_once_per_code_version_and_the_section_comes_from_the_rows(
    tmp_path, launcher, monkeypatch
):
    results = tmp_path / "evaluations.csv"
    page = tmp_path / "benchmarks.md"
    argv = ["--runs", "default", "--results", str(results), "--markdown", str(page)]
    assert tool.main(argv) == 0
    assert launcher == [("launch/configs/tiny_cpu.yaml", ["logging.log_interval=100"])]  # eval_interval: 100
    text = page.read_text()
    assert "| unigram model of the training documents, on the validation documents | 6.3000 | 544.6 |" in text
    assert "| validation loss at iteration 250 / 500 | 4.700 / **4.380** | 110 / **80** |" in text
    assert "| training loss at iteration 1 / 500 | 8.340 / 4.021 | |" in text
    assert f"ends **{6.3 - 4.38:.2f} nats/token below the unigram entropy**" in text
    assert "500 iterations × 2,048 tokens" in text and "Not run yet: moonlight_proxy" in text

    assert tool.main(argv) == 0 and len(launcher) == 1  # the same code: nothing trains again
    monkeypatch.setattr(tool, "code_version", lambda: "another-version")
    assert (
        tool.main([*argv, "--publish-only"]) == 0 and len(launcher) == 1
    )  # the latest run, named by its version
    assert f"code version `{tool.read_rows(results)[0]['code_version']}`" in page.read_text()
    assert tool.main(argv) == 0 and len(launcher) == 2  # new code: the run trains again
    # Training one run keeps the other runs' tables already in the file.
    assert tool.main(["--runs", "moonlight_proxy", "--results", str(results), "--markdown", str(page)]) == 0
    text = page.read_text()
    assert "`launch/configs/tiny_cpu.yaml`" in text and "`launch/configs/moonlight_proxy_cpu.yaml`" in text
    assert "Not run yet" not in text and len(launcher) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "huge"], "--runs huge: unknown; valid: default, moonlight_proxy"),
        (["--publish-only"], "no finished run of default moonlight_proxy (drop --publish-only)"),
    ],
)
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, launcher, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv, "--results", str(tmp_path / "evaluations.csv")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert launcher == []


def test_training_losses_are_read_from_the_iteration_log():
    assert tool.training_losses(LOG) == [(1, 8.34), (500, 4.021)]
    assert math.isclose(math.exp(6.3), 544.57, rel_tol=1e-4)
