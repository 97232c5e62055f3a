"""gala_kernels: fused GALA (Gradient-Aware Logit Adjustment) loss kernels.

The contract is docs/contract.md; the public names are::

    GALAState, GALALoss, fused_gala_ce, fused_linear_gala_ce, PredictionRebalancer, fit_tau, lt_accuracy,
    reference.gala_ce
"""

from . import _extension, backends, class_parallel, distributed, reference
from ._extension import cached_cpu_buffer_bytes, release_cpu_buffers
from .linear import fused_linear_gala_ce
from .loss import GALALoss, fused_gala_ce
from .metrics import lt_accuracy
from .rebalance import PredictionRebalancer, fit_tau
from .state import GALAState

_extension.has_kernel("fused_ce_fwd", "CPU")  # loads _C (warns once, with the reason, if missing)

__all__ = [
    "GALAState", "GALALoss", "fused_gala_ce", "fused_linear_gala_ce", "PredictionRebalancer", "fit_tau",
    "lt_accuracy", "reference", "backends", "distributed", "class_parallel", "release_cpu_buffers",
    "cached_cpu_buffer_bytes",
]
__version__ = "0.1.0"
