"""Test configuration shared by every test module.

Without a GPU, Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must
be set before triton is imported, so it is set here, before any test module is collected.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def devices_for(*, cpu: bool = True):
    """The devices a backend test runs on: CPU always (when asked), CUDA when present."""
    out = ["cpu"] if cpu else []
    out.append(pytest.param("cuda", marks=requires_cuda))
    return out
