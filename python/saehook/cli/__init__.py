"""The `saehook` command line: one module per command group, each registering its subcommands.

| module              | commands                                  |
|---------------------|-------------------------------------------|
| sae_commands        | info, convert                             |
| model_commands      | features, steer, export-cvec, eval        |
| dataset_commands    | capture, stats, compare, classify         |
| train_commands      | train                                     |
| tool_commands       | demo, bench                               |
| serve_commands      | serve                                     |
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import dataset_commands
from . import label_commands
from . import model_commands
from . import sae_commands
from . import serve_commands
from . import tool_commands
from . import train_commands
from .common import CommandParser

# One entry per line (command groups are added by separate changes).
GROUPS = (
    tool_commands,
    sae_commands,
    model_commands,
    dataset_commands,
    train_commands,
    label_commands,
    serve_commands,
)


DESCRIPTION = """\
Top-K sparse autoencoders inside a language model's forward pass (GGUF models through
llama.cpp, or transformers). New here? `saehook demo` runs offline on the shipped model;
`saehook COMMAND --help` shows a command's options and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = CommandParser(prog="saehook", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"saehook {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=CommandParser)
    for group in GROUPS:
        group.register(sub)
    _describe_from_help(sub)
    return p


def _describe_from_help(sub: argparse._SubParsersAction) -> None:
    """`saehook CMD [SUBCMD] --help` starts with the line the command list shows."""
    for choice in sub._choices_actions:
        parser = sub.choices[choice.dest]
        parser.description = parser.description or choice.help
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _describe_from_help(action)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark script (--help included)
            return tool_commands.run_bench(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # argparse fills a nargs="*" positional (eval's texts) as soon as the positional before it
        # is read, so texts after an option land in `extra`: they belong to it
        rest = getattr(args, "texts_after_options", None)
        if extra and rest and not any(e.startswith("-") for e in extra):
            setattr(args, rest, list(getattr(args, rest) or []) + extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            return args.fn(args)
        except (ValueError, OSError, IndexError, TypeError, RuntimeError) as e:
            if isinstance(e, BrokenPipeError):
                raise
            print(f"saehook {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        # The reader went away (`saehook ... | head`): as the CPython docs advise (signal module,
        # "Note on SIGPIPE"), point stdout at devnull so the interpreter's final flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
