"""``python -m gala_kernels bench [step|mass|linear|crossover] [options]``; ``step`` is the default.

- ``step``: a GALA training step, every fused backend against eager PyTorch, torch.compile, the
  authors' path, ``F.cross_entropy``, Liger-Kernel and the copy floors;
- ``mass``: the mass pass of post-hoc re-balancing against eager softmax sums and a read;
- ``linear``: ``fused_linear_gala_ce`` against the full logits, memory and time;
- ``crossover``: the CUDA C++ step against the Triton step over B x C (GPU only).

Each writes ``<benchmark>_<device>_<name>.json`` and ``.md`` under ``--out DIR`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib
import re
from typing import Dict, List, Optional, Sequence

SUB_BENCHMARKS: Dict[str, str] = {
    "step": "a GALA training step: the fused backends against the baselines (the default)",
    "mass": "the mass pass of post-hoc re-balancing against eager softmax sums and a read",
    "linear": "fused_linear_gala_ce against the full logits: peak memory and time",
    "crossover": "the CUDA C++ step against the Triton step over B x C (GPU only)",
}
DEFAULT = "step"


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def plain(docstring: Optional[str]) -> str:
    """A docstring as command-line help: no reST markup."""
    text = re.sub(r":(mod|func|class):`~?\.?([^`]+)`", r"\2", (docstring or "").strip())
    return text.replace("``", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-benchmarks of ``bench`` as sub-commands of ``parser``."""
    parser.description = plain(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    subs = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(SUB_BENCHMARKS) + "}",
                                 title="sub-benchmarks (default: step)")
    for name, help_text in SUB_BENCHMARKS.items():
        module = _module(name)
        sub = subs.add_parser(name, help=help_text, description=plain(module.__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)


def with_default_benchmark(argv: List[str]) -> List[str]:
    """``bench [options]`` means ``bench step [options]``; ``bench`` and ``bench --help`` stay as they are
    (the latter lists the sub-benchmarks)."""
    if argv and (argv[0] in SUB_BENCHMARKS or argv[0] in ("-h", "--help")):
        return argv
    return [DEFAULT, *argv]


def run(args: argparse.Namespace):
    return _module(args.benchmark or DEFAULT).run(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import sys

    parser = argparse.ArgumentParser(prog="gala-kernels bench")
    add_arguments(parser)
    run(parser.parse_args(with_default_benchmark(list(sys.argv[1:] if argv is None else argv))))
