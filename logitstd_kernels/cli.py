"""Command-line entry point: ``python -m logitstd_kernels <command> [options]``.

Each command lives in its own module, imported only when it runs, which provides
``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first line is the help text.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

COMMANDS = {
    "bench": "logitstd_kernels.bench.cli",
    "toy": "logitstd_kernels.experiments.toy",
    "analyze": "logitstd_kernels.experiments.analyze_cli",
    "distill": "logitstd_kernels.experiments.distill",
    "ghost": "logitstd_kernels.experiments.ghost",
    "dump-teacher": "logitstd_kernels.sparse_dump_cli",
}

SUMMARIES = {
    "bench": "benchmark the fused kernels against eager PyTorch and torch.compile",
    "toy": "the paper's toy cases: plain KD prefers the wrong student, standardized KD does not",
    "analyze": "conflict analysis of saved teacher/student logits (seed 000)",
    "distill": "Algorithm 2 on scikit-learn's digits: CE vs KD vs KD + logit standardization",
    "ghost": "ghost-logit ('subliminal') distillation on digits, with and without standardization",
    "dump-teacher": "store a Hugging Face teacher's top-k logits with the rows' statistics (a SparseTeacher file)",
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logitstd_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in SUMMARIES.items():
        command = sub.add_parser(name, help=summary, description=summary)
        if name in argv:  # import (and pay for) only the command being run or asked about
            importlib.import_module(COMMANDS[name]).add_arguments(command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # the command line as given, for commands that record it
    return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
