"""CUDA pretended, for the tests of what runs on a GPU machine: put this directory on ``PYTHONPATH`` and every Python
process of the run (the rank processes it spawns too) sees ``torch.cuda.is_available()`` True and one device, as on
the project's one-GPU image. There is no CUDA runtime behind it: code that takes a GPU path crashes ("Found no NVIDIA
driver"), which is what the tests look for.

torch's own queries of the runtime where CUDA is available (is a CUDA graph being captured, asked by every torch
optimizer step) are answered as a GPU at rest answers them: no. torch.compile consults the runtime further (RNG
state, stream capture): run with ``TORCHDYNAMO_DISABLE=1``.
"""

import torch


class _StreamAtRest:
    def is_capturing(self) -> bool:
        return False


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.is_current_stream_capturing = lambda: False
torch.accelerator.current_stream = lambda device=None: _StreamAtRest()
