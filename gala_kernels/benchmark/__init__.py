"""Benchmark helpers behind ``python -m gala_kernels bench`` (the driver is :mod:`gala_kernels.bench`).

- :mod:`.machine`: machine, versions and date written beside every result;
- :mod:`.timing`: CPU (``perf_counter``) and GPU (``triton.testing.do_bench``) timers, peak extra
  memory, logits buffers rotated beyond the last-level cache;
- :mod:`.implementations`: one ``setup`` per implementation (fused backends, eager reference,
  ``torch.compile`` of it, the authors' path, ``F.cross_entropy``, Liger-Kernel, the copy floor);
- :mod:`.report`: the derived columns, the on-screen / Markdown tables, JSON and the plot.
"""
