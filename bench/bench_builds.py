#!/usr/bin/env python
"""Two (or more) builds of libsaehook timed in turn in one process: a kernel change measured
against the build before it, in alternation, so that the VM's bandwidth drift hits both alike.

    cmake -S OLD_CHECKOUT -B /tmp/b-old -DSAEHOOK_CUDA=OFF -DSAEHOOK_PYTHON=OFF && cmake --build /tmp/b-old
    cmake -S . -B /tmp/b-new -DSAEHOOK_CUDA=OFF -DSAEHOOK_PYTHON=OFF && cmake --build /tmp/b-new
    python bench/bench_builds.py /tmp/b-old/libsaehook.so /tmp/b-new/libsaehook.so --dtype bf16 --batch 64
    python bench/bench_builds.py LIB LIB --cls "zen3,few_rows=0;zen3" --dtype int8 --batch 8  # two CPU-class specs
    python bench/bench_builds.py OLD NEW --decode --batch 256                                 # sparse decode
    python bench/bench_builds.py LIB LIB --dtype f32 --prefilter "0;1" --batch 8              # the bf16 prefilter

Each library is copied and loaded with ctypes through the C API (csrc/include/saehook.h; the
Desc structure mirrors saehook_sae_desc), an SAE of random weights is created in each over the
same borrowed arrays, and every round times the read probe, then each build (the median of
--reps calls after an idle gap and a warm-up call) in an order reversed every other round.
Prints per build the median time, the median fraction of each round's read bandwidth and the
time relative to the first build per round (median and range), after checking that the builds
agree (Top-K overlap, or the decode's largest difference).

For calls under about a millisecond (decode at batch 8 or 16), compare entries 1 and 2 and give
entry 0 a third copy: the first library loaded, which also runs the read probe, wakes its pool
worker faster, so on a 2-core Zen 4 VM the same build read 1.0x at entry 0 and 1.6-1.7x after it.
"""
from __future__ import annotations

import argparse
import ctypes as C
import os
import shutil
import tempfile
import time

import numpy as np

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "int8": 3}  # saehook_dtype


class Desc(C.Structure):  # saehook_sae_desc
    _fields_ = [("d_model", C.c_int64), ("d_sae", C.c_int64), ("k", C.c_int32), ("activation", C.c_int),
                ("subtract_b_dec", C.c_int32), ("W_enc", C.c_void_p), ("enc_dtype", C.c_int),
                ("enc_scales", C.c_void_p), ("b_enc", C.c_void_p), ("W_dec", C.c_void_p), ("dec_dtype", C.c_int),
                ("dec_layout", C.c_int), ("b_dec", C.c_void_p), ("threshold", C.c_void_p),
                ("copy_weights", C.c_int32), ("cuda", C.c_int32), ("cuda_device", C.c_int32)]


class Exec(C.Structure):  # saehook_exec
    _fields_ = [("n_threads", C.c_int32), ("cuda_stream", C.c_void_p)]


def load(path: str):
    """A private copy of the library (dlopen of the same path twice would return one handle)."""
    copy = os.path.join(tempfile.mkdtemp(), "libsaehook.so")
    shutil.copy(path, copy)
    lib = C.CDLL(copy, mode=os.RTLD_LOCAL)
    vp, i32, i64 = C.c_void_p, C.c_int32, C.c_int64
    lib.saehook_sae_create.argtypes = [C.POINTER(Desc), C.POINTER(vp)]
    lib.saehook_encode.argtypes = [vp, vp, i64, i64, i32, vp, vp, vp]
    lib.saehook_decode.argtypes = [vp, vp, vp, i64, i32, vp, i64, vp]
    lib.saehook_read_probe.argtypes = [vp, C.c_size_t, vp]
    lib.saehook_read_probe.restype = C.c_float
    lib.saehook_last_error.restype = C.c_char_p
    lib.saehook_set_cpu_class.argtypes = [C.c_char_p]
    lib.saehook_set_isa.argtypes = [C.c_char_p]
    if hasattr(lib, "saehook_sae_set_prefilter"):  # API version 3
        lib.saehook_sae_set_prefilter.argtypes = [vp, C.c_int, vp]
        lib.saehook_sae_prefilter_stats.argtypes = [vp, C.POINTER(C.c_int64)]
    return lib


