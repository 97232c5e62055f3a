"""The implementations the ``step`` benchmark compares, one ``setup`` each.

Every implementation times one call on logits ``(B, C)``. Most time a training *step*: forward,
``loss.backward()`` down to the logits and, for the GALA ones, the statistics update into a state
that persists across steps (as in training). Each step reads the next logits buffer of a
:class:`~gala_kernels.benchmark.rotation.Rotation` and frees its gradient afterwards, so every
step allocates and writes a fresh ``(B, C)`` gradient. The ``fused_op_*`` rows time the forward op
of a backend alone (loss, gradient and raw statistics in one call; no autograd, no fold): the
kernel and its dispatch, without the host work around it.

Nominal bytes of a step, for GB/s: read the logits once and write the gradient once,
``2 * B * C * itemsize``; the copy floor moves exactly those bytes (``out.copy_(logits)``).

Adding an implementation is a subclass with a ``name``, a ``label`` and a ``setup`` returning a
:class:`Prepared` (plus ``skip_reason`` when it cannot run everywhere), and one line in
:func:`all_implementations`. Examples of what fits this shape:

- a loss option timed against the plain call: ``FusedBackend("cpu", options={"label_smoothing": 0.1})``
  (its name and label carry the options);
- a CUDA-graph replay of a step: capture ``step()`` of another implementation in
  ``torch.cuda.CUDAGraph`` during ``setup`` (after a warm-up on a side stream) and return
  ``Prepared(graph.replay)``, skipping on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import backends, reference
from ..loss import fused_gala_ce
from ..state import GALAState
from .memory import available_memory_bytes
from .rotation import Rotation


@dataclass(frozen=True)
class Case:
    """One benchmarked shape. ``dry_run`` lets the Triton rows run on CPU tensors in the Triton
    interpreter (to check the benchmark's GPU code paths on a CPU; the times mean nothing)."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    classes: int
    dry_run: bool = False

    @property
    def step_bytes(self) -> int:
        """Read the logits + write the gradient: ``2 * B * C * itemsize``."""
        return 2 * self.batch * self.classes * self.dtype.itemsize

    @property
    def grad_bytes(self) -> int:
        return self.batch * self.classes * self.dtype.itemsize


@dataclass
class Prepared:
    step: Callable[[], None]
    setup_seconds: Optional[float] = None  # e.g. torch.compile time, excluded from the timing
    notes: str = ""


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autograd_step(loss_fn: LossFn, rotation: Rotation, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        logits = rotation.next()
        loss_fn(logits, labels).backward()
        logits.grad = None

    return step


def _triton_on_cpu_reason(case: Case) -> Optional[str]:
    if case.device.type == "cpu" and not case.dry_run:
        return "Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET), which is not a benchmark"
    return None


class Implementation:
    """Base class: ``skip_reason`` says why it cannot run on a case (None: it can)."""

    name = ""
    label = ""
    family = "baseline"  # "floor", "fused", "fused_op" or "baseline"
    slow = False  # timed with the driver's small "slow" budget (a warm-up and a few repeats)
    makes_gradient = True  # the call allocates a B x C gradient (for "peak beyond the gradient")

    def skip_reason(self, case: Case) -> Optional[str]:
        return None

    def setup(self, case: Case, rotation: Rotation, labels: torch.Tensor) -> Prepared:
        raise NotImplementedError


class CopyFloor(Implementation):
    name, label, family = "copy_floor", "copy floor (read + write B x C)", "floor"
    makes_gradient = False

    def setup(self, case, rotation, labels):
        out = torch.empty_like(rotation.buffers[0], requires_grad=False)

        def step() -> None:
            with torch.no_grad():
                out.copy_(rotation.next())

        return Prepared(step, notes="out.copy_(logits) into a preallocated tensor")


class AllocatingCopyFloor(Implementation):
    """A copy into a freshly allocated tensor, as every step allocates its ``(B, C)`` gradient.

    On CPU, torch has no caching allocator: a large fresh tensor comes from ``mmap`` and its pages
    are faulted in on first write, which costs far more than the copy itself on some machines
    (virtual machines especially). The gap between the two floors is that cost.
    """

    name, label, family = "copy_alloc_floor", "copy into a new tensor (alloc + read + write)", "floor"

    def setup(self, case, rotation, labels):
        def step() -> None:
            with torch.no_grad():
                rotation.next().clone()

        return Prepared(step, notes="logits.clone(): includes allocating and first-touching B x C")


def _options_suffix(options: Dict[str, object]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(options.items()))


class FusedBackend(Implementation):
    """``fused_gala_ce(..., backend=name, **options)`` with a persistent ``GALAState``: a training step.

    ``options`` are keyword arguments of ``fused_gala_ce``; ``weight="random"`` stands for class
    weights drawn uniformly in [0.5, 1.5), made on the case's device at set-up.
    """

    family = "fused"

    def __init__(self, backend: str, options: Optional[Dict[str, object]] = None):
        self.backend = backend
        self.options = dict(options or {})
        suffix = _options_suffix(self.options)
        self.name = f"fused_{backend}" + (f"[{suffix}]" if suffix else "")
        self.label = f"fused_gala_ce [{backend}]" + (f" {suffix}" if suffix else "")

    def skip_reason(self, case):
        ok, reason = backends.availability(self.backend, case.device)
        if not ok:
            return reason
        return _triton_on_cpu_reason(case) if self.backend == "triton" else None

    def loss_options(self, case: Case) -> Dict[str, object]:
        options = dict(self.options)
        if options.get("weight") == "random":
            generator = torch.Generator().manual_seed(1)
            options["weight"] = (torch.rand(case.classes, generator=generator) + 0.5).to(case.device)
        return options

    def setup(self, case, rotation, labels):
        state = GALAState(case.classes, device=case.device)
        options = self.loss_options(case)
        loss_fn = lambda logits, y: fused_gala_ce(logits, y, state, backend=self.backend, **options)
        return Prepared(autograd_step(loss_fn, rotation, labels))


class GraphReplay(FusedBackend):
    """The training step of :class:`FusedBackend` captured in CUDA graphs and replayed: one graph
    per logits buffer of the rotation (sharing one memory pool), so the replayed steps read the
    same cycle of buffers as the eager ones. What is left is the GPU's time: no Python, no launch
    overhead; the state is updated by every replay, as in an eager step."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"fused_{backend}_graph"
        self.label = f"fused_gala_ce [{backend}], CUDA-graph replay"

    def skip_reason(self, case):
        if case.device.type != "cuda":
            return "CUDA-graph replay needs a GPU"
        return super().skip_reason(case)

    def setup(self, case, rotation, labels):
        state = GALAState(case.classes, device=case.device)

        def body(logits: torch.Tensor) -> torch.Tensor:
            loss = fused_gala_ce(logits, labels, state, backend=self.backend)
            return torch.autograd.grad(loss, logits)[0]

        side = torch.cuda.Stream(case.device)
        side.wait_stream(torch.cuda.current_stream(case.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream: compile, allocate
            for logits in rotation.buffers[:2]:
                body(logits)
        torch.cuda.current_stream(case.device).wait_stream(side)
        graphs: List[torch.cuda.CUDAGraph] = []
        for logits in rotation.buffers:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=graphs[0].pool() if graphs else None):
                body(logits)
            graphs.append(graph)
        order = Rotation(graphs)
        return Prepared(lambda: order.next().replay(), notes=f"{len(graphs)} graphs, one per logits buffer")


class FusedOpAlone(Implementation):
    """The forward op of a backend alone: loss, gradient and raw statistics (mean reduction,
    statistics on, no pairwise), class bias precomputed; no autograd, no fold into a state.

    ``inplace=True`` (Triton): the gradient overwrites the logits (its own copy of the rotation),
    so no ``B x C`` buffer is allocated.
    """

    family = "fused_op"

    def __init__(self, backend: str, inplace: bool = False):
        self.backend, self.inplace = backend, inplace
        self.name = f"fused_op_{backend}" + ("_inplace" if inplace else "")
        self.label = f"{backend} op alone" + (" (gradient in place)" if inplace else "")
        self.makes_gradient = not inplace

    def skip_reason(self, case):
        ok, reason = backends.availability(self.backend, case.device)
        if not ok:
            return reason
        return _triton_on_cpu_reason(case) if self.backend == "triton" else None

    def setup(self, case, rotation, labels):
        state = GALAState(case.classes, device=case.device)
        bias = reference.class_bias(state, 1.2, 1e-3, reference.compute_dtype(case.dtype))
        args = (labels, bias, None, -100, 1, 0.0, True, False)  # the schema of gala::fused_ce_fwd
        if self.inplace:
            own = Rotation([b.detach().clone() for b in rotation.buffers])
            return Prepared(lambda: backends.triton_inplace_fused_ce(own.next(), *args),
                            notes="overwrites its own copy of the logits with the gradient")
        op = backends.fused_ce_op(self.backend)
        return Prepared(lambda: op(rotation.next().detach(), *args))


class EagerReference(Implementation):
    """The vectorised eager GALA step in plain PyTorch (``reference.eager_gala_loss``)."""

    name, label = "eager", "eager GALA (plain PyTorch, autograd)"

    def setup(self, case, rotation, labels):
        state = GALAState(case.classes, device=case.device)
        loss_fn = lambda logits, y: reference.eager_gala_loss(logits, y, state)
        return Prepared(autograd_step(loss_fn, rotation, labels))


class CompiledEager(Implementation):
    """``torch.compile`` of the eager step; the compilation (first calls) is timed separately."""

    name, label = "eager_compiled", "torch.compile(eager GALA)"

    def __init__(self, max_elements: Optional[int] = None):
        self.max_elements = max_elements

    def skip_reason(self, case):
        if self.max_elements is not None and case.batch * case.classes > self.max_elements:
            return f"B x C > {self.max_elements:,} (--compile-max-elements): compiling takes too long"
        return None

    def setup(self, case, rotation, labels):
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per shape: no dynamic-shape recompile, no cache limit
        torch._dynamo.utils.counters.clear()
        state = GALAState(case.classes, device=case.device)

        def eager_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return reference.eager_gala_loss(logits, y, state)

        compiled = torch.compile(eager_loss, dynamic=False)
        step = autograd_step(compiled, rotation, labels)
        started = time.perf_counter()
        for _ in range(2):  # forward and backward graphs
            step()
        if case.device.type == "cuda":
            torch.cuda.synchronize(case.device)
        compile_seconds = time.perf_counter() - started
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        return Prepared(step, setup_seconds=compile_seconds,
                        notes=f"compile {compile_seconds:.1f} s excluded; {breaks} graph break(s)")


class AuthorsPath(Implementation):
    """The authors' per-step path (Python loop into C x C matrices); run only where those fit."""

    name, label = "authors", "authors' path (C x C, Python loop)"
    slow = True  # ~0.5 s per step at C = 8142 on a small CPU
    matrices_alive_at_peak = 6  # running, eye, step matrix, 1 - eye, off-diagonal, running * eye

    def memory_estimate(self, case: Case) -> int:
        matrices = self.matrices_alive_at_peak * case.classes**2 * 4
        row_tensors = 6 * case.batch * case.classes * 4  # adjusted logits, softmax, gradients
        return matrices + row_tensors

    def skip_reason(self, case):
        available = available_memory_bytes(case.device)
        needed = self.memory_estimate(case)
        if available is not None and needed > available // 2:
            return (f"its C x C matrices need ~{needed / 2**30:.1f} GiB, more than half of the "
                    f"{available / 2**30:.1f} GiB available")
        return None

    def setup(self, case, rotation, labels):
        from .authors_path import AuthorsGALA

        authors = AuthorsGALA(case.classes, dtype=torch.float32, device=case.device)
        return Prepared(autograd_step(authors.step, rotation, labels),
                        notes="state matrices (2 C^2 fp32) allocated before the step")


class CrossEntropy(Implementation):
    name, label = "cross_entropy", "F.cross_entropy (no statistics)"

    def setup(self, case, rotation, labels):
        return Prepared(autograd_step(F.cross_entropy, rotation, labels))


class LigerCrossEntropy(Implementation):
    name, label = "liger_ce", "Liger-Kernel cross-entropy (no statistics)"
    makes_gradient = False  # Liger writes the gradient into its input buffer

    def skip_reason(self, case):
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss  # noqa: F401
        except Exception as exc:  # ImportError, or a Triton/driver error at import
            return f"Liger-Kernel is not importable ({type(exc).__name__}: {exc})"
        if case.device.type != "cuda":
            return "Liger-Kernel's cross-entropy is a Triton GPU kernel; not run on CPU"
        return None

    def setup(self, case, rotation, labels):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return Prepared(autograd_step(LigerCrossEntropyLoss(), rotation, labels))


# The loss options timed against the plain call, for each backend that runs by default on a device.
OPTION_ROWS = ({"label_smoothing": 0.1}, {"weight": "random"}, {"label_smoothing": 0.1, "weight": "random"})


def all_implementations(compile_max_elements: Optional[int] = None) -> List[Implementation]:
    """Every implementation, in table order; those that cannot run on a case say why."""
    return [
        CopyFloor(),
        AllocatingCopyFloor(),
        FusedBackend("cpu"),
        *(FusedBackend("cpu", options) for options in OPTION_ROWS),
        FusedBackend("triton"),
        GraphReplay("triton"),
        *(FusedBackend("triton", options) for options in OPTION_ROWS),
        FusedBackend("cuda"),
        GraphReplay("cuda"),
        *(FusedBackend("cuda", options) for options in OPTION_ROWS),
        FusedOpAlone("cpu"),
        FusedOpAlone("triton"),
        FusedOpAlone("triton", inplace=True),
        FusedOpAlone("cuda"),
        EagerReference(),
        CompiledEager(compile_max_elements),
        AuthorsPath(),
        CrossEntropy(),
        LigerCrossEntropy(),
    ]
