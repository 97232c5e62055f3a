"""The schemas of the ops, as csrc/torch_bindings.cpp defines them for the compiled extension, for
the backends that define the same ops in Python (``gala_triton::*``, ``gala_ref::fused_ce_fwd``).

One :class:`torch.library.Library` per namespace; an op is defined from its schema string and
implemented by a plain function for every device (``CompositeExplicitAutograd``), so eager calls
and ``torch.compile`` see the same op as the compiled backends.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

# gala::fused_ce_fwd: (loss, grad, raw_stats, raw_pairwise, counts)
FUSED_CE_ARGUMENTS = (
    "Tensor labels, Tensor? class_bias, Tensor? weight, int ignore_index, int reduction, "
    "float label_smoothing, bool compute_stats, bool track_pairwise"
)
FUSED_CE_OUTPUTS = "(Tensor loss, Tensor grad, Tensor raw_stats, Tensor raw_pairwise, Tensor counts)"
# gala::fused_ce_step_: (loss, grad); the state's tensors are mutated
STEP_ARGUMENTS = (
    "Tensor labels, Tensor? weight, Tensor(a!)[] stats, Tensor(b!)[] running, Tensor(c!) steps, "
    "Tensor(d!) nonfinite_rows, Tensor(e!) scratch, Tensor(f!)? raw_pairwise, Tensor(g!) label_error, "
    "float lambda1, float eps, int ignore_index, int reduction, float label_smoothing, int accumulation, "
    "float ema_beta, bool fold, int row_offset"
)
FOLD_SCHEMA = (
    "fold_step_(Tensor(a!) scratch, Tensor(b!)? raw_pairwise, Tensor(c!)[] stats, Tensor(d!)[] running, "
    "Tensor(e!)? pairwise, Tensor(f!)? running_pairwise, Tensor(g!) steps, Tensor(h!) nonfinite_rows, "
    "int accumulation, float ema_beta) -> ()"
)

_libraries: Dict[str, torch.library.Library] = {}


def define(namespace: str, schema: str, implementation: Callable):
    """Define ``namespace::<schema>`` and implement it with ``implementation``; returns the op."""
    library = _libraries.get(namespace)
    if library is None:
        library = _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    name = library.define(schema)
    library.impl(name, implementation, "CompositeExplicitAutograd")
    return getattr(getattr(torch.ops, namespace), name).default