def encoder_weights(W: np.ndarray, dtype: str):
    """W_enc in the given dtype and the int8 scales (None otherwise)."""
    if dtype == "f32":
        return W, None
    if dtype == "f16":
        return W.astype(np.float16), None
    if dtype == "bf16":
        return (W.view(np.uint32) >> 16).astype(np.uint16), None  # truncation is fine for timing
    scales = (np.abs(W).max(1) / 127).astype(np.float32)
    return np.round(W / scales[:, None]).astype(np.int8), scales


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", nargs="+", help="libsaehook.so files; ratios are against the first")
    ap.add_argument("--shape", default="4096x65536", help="d_model x d_sae")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="encoder dtype")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cls", default=None, help="a CPU-class spec per library, ';'-separated")
    ap.add_argument("--prefilter", default=None,
                    help="per library, ';'-separated: 1 reads the f32 encoder through the bf16 prefilter, 0 not")
    ap.add_argument("--isa", default=None, help="force this kernel path in every library")
    ap.add_argument("--threads", type=int, default=0, help="0: all CPUs")
    ap.add_argument("--decode", action="store_true",
                    help="time decode (f32 decoder, feature rows; fresh rows every call, so not from L3)")
    a = ap.parse_args()
    d, m = (int(v) for v in a.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((m, d), dtype=np.float32) / np.float32(np.sqrt(d))
    We, scales = encoder_weights(W, a.dtype)
    Wdec = W if a.decode else np.zeros((m, d), np.uint16)  # bf16 zeros when only encode runs
    x = rng.standard_normal((a.batch, d), dtype=np.float32)
    specs = a.cls.split(";") if a.cls else [None] * len(a.libs)
    if len(specs) != len(a.libs):
        raise SystemExit(f"--cls has {len(specs)} specs for {len(a.libs)} libraries")
    pfs = [v.strip() == "1" for v in a.prefilter.split(";")] if a.prefilter else [False] * len(a.libs)
    if len(pfs) != len(a.libs):
        raise SystemExit(f"--prefilter has {len(pfs)} entries for {len(a.libs)} libraries")
    if any(pfs) and a.dtype != "f32":
        raise SystemExit("--prefilter filters a float32 encoder: use --dtype f32")

    libs, saes = [], []
    for path, spec in zip(a.libs, specs):
        lib = load(path)
        if spec and lib.saehook_set_cpu_class(spec.encode()) != 0:
            raise SystemExit(f"{path}: {lib.saehook_last_error().decode()}")
        if a.isa and lib.saehook_set_isa(a.isa.encode()) != 0:
            raise SystemExit(f"{path}: kernel path {a.isa!r} not available")
        desc = Desc(d, m, a.k, 0, 0, We.ctypes.data, DTYPES[a.dtype],
                    scales.ctypes.data if scales is not None else None, None, Wdec.ctypes.data,
                    0 if a.decode else 2, 0, None, None, 0, 0, 0)
        h = C.c_void_p()
        if lib.saehook_sae_create(C.byref(desc), C.byref(h)) != 0:
            raise SystemExit(f"{path}: {lib.saehook_last_error().decode()}")
        if pfs[len(libs)]:
            if not hasattr(lib, "saehook_sae_set_prefilter"):
                raise SystemExit(f"{path}: this build has no prefilter (C API version < 3)")
            if lib.saehook_sae_set_prefilter(h, DTYPES["bf16"], None) != 0:
                raise SystemExit(f"{path}: {lib.saehook_last_error().decode()}")
        libs.append(lib)
        saes.append(h)

    ex = Exec(a.threads, None)
    vals = np.zeros((a.batch, a.k), np.float32)
    idx = np.zeros((a.batch, a.k), np.int32)
    dvals = np.abs(rng.standard_normal((a.batch, a.k))).astype(np.float32)
    # Decode: fresh codes every call, cycling through sets whose rows add up to at least 1 GiB
    # (32x a 32 MiB L3), so no call finds its rows in L3 from an earlier one.
    n_sets = max(2, -(-2**30 // (a.batch * a.k * d * 4))) if a.decode else 1
    dsets = [np.stack([rng.choice(m, a.k, replace=False) for _ in range(a.batch)]).astype(np.int32)
             for _ in range(n_sets)]
    dout = np.zeros((a.batch, d), np.float32)
    calls = [0]

    def call(i: int, fixed: bool = False) -> None:
        if a.decode:
            calls[0] += 1
            di = dsets[0 if fixed else calls[0] % n_sets]
            st = libs[i].saehook_decode(saes[i], dvals.ctypes.data, di.ctypes.data, a.batch, a.k,
                                        dout.ctypes.data, d, C.byref(ex))
        else:
            st = libs[i].saehook_encode(saes[i], x.ctypes.data, a.batch, d, a.k, vals.ctypes.data,
                                        idx.ctypes.data, C.byref(ex))
        if st != 0:
            raise SystemExit(f"{a.libs[i]}: {libs[i].saehook_last_error().decode()}")

    outs = []
    for i in range(len(libs)):
        call(i, fixed=True)
        outs.append(dout.copy() if a.decode else idx.copy())
    for i, o in enumerate(outs[1:], 1):
        if a.decode:
            print(f"lib {i}: decode's largest difference from lib 0: {float(np.abs(o - outs[0]).max()):.3g}")
        else:
            agree = np.mean([len(set(p) & set(q)) / a.k for p, q in zip(o.tolist(), outs[0].tolist())])
            print(f"lib {i}: Top-K agreement with lib 0: {agree:.4f}")

    probe = np.ones(1 << 28, np.float32)  # 1 GiB
    times = [[] for _ in libs]
    bws = []
    for rnd in range(a.rounds):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            libs[0].saehook_read_probe(probe.ctypes.data, probe.nbytes, C.byref(ex))
            ts.append(time.perf_counter() - t0)
        bws.append(probe.nbytes / min(ts) / 1e9)
        order = list(range(len(libs)))
        for i in (order[::-1] if rnd % 2 else order):
            time.sleep(0.05)  # the other build's pool threads go to sleep
            call(i)
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                call(i)
                ts.append(time.perf_counter() - t0)
            times[i].append(float(np.median(ts)))
    t = np.array(times) * 1e3
    nbytes = a.batch * a.k * d * 4 if a.decode else We.nbytes
    what = "decoder rows" if a.decode else f"{a.dtype} encoder"
    print(f"read probe {min(bws):.1f}-{max(bws):.1f} GB/s; {what}: {nbytes / 2**20:.0f} MiB read per call")
    for i, path in enumerate(a.libs):
        ratio = t[i] / t[0]
        frac = nbytes / (t[i] / 1e3) / 1e9 / np.array(bws)
        label = path + (f" [{specs[i]}]" if specs[i] else "") + (" [prefilter]" if pfs[i] else "")
        print(f"{label:<40} {np.median(t[i]):9.2f} ms  {nbytes / np.median(t[i]) / 1e6:6.1f} GB/s  "
              f"of bw {np.median(frac):.3f}  time vs lib 0 {np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f})")
        if pfs[i]:
            st = (C.c_int64 * 4)()
            libs[i].saehook_sae_prefilter_stats(saes[i], st)
            print(f"{'':<40} prefilter: {st[2] / max(st[1], 1):.1f} features recomputed per row, "
                  f"{st[3]} calls fell back, copy {st[0] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
