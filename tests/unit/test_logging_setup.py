"""megatron_muon/logging_setup.py: the known benign warnings are silenced, nothing else is, and verbose keeps
them all. Run in a fresh interpreter: the filters are process-wide."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys, warnings
from megatron_muon.logging_setup import silence_known_warnings
logging.basicConfig(stream=sys.stdout, format="LOG %(name)s %(message)s")
silence_known_warnings(verbose={verbose}, cuda=False)
silence_known_warnings(verbose={verbose}, cuda=False)  # twice: no double filters, nothing else changes
warnings.showwarning = lambda message, category, *args: print("WARN", category.__name__, message)
warnings.warn("Apex is not installed. Falling back to Torch Norm")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...", FutureWarning)
warnings.warn("something else went wrong")
warnings.warn("Apex is not installed", DeprecationWarning)  # right message, other category: not ours
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. GPTModel is ...")
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("a real problem in the model")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME=x")
"""


def run(verbose: bool) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT.format(verbose=verbose)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_known_warnings_are_silenced_and_others_are_not():
    assert run(verbose=False) == [
        "WARN UserWarning something else went wrong",
        "WARN DeprecationWarning Apex is not installed",
        "LOG megatron.core.models.gpt.gpt_model a real problem in the model",
    ]


def test_verbose_keeps_every_warning():
    lines = run(verbose=True)
    assert len(lines) == 8, lines
    assert "LOG megatron.core.models.gpt.gpt_model GPTModel IS DEPRECATED. GPTModel is ..." in lines
    assert "LOG torch.utils.cpp_extension No CUDA runtime is found, using CUDA_HOME=x" in lines
