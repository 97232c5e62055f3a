"""Command line: ``python -m gala_kernels {bench,demo}`` (also installed as ``gala-kernels``).

- ``bench``: the fused GALA step against eager PyTorch, torch.compile, the authors' path,
  ``F.cross_entropy``, Liger-Kernel and a copy of the logits (see :mod:`gala_kernels.bench`);
- ``demo``: a synthetic long-tailed problem trained with cross-entropy and with GALA, evaluated
  with and without prediction re-balancing (see :mod:`gala_kernels.demo`).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo

    parser = argparse.ArgumentParser(prog="gala-kernels",
                                     description="Fused GALA loss kernels: benchmark and demo")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo}")
    bench.add_arguments(commands.add_parser(
        "bench", help="time the fused step against the baselines; table, JSON, Markdown, plot",
        description=bench.__doc__.splitlines()[0]))
    demo.add_arguments(commands.add_parser(
        "demo", help="long-tailed training demo: CE vs GALA vs GALA + re-balancing",
        description=demo.__doc__.splitlines()[0]))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from . import bench

        bench.run(args)
    else:
        from . import demo

        demo.run(args)


if __name__ == "__main__":
    main()
