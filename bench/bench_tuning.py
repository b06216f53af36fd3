#!/usr/bin/env python
"""Sweep one CPU-class kernel parameter on this machine, in alternation with the read probe.

    python bench/bench_tuning.py --key stream_prefetch_i8 --values 0,1024,2048,4096 --dtype int8 --batch 1
    python bench/bench_tuning.py --key panel_chunk --values 512,1024,2048 --dtype bf16 --batch 256

Each round measures the read bandwidth (saehook's probe), then encode once per value (after a
short idle and warm-up, the median of --reps calls), in a different order every round, so the
VM's bandwidth drift hits every value alike. Prints per value the median over rounds of the
fraction of that round's bandwidth (bytes of the encoder / time / bandwidth) and of the time
relative to the class's own value. The parameters are set with saehook.set_cpu_class (keys:
saehook.cpu_info()['params']); results do not change with them (the tests check that).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import saehook
from common import median_time, read_bandwidth


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x65536")
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "int8"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--key", required=True, help="a key of saehook.cpu_info()['params']")
    p.add_argument("--values", required=True, help="comma-separated values")
    p.add_argument("--cls", default="auto", help="the class whose other parameters hold (default: detected)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    threads = saehook.get_num_threads()
    saehook.set_cpu_class(args.cls)
    info = saehook.cpu_info()
    base_value = info["params"].get(args.key)
    if base_value is None:
        raise SystemExit(f"unknown key {args.key!r}; keys: {', '.join(info['params'])}")
    values = [int(v) for v in args.values.split(",")]
    d, m = (int(v) for v in args.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
    sae = saehook.SAE(W, W, np.zeros(m, np.float32), np.zeros(d, np.float32), k=args.k)
    if args.dtype != "f32":
        sae = sae.to_dtype(args.dtype, dec_dtype="bf16")
        del W
    x = rng.standard_normal((args.batch, d)).astype(np.float32)
    print(json.dumps({"cpu": info, "shape": args.shape, "dtype": args.dtype, "batch": args.batch}))
    times = {v: [] for v in values}
    bws = []
    for rnd in range(args.rounds):
        bw = read_bandwidth(threads)["saehook_probe"]
        bws.append(bw)
        order = values[rnd % len(values):] + values[:rnd % len(values)]
        for v in order:
            saehook.set_cpu_class(f"{args.cls},{args.key}={v}")
            times[v].append(median_time(lambda: sae.encode(x, args.k), args.reps))
        print(f"round {rnd}: probe {bw:.1f} GB/s  " + "  ".join(f"{v}: {1e3 * times[v][-1]:.2f} ms" for v in values),
              flush=True)
    saehook.set_cpu_class(args.cls)
    ref = base_value if base_value in times else values[0]
    out = []
    for v in values:
        t = np.array(times[v])
        frac = sae.encoder_bytes / t / 1e9 / np.array(bws)
        rel = t / np.array(times[ref])
        out.append(dict(value=v, ms_median=1e3 * float(np.median(t)), fraction_of_bw_median=float(np.median(frac)),
                        fraction_of_bw_range=[float(frac.min()), float(frac.max())],
                        time_vs_ref_median=float(np.median(rel))))
        print(f"{args.key}={v:<8} {out[-1]['ms_median']:8.2f} ms  of bw {np.median(frac):.3f} "
              f"({frac.min():.3f}-{frac.max():.3f})  time vs {args.key}={ref}: {np.median(rel):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info, "args": vars(args), "probe_GBps": bws, "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
