#!/usr/bin/env python
"""Kernel benchmark: saehook's CPU kernels vs torch and numpy at Qwen-Scope shapes, with the
machine's measured read bandwidth in the same run.

    python bench/bench_kernels.py                        # all shapes, batches 1 8 64 256, k 50 100
    python bench/bench_kernels.py --shapes 4096x65536 --k 100 --json out.json

Every row prints the median time of several repetitions after warm-up, the speed-up over
torch f32 (addmm + relu + topk for encode), the effective read rate of the weights the kernel
must touch, and that rate as a fraction of the read bandwidth measured right before that group
of rows (the bound at batch 1).
Then, per batch, the encode comparison measured in alternation (--rounds rounds, each: the
read probe, torch f32, torch bf16 and saehook in every dtype, the order rotated every round):
medians and ranges of the per-round ratios (saehook vs torch f32 and bf16 by time, and the
fraction of that round's read bandwidth), so this VM's bandwidth drift hits every contender
alike. The header (and JSON) names the CPU class: vendor, family, model, ISA path and the kernel
parameters in use (saehook.cpu_info()).
Results are validated against the f32 reference before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

import saehook
from saehook import _core
from common import cpu_flags, median_time, paired_times, read_bandwidth


def realistic_rows(n: int, d: int, rng) -> np.ndarray:
    """Residual-like rows: a shared mean direction, heavy tails and a few outlier dimensions
    (LLM residual streams have 'massive activation' dims), so int8/bf16 quantization is tested
    on something harder than white noise."""
    x = rng.standard_t(df=5, size=(n, d)).astype(np.float32)
    x += 0.5 * rng.standard_normal(d).astype(np.float32)
    outliers = rng.choice(d, size=4, replace=False)
    x[:, outliers] *= 20.0
    return x


def alternating(contenders: dict, probe, rounds: int, reps: int) -> tuple:
    """Times of every contender and the probe's bandwidth, round after round, the order rotated
    every round (each call after common.median_time's idle and warm-up)."""
    names = list(contenders)
    times = {name: [] for name in names}
    bws = []
    for rnd in range(rounds):
        bws.append(probe())
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            times[name].append(median_time(contenders[name], reps))
    return times, bws


def ratio_summary(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    k = a.shape[1]
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(a.tolist(), b.tolist())]))


DEFAULT_SHAPES = "2048x32768,4096x65536,5120x81920,2048x131072"
PROBE_BYTES = 1 << 30  # the read-bandwidth probe's buffer (common.py)
# Per weight, on top of the f32 copy: enc+dec as converted (f32+prefilter: the bf16 copy of W_enc).
DTYPE_WEIGHT_BYTES = {"f32": 0, "f32+prefilter": 2, "bf16": 4, "int8": 3}


def shape_memory(shape: str, dtypes=("f32", "bf16", "int8"), max_batch: int = 256, with_torch: bool = True) -> int:
    """Peak bytes one shape takes: the f32 weights (encoder and decoder share them), each converted
    variant (bf16: bf16 encoder and decoder; int8: int8 encoder and bf16 decoder), torch's bf16
    copy, torch's pre-activations and dense decode buffer at the largest batch, the 1 GiB probe
    (not the interpreter and libraries: about 0.3 GiB more with torch)."""
    d, m = (int(v) for v in shape.lower().split("x"))
    per_weight = 4 + sum(DTYPE_WEIGHT_BYTES.get(dt, 4) for dt in dtypes) + (2 if with_torch else 0)
    return d * m * per_weight + (2 * max_batch * m * 4 if with_torch else 0) + PROBE_BYTES


def memory_note(shapes: str, **kw) -> str:
    return ", ".join(f"{s} {shape_memory(s, **kw) / 2**30:.1f} GiB" for s in shapes.split(","))


