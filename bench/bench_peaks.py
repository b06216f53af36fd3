#!/usr/bin/env python
"""Per-core issue rates of the instructions the CPU kernels use: vfmadd231ps, vdpbf16ps and
vpdpbusd on zmm and ymm (where the CPU has AVX512-BF16/VNNI), the AVX2 path's int8 step
(vpsignb x2, vpmaddubsw, vpmaddwd, vpaddd per 32 products) and bf16 widening + FMA, and L1 loads
and, where the CPU has AMX, the tile products (tdpbf16ps, tdpbssd), tile loads from L1, from L2
and from W's rows (16 rows 8 KiB apart), and the AMX kernel's step (2 A + 2 B tile loads, 4
products) with its operands in L1, in L2, and A straight from W's rows (peaks.c, built here
with the system C compiler).

    python bench/bench_peaks.py            # every core in turn, best of 5 runs of 0.2 s each
    python bench/bench_peaks.py --json peaks.json

A CPU that executes AVX-512 on 256-bit units (Zen 4) issues a zmm instruction every other
cycle per pipe, so its zmm and ymm rates of multiply-adds per ns come out equal; Zen 5 and
Intel server cores double them on zmm. The kernels' compute bound at batch B follows:
d_model x d_sae x B multiply-adds / (cores x madds_per_ns).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def build(out_dir: str, avx512: bool, amx: bool) -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise SystemExit("no C compiler found (set CC)")
    exe = os.path.join(out_dir, "peaks")
    flags = ["-mavx2", "-mfma"] + (["-mavx512f", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"] if avx512 else [])
    flags += ["-mamx-tile", "-mamx-bf16", "-mamx-int8"] if amx else []
    cmd = [cc, "-O2", *flags, "-o", exe, os.path.join(HERE, "peaks.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"building peaks.c failed ({' '.join(cmd)}):\n{p.stderr}")
    return exe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.2, help="length of one timed run per instruction")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import saehook

    info = saehook.cpu_info()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    have = set(flags.split())
    if not {"avx2", "fma"} <= have:
        raise SystemExit("this CPU lacks AVX2/FMA: the probes would fault (SIGILL)")
    # The zmm, vdpbf16ps and vpdpbusd probes only where the CPU has them (else they would fault).
    avx512 = {"avx512f", "avx512_bf16", "avx512_vnni"} <= have
    amx = avx512 and {"amx_tile", "amx_bf16", "amx_int8"} <= have
    cores = sorted(os.sched_getaffinity(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp, avx512, amx)
        for c in cores:
            out = subprocess.run(["taskset", "-c", str(c), exe, str(args.seconds)], capture_output=True, text=True,
                                 check=True).stdout
            results[c] = json.loads(out)
    print(json.dumps({"cpu": info}))
    names = [r["insn"] for r in results[cores[0]]]
    print(f"{'instruction':<18}" + "".join(f"  core {c}: ns/insn  madds/ns" for c in cores))
    for i, name in enumerate(names):
        print(f"{name:<18}" + "".join(f"  {results[c][i]['ns_per_insn']:>15.4f} {results[c][i]['madds_per_ns']:>9.1f}"
                                      for c in cores))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info, "per_core": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
