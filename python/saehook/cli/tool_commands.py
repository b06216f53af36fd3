"""`saehook demo` (the shipped model, offline) and `saehook bench` (the benchmarks)."""
from __future__ import annotations

import argparse
import os
import sys


def cmd_demo(args) -> int:
    from .. import demo

    demo.run(prompt=args.prompt, max_tokens=args.max_new_tokens, strength=args.strength)
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = "bench_llama.py" if args.llama else "bench_kernels.py"
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("SAEHOOK_BENCH_DIR"), "bench", os.path.join(here, "..", "..", "..", "bench")):
        if d and os.path.exists(os.path.join(d, script)):
            path = os.path.abspath(os.path.join(d, script))
            break
    else:
        raise FileNotFoundError(f"{script} not found: run from a saehook source checkout (it lives in bench/) "
                                "or set SAEHOOK_BENCH_DIR")
    sys.argv = [path] + args.args
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="features and steering on the shipped tiny model, offline")
    d.add_argument("--prompt", default="The with statement is used to")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--strength", type=float, help="clamp value (default: twice the feature's largest activation)")
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="run the kernel benchmark (or --llama: the llama.cpp hook benchmark)")
    b.add_argument("--llama", action="store_true")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (see its --help)")
    b.set_defaults(fn=cmd_bench)
