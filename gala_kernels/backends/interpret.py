"""Whether Triton kernels run in Triton's interpreter (on CPU tensors), as ``TRITON_INTERPRET`` says.

The variable must be set before triton is imported; the test suite sets it on machines without a
GPU, which is how the Triton kernels are tested there.
"""

from __future__ import annotations

import os


def triton_interpret_enabled() -> bool:
    """Whether Triton kernels run in its interpreter (CPU tensors), as TRITON_INTERPRET says."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
