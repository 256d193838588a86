"""Run the real Triton kernels on CPU tensors when no CUDA device is present.

TRITON_INTERPRET must be set before triton is imported, so this runs first.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests parametrised over DEVICES run on CPU (kernels in the interpreter) and, where a
# GPU is present, on CUDA as well.
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is present")
DEVICES = ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])]