def alternating_encode(common: dict, x, k: int, variants: dict, Wt, Wt_bf16, bt, torch, threads: int, args) -> dict:
    """The encode comparison in alternation (module docstring); prints and returns its row."""
    contenders = {}
    if torch is not None:
        xt = torch.from_numpy(x)
        xb, bb = xt.to(torch.bfloat16), bt.to(torch.bfloat16)
        contenders["torch f32"] = lambda: torch.relu(torch.addmm(bt, xt, Wt.T)).topk(k)
        contenders["torch bf16"] = lambda: torch.relu(torch.addmm(bb, xb, Wt_bf16.T)).topk(k)
    for dt, sae in variants.items():
        contenders[f"saehook {dt}"] = (lambda s: lambda: s.encode(x, k))(sae)
    a = _probe_array()
    probe = lambda: a.nbytes / median_time(lambda: _core.read_probe(a.ctypes.data, a.nbytes, threads), 3) / 1e9  # noqa: E731
    reps = max(1, args.reps // 2) if common["batch"] >= 64 else args.reps
    times, bws = alternating(contenders, probe, args.rounds, reps)
    bw = np.array(bws)
    out = dict(**common, op="encode alternating", rounds=args.rounds, probe_GBps=ratio_summary(bw),
               seconds={n: ratio_summary(t) for n, t in times.items()}, per_round_seconds=times, per_round_probe_GBps=bws)
    print(f"{common['shape']:>12} k={k:<3} n={common['batch']:<4} encode in alternation, {args.rounds} rounds, "
          f"read probe {bw.min():.1f}-{bw.max():.1f} GB/s:")
    for dt, sae in variants.items():
        t = np.array(times[f"saehook {dt}"])
        r = {"seconds": ratio_summary(t), "fraction_of_bandwidth": ratio_summary(sae.encoder_bytes / t / 1e9 / bw)}
        line = (f"    saehook {dt:<13} {1e3 * np.median(t):8.2f} ms  of bw {r['fraction_of_bandwidth']['median']:.3f} "
                f"({r['fraction_of_bandwidth']['min']:.3f}-{r['fraction_of_bandwidth']['max']:.3f})")
        for ref in ("torch f32", "torch bf16") + (("saehook f32",) if dt == "f32+prefilter" else ()):
            if ref in times:
                q = ratio_summary(np.array(times[ref]) / t)
                r[f"speedup_vs_{ref.replace(' ', '_')}"] = q
                line += f"  vs {ref} {q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
        out[f"saehook_{dt}"] = r
        print(line)
    for ref in ("torch f32", "torch bf16"):
        if ref in times:
            print(f"    {ref:<13} {1e3 * np.median(times[ref]):8.2f} ms")
    return out


def _probe_array():
    from common import _probe_buffer

    return _probe_buffer()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help="d_model x d_sae, comma-separated; one shape is in memory at a time, peak with the default "
                        f"dtypes and batches: {memory_note(DEFAULT_SHAPES)}, plus about 0.3 GiB for Python and torch "
                        "themselves (2048x32768 at batch 256 peaked at 2.2 GiB resident) (default: %(default)s)")
    p.add_argument("--batches", default="1,8,64,256", help="rows per call, comma-separated (default: %(default)s)")
    p.add_argument("--k", default="50,100", help="k values, comma-separated (default: %(default)s)")
    p.add_argument("--dtypes", default="f32,f32+prefilter,bf16,int8",
                   help="encoder dtypes; f32+prefilter: the f32 SAE encoded through its bf16 copy (SAE.set_prefilter), "
                   "whose results must equal saehook f32's (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="0 = all CPUs (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of the alternating encode comparison per batch (0: skip it) (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--json", default="bench_kernels.json", help="where the results go (default: %(default)s)")
    args = p.parse_args()

    if args.threads:
        saehook.set_num_threads(args.threads)
    threads = saehook.get_num_threads()
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811

            torch.set_num_threads(threads)
        except ImportError:
            print("torch not installed: torch baselines skipped")

    bw = read_bandwidth(threads)
    header = {
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": threads, "cpu_features": cpu_flags(), "saehook_isa": saehook.get_isa(),
        "cpu": saehook.cpu_info(),
        "available_isas": saehook.available_isas(), "bandwidth_GBps": bw,
        "torch": getattr(torch, "__version__", None), "numpy": np.__version__,
    }
    print(json.dumps(header, indent=1))
    bound = bw["bound"] * 1e9
    rows = []

    def report(**r):
        rows.append(r)
        sp = f"{r['speedup_vs_torch_f32']:.2f}x" if r.get("speedup_vs_torch_f32") else "-"
        frac = f"{100 * r['fraction_of_bandwidth']:.0f}%" if r.get("fraction_of_bandwidth") else "-"
        print(f"{r['shape']:>12} k={r['k']:<3} n={r['batch']:<4} {r['op']:<22} {r['dtype']:<5} "
              f"{1e3 * r['seconds']:9.2f} ms  vs torch f32 {sp:>7}  {r.get('GBps', 0):6.1f} GB/s  {frac:>5} of bw"
              + (f"  top-k agreement {r['topk_agreement']:.3f}" if "topk_agreement" in r else ""))

    rng = np.random.default_rng(0)
    dtypes = args.dtypes.split(",")
    max_batch = max(int(v) for v in args.batches.split(","))
    for shape in args.shapes.split(","):
        print(f"{shape}: about {shape_memory(shape, dtypes, max_batch, torch is not None) / 2**30:.1f} GiB of memory "
              "at its peak", flush=True)
        d, m = (int(v) for v in shape.lower().split("x"))
        W = rng.standard_normal((m, d), dtype=np.float32)
        W /= np.sqrt(d)
        b_enc = (0.1 * rng.standard_normal(m)).astype(np.float32)
        base = saehook.SAE(W, W, b_enc, np.zeros(d, np.float32), k=100, activation="topk")
        def variant(dt):
            if dt == "f32":
                return base
            if dt == "f32+prefilter":  # the same borrowed weights, plus the bf16 copy
                return saehook.SAE(W, W, b_enc, np.zeros(d, np.float32), k=100, activation="topk", prefilter="bf16")
            return base.to_dtype(dt, dec_dtype="bf16" if dt == "int8" else dt)

        variants = {dt: variant(dt) for dt in dtypes}
        Wt = torch.from_numpy(W) if torch is not None else None
        Wt_bf16 = Wt.to(torch.bfloat16) if torch is not None else None
        bt = torch.from_numpy(b_enc) if torch is not None else None
        for k in (int(v) for v in args.k.split(",")):
            for n in (int(v) for v in args.batches.split(",")):
                # This class of VM moves between bandwidth states within minutes: the bound is
                # measured again for every group of rows, right before them.
                bw_now = read_bandwidth(threads)
                bound = bw_now["bound"] * 1e9
                print(f"  read bandwidth now {bw_now['bound']:.1f} GB/s")
                x = realistic_rows(n, d, rng)
                common = dict(shape=shape, k=k, batch=n, bandwidth_GBps=bw_now["bound"])
                # ---- reference and validation ----
                ref_idx = None
                if torch is not None:
                    xt = torch.from_numpy(x)
                    pre = torch.addmm(bt, xt, Wt.T)
                    ref_vals, ref_idx = pre.topk(k)
                    ref_idx = ref_idx.numpy()
                    t_f32 = median_time(lambda: torch.relu(torch.addmm(bt, xt, Wt.T)).topk(k), args.reps)
                    xb = xt.to(torch.bfloat16)
                    t_bf16 = median_time(lambda: torch.relu(torch.addmm(bt.to(torch.bfloat16), xb, Wt_bf16.T)).topk(k), args.reps)
                    report(**common, op="encode (torch)", dtype="f32", seconds=t_f32, speedup_vs_torch_f32=1.0,
                           GBps=W.nbytes / t_f32 / 1e9, fraction_of_bandwidth=W.nbytes / bound / t_f32)
                    report(**common, op="encode (torch)", dtype="bf16", seconds=t_bf16, speedup_vs_torch_f32=t_f32 / t_bf16,
                           GBps=W.nbytes / 2 / t_bf16 / 1e9, fraction_of_bandwidth=W.nbytes / 2 / bound / t_bf16)
                else:
                    t_f32 = None
                if n <= 8:
                    t_np = median_time(lambda: np.argpartition(-(x @ W.T + b_enc), k, axis=1)[:, :k], max(1, args.reps // 2))
                    report(**common, op="encode (numpy)", dtype="f32", seconds=t_np,
                           speedup_vs_torch_f32=(t_f32 / t_np) if t_f32 else None, GBps=W.nbytes / t_np / 1e9,
                           fraction_of_bandwidth=W.nbytes / bound / t_np)
                for dt, sae in variants.items():
                    vals, idx = sae.encode(x, k)
                    agreement = topk_overlap(idx, ref_idx) if ref_idx is not None else topk_overlap(idx, base.encode(x, k)[1])
                    if dt == "f32" and agreement < 0.99:
                        raise SystemExit(f"validation failed: f32 encode agrees with torch on only {agreement:.3f} of the top-k")
                    if dt == "f32+prefilter":
                        # The same features as saehook f32, up to near-ties that the many-rows
                        # kernels' summation order decides (a few 1e-6 apart).
                        same = topk_overlap(idx, base.encode(x, k)[1])
                        if same < 0.999:
                            raise SystemExit(f"validation failed: the prefiltered encode shares only {same:.4f} "
                                             "of saehook f32's features")
                    t = median_time(lambda: sae.encode(x, k), args.reps)
                    wb = sae.encoder_bytes
                    report(**common, op="encode (saehook)", dtype=dt, seconds=t,
                           speedup_vs_torch_f32=(t_f32 / t) if t_f32 else None, GBps=wb / t / 1e9,
                           fraction_of_bandwidth=wb / bound / t, topk_agreement=agreement)
                    # decode: k rows of the decoder per token
                    dec_bytes = n * k * d * (2 if sae.dec_dtype in ("bf16", "f16") else 4)
                    xh = sae.decode(vals, idx)
                    if dt == "f32":
                        expect = np.einsum("nk,nkd->nd", vals, W[idx]) + 0.0
                        if not np.allclose(xh, expect, rtol=1e-4, atol=1e-4):
                            raise SystemExit("validation failed: decode differs from the numpy reference")
                    t = median_time(lambda: sae.decode(vals, idx), args.reps)
                    report(**common, op="decode (saehook)", dtype=sae.dec_dtype, seconds=t, GBps=dec_bytes / t / 1e9,
                           fraction_of_bandwidth=dec_bytes / bound / t)
                    st = saehook.Steering(sae)
                    for f in idx[0, :4].tolist():
                        st.clamp(int(f), 5.0)
                    h = x.copy()
                    t = median_time(lambda: st.apply(h), args.reps)
                    report(**common, op="steer clamp x4 (saehook)", dtype=dt, seconds=t,
                           speedup_vs_torch_f32=(t_f32 / t) if t_f32 else None, GBps=wb / t / 1e9,
                           fraction_of_bandwidth=wb / bound / t)
                    t = median_time(lambda: sae.reconstruct(x), args.reps)
                    report(**common, op="encode+decode (saehook)", dtype=dt, seconds=t,
                           speedup_vs_torch_f32=(t_f32 / t) if t_f32 else None, GBps=(wb + dec_bytes) / t / 1e9,
                           fraction_of_bandwidth=(wb + dec_bytes) / bound / t)
                if torch is not None:
                    vals, idx = base.encode(x, k)  # the f32 codes (the loop above left the last dtype's)
                    vt, it = torch.from_numpy(vals), torch.from_numpy(idx).long()
                    dense = torch.zeros(n, m)
                    t_dense = median_time(lambda: dense.zero_().scatter_(1, it, vt) @ Wt, args.reps)
                    bag = torch.nn.EmbeddingBag.from_pretrained(Wt, mode="sum")
                    t_bag = median_time(lambda: bag(it, per_sample_weights=vt), args.reps)
                    dec_bytes = n * k * d * 4
                    report(**common, op="decode (torch dense)", dtype="f32", seconds=t_dense, GBps=dec_bytes / t_dense / 1e9,
                           fraction_of_bandwidth=dec_bytes / bound / t_dense)
                    report(**common, op="decode (torch emb_bag)", dtype="f32", seconds=t_bag, GBps=dec_bytes / t_bag / 1e9,
                           fraction_of_bandwidth=dec_bytes / bound / t_bag)
                    # The head-to-head number: saehook's f32 decode and EmbeddingBag on the same
                    # codes, timed in alternation.
                    t_s, t_b, ratio = paired_times(lambda: base.decode(vals, idx), lambda: bag(it, per_sample_weights=vt),
                                                   args.reps)
                    print(f"{shape:>12} k={k:<3} n={n:<4} decode f32 paired: saehook {1e3 * t_s:.2f} ms, "
                          f"emb_bag {1e3 * t_b:.2f} ms, saehook/emb_bag time ratio {ratio:.3f}")
                    rows.append(dict(**common, op="decode f32 paired (saehook / emb_bag)", saehook_s=t_s, emb_bag_s=t_b,
                                     time_ratio=ratio))
                if args.rounds > 0:
                    rows.append(alternating_encode(common, x, k, variants, Wt, Wt_bf16, bt, torch, threads, args))
        del variants, base, W, Wt, Wt_bf16
    with open(args.json, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
