"""Timers shared by every benchmark.

- :func:`time_interleaved`: several implementations side by side, one call of each per round in a
  new random order every round. On CPU each call is timed with ``time.perf_counter``; on CUDA with
  two CUDA events around the call (device time, no host synchronisation inside the span). A small
  shared machine drifts, and a call runs slower right after some neighbours (a memory-heavy one
  especially), so interleaving in a random order gives every implementation the same conditions:
  their ratios hold even when the absolute times move.
- :func:`time_do_bench`: one implementation at a time on a GPU with ``triton.testing.do_bench``
  (CUDA events, L2 flushed between calls), or CUDA events by hand when Triton is missing.

Every timer returns a :class:`Timing`: median, 20th and 80th percentiles, minimum and maximum in
milliseconds (``do_bench`` reports no minimum or maximum), and the number of timed calls.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Budget:
    """How long to time one implementation: ``warmup`` untimed calls, then between ``min_repeats``
    and ``max_repeats`` timed calls, stopping once ``seconds`` have passed (on CUDA with
    :func:`time_do_bench`, ``seconds`` is do_bench's ``rep``)."""

    warmup: int
    min_repeats: int
    max_repeats: int
    seconds: float = 0.0

    @classmethod
    def rounds(cls, repeats: int, warmup: int = 1) -> Budget:
        """Exactly ``repeats`` timed calls."""
        return cls(warmup=warmup, min_repeats=repeats, max_repeats=repeats, seconds=0.0)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: Optional[float]  # None: the timer does not report it (do_bench)
    max_ms: Optional[float]
    repeats: int  # -1: do_bench chose the count itself
    samples_ms: Optional[List[float]] = None  # every timed call, in order (not from do_bench)

    def as_record(self, samples: bool = False) -> Dict[str, object]:
        record = asdict(self)
        if not samples:
            del record["samples_ms"]
        return record


def quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (numpy's default rule)."""
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarise(samples_ms: List[float]) -> Timing:
    ordered = sorted(samples_ms)
    median, p20, p80 = (quantile(ordered, q) for q in QUANTILES)
    return Timing(median, p20, p80, ordered[0], ordered[-1], len(ordered), list(samples_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(step: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it on a GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1e3


def time_interleaved(steps: Dict[str, Callable[[], object]], budgets: Dict[str, Budget],
                     device: torch.device, seed: int = 0) -> Dict[str, Timing]:
    """Time several steps side by side: after each one's warm-up, rounds of one call of each, in a
    new random order every round (seeded).

    The rounds go on until every step has its ``min_repeats`` and the sum of the budgets'
    ``seconds`` has passed, or every step has its ``max_repeats`` (a slow step drops out of the
    rounds at its maximum).
    """
    for name, step in steps.items():
        for _ in range(budgets[name].warmup):
            step()
    synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    seconds = sum(budgets[name].seconds for name in steps)
    order = random.Random(seed)
    started = time.perf_counter()
    while True:
        active = [name for name in steps if len(samples[name]) < budgets[name].max_repeats]
        short = any(len(samples[name]) < budgets[name].min_repeats for name in steps)
        if not active or (not short and time.perf_counter() - started >= seconds):
            break
        order.shuffle(active)
        for name in active:
            samples[name].append(_timed_call(steps[name], device))
    return {name: summarise(values) for name, values in samples.items()}


def time_do_bench(step: Callable[[], object], budget: Budget, device: torch.device) -> Timing:
    """One implementation on a GPU: ``triton.testing.do_bench`` with ``rep = budget.seconds``."""
    rep_ms = max(1.0, budget.seconds * 1e3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is None:
        return time_interleaved({"step": step}, {"step": budget}, device)["step"]
    median, p20, p80 = do_bench(step, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(float(median), float(p20), float(p80), None, None, -1)


def time_each(steps: Dict[str, Callable[[], object]], budgets: Dict[str, Budget],
              device: torch.device, seed: int = 0,
              on_error: Optional[Callable[[str, Exception], None]] = None) -> Dict[str, Timing]:
    """The default timer of a device: interleaved on CPU, ``do_bench`` one after the other on a GPU
    (the device is not shared). ``on_error(name, exc)`` is told about a step that raised; without it
    the exception propagates."""
    if device.type != "cuda":
        if on_error is not None:  # one call each first: a step that raises leaves the others timed
            for name, step in list(steps.items()):
                try:
                    step()
                except Exception as exc:
                    on_error(name, exc)
                    steps = {k: v for k, v in steps.items() if k != name}
        try:
            return time_interleaved(steps, budgets, device, seed)
        except Exception as exc:
            if on_error is None:
                raise
            for name in steps:
                on_error(name, exc)
            return {}
    timings = {}
    for name, step in steps.items():
        try:
            timings[name] = time_do_bench(step, budgets[name], device)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(name, exc)
    return timings
