"""The benchmarks behind ``python -m gala_kernels bench`` and the harness they share.

Sub-benchmarks (entry point :mod:`.cli`):

- :mod:`.step` (the default), with :mod:`.step_implementations` and :mod:`.step_report`: a GALA
  training step, every fused backend against the baselines;
- :mod:`.mass`: the mass pass of post-hoc re-balancing;
- :mod:`.linear`: ``fused_linear_gala_ce`` against the full logits;
- :mod:`.crossover`: the CUDA C++ step against the Triton step (GPU only).

Harness, used by every sub-benchmark:

- :mod:`.machine`: machine, versions, date and environment switches; file naming;
- :mod:`.timing`: interleaved timers (CPU ``perf_counter``, CUDA events) and ``do_bench``;
- :mod:`.memory`: peak extra memory of a call (CPU resident set, CUDA allocator);
- :mod:`.rotation`: logits buffers cycled beyond the last-level cache;
- :mod:`.report`: records, table columns, Markdown + JSON result files, progress;
- :mod:`.authors_path`: the authors' statistics path, a baseline of ``step``.

How to run them and how to read their tables: docs/performance.md.
"""
