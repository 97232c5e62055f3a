"""Command line: ``python -m gala_kernels {bench,demo}`` (also installed as ``gala-kernels``).

- ``bench [step|mass|linear|crossover]``: the benchmarks (:mod:`gala_kernels.benchmark`); ``step``,
  the default, times the fused training step against eager PyTorch, torch.compile, the authors'
  path, ``F.cross_entropy``, Liger-Kernel and a copy of the logits;
- ``demo``: a synthetic long-tailed problem trained with cross-entropy and with GALA, evaluated
  with and without prediction re-balancing (:mod:`gala_kernels.demo`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import demo
    from .benchmark import cli

    parser = argparse.ArgumentParser(prog="gala-kernels",
                                     description="Fused GALA loss kernels: benchmarks and demo")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo}")
    cli.add_arguments(commands.add_parser(
        "bench", help="benchmarks: step (default), mass, linear, crossover; tables, JSON, Markdown"))
    demo.add_arguments(commands.add_parser(
        "demo", help="long-tailed training demo: CE vs GALA vs GALA + re-balancing",
        description=demo.__doc__.splitlines()[0]))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .benchmark import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = ["bench", *cli.with_default_benchmark(argv[1:])]
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        cli.run(args)
    else:
        from . import demo

        demo.run(args)


if __name__ == "__main__":
    main()
