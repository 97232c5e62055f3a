"""Out-of-range labels on CUDA, without stopping the host (docs/contract.md, "Errors").

A label that is neither ``ignore_index`` nor in ``[0, C)`` cannot be found without looking at the
labels, and looking at device data from the host waits for the GPU. So a CUDA training step does
not look: its kernel never reads or writes out of bounds, gives the bad rows zero gradient and a
NaN loss, skips the fold (the state is left untouched) and records the first bad row in
``state.label_error``, an int64 device buffer::

    label_error[FLAG]          1 once an error is recorded (the first one is kept until raised)
    label_error[ROW]           the row of the batch (of the whole batch for the fused linear layer)
    label_error[LABEL]         its label
    label_error[STEP]          state.steps when it happened
    label_error[IGNORE_INDEX]  the call's ignore_index, for the message
    label_error[CALL_KEY]      kernel scratch, 0 between launches: max over the bad rows r of a
                               launch of ROW_KEY_BASE - r (so the first bad row wins)

After each eager step the host starts a copy of that buffer into pinned memory and records an
event (:func:`start_copy`); the next call with the same state reads the copy if the event has
completed (:func:`raise_pending`, no waiting) and raises ``ValueError`` naming the row and label.
``GALAState.check_errors()`` copies the record once more and waits for it. While a CUDA graph is
being captured no copy is made (the record stays on the device until the next eager call or
``check_errors()``). ``GALA_SYNC_LABEL_CHECK=1`` in the environment restores the synchronous
check: every CUDA call looks at its labels first (one host synchronisation) and raises at once.
CPU tensors always raise at once (looking costs nothing there).
"""

from __future__ import annotations

import os
import weakref

import torch

SLOTS = 6
FLAG, ROW, LABEL, STEP, IGNORE_INDEX, CALL_KEY = range(SLOTS)
ROW_KEY_BASE = 1 << 40  # rows of a launch are below this

# state -> (host copy of state.label_error, CUDA event recorded after the copy, or None on CPU)
_pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The Triton interpreter runs on CPU tensors; tests set this to give them the CUDA behaviour.
deferred_on_cpu = False


def message(row: int, label: int, num_classes: int, ignore_index: int) -> str:
    return (f"labels[{row}] = {label} is out of range: labels must be in [0, {num_classes}) or equal "
            f"ignore_index={ignore_index}")


def sync_check_requested() -> bool:
    """Whether ``GALA_SYNC_LABEL_CHECK`` asks CUDA calls to check their labels synchronously."""
    return os.environ.get("GALA_SYNC_LABEL_CHECK", "0") not in ("", "0")


def deferred(device: torch.device) -> bool:
    """Whether a training step on ``device`` records bad labels instead of checking them first."""
    if device.type == "cuda":
        return not sync_check_requested()
    return deferred_on_cpu


def check_now(labels: torch.Tensor, num_classes: int, ignore_index: int, *, row_offset: int = 0) -> None:
    """Raise ValueError naming the first label outside ``[0, C)`` that is not ``ignore_index``.

    One reduction and, on a GPU, one host synchronisation. Skipped while torch.compile traces
    (the kernels themselves never read out of bounds).
    """
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(message(row_offset + index, int(labels[index]), num_classes, ignore_index))


def _raise_from(state, host: torch.Tensor) -> None:
    record = host.tolist()
    if record[FLAG] == 0:
        return
    forget(state)
    with torch.no_grad():
        state.label_error.zero_()
    raise ValueError(
        message(record[ROW], record[LABEL], state.num_classes, record[IGNORE_INDEX])
        + f" (met by the training step after {record[STEP]} folded steps; that step changed nothing)"
    )


def raise_pending(state, *, wait: bool = False) -> None:
    """Raise the error recorded in ``state.label_error``, if any.

    ``wait=False`` (every call): look at the last copy only if it has landed. ``wait=True``
    (``GALAState.check_errors``): copy the record now and wait for the work queued before it.
    """
    if torch.compiler.is_compiling():
        return
    buffer = state.label_error
    if buffer.device.type == "cuda" and not wait and torch.cuda.is_current_stream_capturing():
        return  # no event query while a CUDA graph is being captured; a later call looks
    if wait:
        if buffer.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("check_errors() cannot wait for the GPU while a CUDA graph is being captured")
        start_copy(state)
    entry = _pending.get(state)
    if entry is None:
        return
    host, event = entry
    if event is not None:
        if wait:
            event.synchronize()
        elif not event.query():
            return
    _raise_from(state, host)


def start_copy(state) -> None:
    """Start copying ``state.label_error`` to the host (pinned memory, an event after the copy)."""
    if torch.compiler.is_compiling():
        return
    buffer = state.label_error
    if buffer.device.type != "cuda":
        _pending[state] = (buffer, None)  # already on the host: nothing to wait for
        return
    if torch.cuda.is_current_stream_capturing():
        return  # an event recorded during capture cannot be queried; the record stays on the device
    entry = _pending.get(state)
    if entry is None or entry[0].shape != buffer.shape:
        entry = (torch.zeros(buffer.shape, dtype=buffer.dtype, pin_memory=True), torch.cuda.Event())
        _pending[state] = entry
    host, event = entry
    host.copy_(buffer, non_blocking=True)
    event.record()


def forget(state) -> None:
    _pending.pop(state, None)
