"""`saehook demo` (the shipped model, offline) and `saehook bench` (the benchmarks)."""
from __future__ import annotations

import os
import sys
from typing import List

from .common import finite_float, positive_int

BENCH_USAGE = """\
usage: saehook bench [--llama] [ARGS...]

Runs a benchmark script with ARGS passed through unchanged:
  saehook bench ARGS            bench_kernels.py: saehook's kernels vs torch and numpy
  saehook bench --llama ARGS    bench_llama.py: the llama.cpp hook's cost per token
`saehook bench --help` and `saehook bench --llama --help` show the scripts' own options.
The scripts come with the installed package (saehook/bench) or a source checkout (bench/);
SAEHOOK_BENCH_DIR overrides where they are looked for."""


def cmd_demo(args) -> int:
    from .. import demo

    if args.paths:
        print(f"gguf: {demo.MODEL}\nhf:   {demo.hf_model_dir()}\nsae:  {demo.SAE_FILE}\nlabels: {demo.LABELS}")
        return 0
    demo.run(prompt=args.prompt, max_tokens=args.max_new_tokens, strength=args.strength)
    return 0


def bench_dirs() -> List[str]:
    """Where the benchmark scripts are looked for, in order: $SAEHOOK_BENCH_DIR, the installed
    package's copy (CMake installs bench/ as saehook/bench), the source checkout's bench/."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [d for d in (os.environ.get("SAEHOOK_BENCH_DIR"), os.path.join(pkg, "bench"),
                        os.path.join(pkg, "..", "..", "bench")) if d]


def find_bench(script: str) -> str:
    for d in bench_dirs():
        path = os.path.join(d, script)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f"{script} not found in {', '.join(map(os.path.abspath, bench_dirs()))}: reinstall saehook "
                            "(it installs the scripts into saehook/bench) or set SAEHOOK_BENCH_DIR")


def run_bench(argv: List[str]) -> int:
    """`saehook bench [--llama] ARGS`: runs the script as `python SCRIPT ARGS` would."""
    import runpy

    if argv[:1] in (["-h"], ["--help"]) and "--llama" not in argv:
        print(BENCH_USAGE)
        print("\nbench_kernels.py options:", flush=True)
    llama = "--llama" in argv
    args = [a for a in argv if a != "--llama"]
    try:
        path = find_bench("bench_llama.py" if llama else "bench_kernels.py")
    except FileNotFoundError as e:
        print(f"saehook bench: error: {e}", file=sys.stderr)
        return 2
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [path] + args
    sys.path.insert(0, os.path.dirname(path))  # the scripts import their shared common.py
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


def register(sub) -> None:
    from ..demo import PROMPT

    d = sub.add_parser("demo", help="features and steering on the shipped tiny model, offline")
    d.add_argument("--prompt", default=PROMPT, help="the prompt analysed and continued (not empty)")
    d.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens generated with and without steering")
    d.add_argument("--strength", type=finite_float,
                   help="clamp value of the code feature (default: the value chosen when the demo was built)")
    d.add_argument("--paths", action="store_true",
                   help="print where the demo's files are (GGUF, SAE, labels, and a transformers copy of the model, "
                        "built at first use) and exit, e.g. for saehook features MODEL --sae SAE")
    d.set_defaults(fn=cmd_demo)
    # `saehook bench ...` is dispatched before argparse (cli.main -> run_bench): this entry is
    # for the command list and `saehook --help`.
    sub.add_parser("bench", help="run the kernel benchmark (or --llama: the llama.cpp hook benchmark); "
                                 "`saehook bench --help` for its options", add_help=False)
