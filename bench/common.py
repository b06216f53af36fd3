"""Measurement helpers shared by the benchmarks."""
from __future__ import annotations

import time

import numpy as np


# Worker threads of the previous measurement's library keep spinning for a while after its last
# call (OpenBLAS about 0.1 s, OpenMP's default spin), and on a machine with few cores they steal
# the CPU from whatever is measured next: numpy right before saehook's f32 encode made it read
# 69% of the bandwidth instead of 89%. Each measurement therefore starts after a short idle,
# then warms up for at least WARM_S (after the idle, the first calls of a millisecond kernel run
# on sleeping cores: int8 encode at 2048 x 32768 read 65% instead of 100% of the bandwidth).
SETTLE_S = 0.2
WARM_S = 0.15


def median_time(fn, reps: int, warmup: int = 1) -> float:
    time.sleep(SETTLE_S)
    t_end = time.perf_counter() + WARM_S
    done = 0
    while done < warmup or time.perf_counter() < t_end:
        fn()
        done += 1
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


_PROBE = None


def _probe_buffer() -> np.ndarray:
    """1 GiB, far beyond any cache, allocated once per process: allocating and freeing it at
    every measurement slowed whatever ran about a second later (the kernel reclaiming the pages
    on this 2-core VM): in bench_llama the scenario after the first took 2 ms/token more (+11%),
    whichever it was."""
    global _PROBE
    if _PROBE is None:
        _PROBE = np.ones(1 << 28, dtype=np.float32)
    return _PROBE


def read_bandwidth(threads: int) -> dict:
    """GB/s of a large-array reduction: numpy (one thread), torch (all threads) and saehook's
    read probe (the kernels' thread pool and 2 MiB blocks; torch.sum alone read 20-25% below
    what a gemv reached on this class of VM). The bound is the fastest of them."""
    from saehook import _core

    a = _probe_buffer()
    out = {"numpy_sum_1thread": a.nbytes / median_time(a.sum, 5) / 1e9}
    out["saehook_probe"] = a.nbytes / median_time(lambda: _core.read_probe(a.ctypes.data, a.nbytes, threads), 5) / 1e9
    try:
        import torch

        torch.set_num_threads(threads)
        t = torch.from_numpy(a)
        out["torch_sum"] = a.nbytes / median_time(t.sum, 5) / 1e9
    except ImportError:
        pass
    out["bound"] = max(out.values())
    return out


def cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def paired_times(fa, fb, reps: int, gap: float = 0.02):
    """Medians of fa and fb timed in alternation, each call after `gap` seconds idle, and the
    median of the per-pair ratios fa/fb: the comparison survives this VM's bandwidth drift, and
    neither library's spinning threads slow the other's call (torch's OpenMP threads spin after
    each op: timed right after one, saehook's decode read 1.23x EmbeddingBag's time, 1.02x with
    the gap)."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(max(reps, 5)):
        for f, ts in ((fa, ta), (fb, tb)):
            time.sleep(gap)
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    ratio = float(np.median(np.array(ta) / np.array(tb)))
    return float(np.median(ta)), float(np.median(tb)), ratio

