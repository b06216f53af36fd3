"""The `saehook` command line: one module per command group, each registering its subcommands.

| module              | commands                                  |
|---------------------|-------------------------------------------|
| sae_commands        | info, convert                             |
| model_commands      | features, steer, export-cvec, eval        |
| dataset_commands    | capture, stats, compare, classify         |
| train_commands      | train                                     |
| tool_commands       | demo, bench                               |
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import dataset_commands, label_commands, model_commands, sae_commands, tool_commands, train_commands

GROUPS = (tool_commands, sae_commands, model_commands, dataset_commands, train_commands, label_commands)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="saehook", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.register(sub)

    args, extra = p.parse_known_args(argv)
    if args.cmd == "bench":  # everything else belongs to the benchmark script
        args.args = extra + args.args
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, IndexError, TypeError) as e:
        print(f"saehook {args.cmd}: error: {e}", file=sys.stderr)
        return 2
