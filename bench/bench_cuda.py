#!/usr/bin/env python
"""GPU kernel benchmark: saehook's CUDA encode / decode / steer against torch's matmul + topk
and against the memory-bandwidth bound, at Qwen-Scope shapes.

    python bench/bench_cuda.py                               # all shapes, batches 1 8 64 256 2048
    python bench/bench_cuda.py --shapes 4096x65536 --batches 1,64 --dtypes bf16 --json out.json

For each (shape, dtype, batch, k) it prints the median call time (CUDA events, after warm-up; a
call waits for its stream to report bad input, as by default), the same with that wait turned off
(SAEHOOK_CUDA_SYNC=0: the calls queue like torch's, so this is the GPU time),
torch's time for the same result (x @ W_enc.T + b_enc, activation, topk; for decode a gather of
the k decoder rows), the speed-up, the effective read rate of the weights the kernel must touch
and that rate as a fraction of the device's measured copy bandwidth (the bound when the batch is
small and the kernel reads each weight once). Results are checked against torch (Top-K overlap)
before anything is timed. Exits with a message (status 0) where there is no CUDA device or the
saehook build has no CUDA kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2048x32768,4096x65536,5120x81920,2048x131072,5120x131072",
                   help="d_model x d_sae, comma separated")
    p.add_argument("--batches", default="1,8,64,256,2048")
    p.add_argument("--k", default="50,100")
    p.add_argument("--dtypes", default="bf16,f16,f32,int8")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="bench_cuda.json")
    args = p.parse_args()

    try:
        import torch
    except ImportError:
        print("bench_cuda: torch is not installed; nothing to measure")
        return 0
    import saehook
    from saehook import _core

    if not _core.cuda_available():
        print("bench_cuda: this saehook build has no CUDA kernels (built without a CUDA toolkit); nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False); nothing to measure")
        return 0
    import saehook.cuda as sc

    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    props = torch.cuda.get_device_properties(dev)
    torch.backends.cuda.matmul.allow_tf32 = False

    def timed(fn, reps=args.reps, warmup=3) -> float:
        for _ in range(warmup):
            fn()
        start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(start, end):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) for s, e in zip(start, end))
        return ts[len(ts) // 2] / 1e3  # seconds

    # Device copy bandwidth (read + write of 1 GiB), the bound of a weight-streaming kernel.
    buf = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    dst = torch.empty_like(buf)
    copy_s = timed(lambda: dst.copy_(buf), reps=10)
    bandwidth = 2 * buf.numel() * 4 / copy_s
    del buf, dst

    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
    bytes_of = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}
    info = {
        "device": torch.cuda.get_device_name(dev), "sm": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1), "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "saehook_cuda": sc.describe(dev), "torch": torch.__version__, "python": platform.python_version(),
    }
    print("device:", info["device"], f"(sm {info['sm']}, {info['memory_gib']} GiB)",
          f"copy bandwidth {info['copy_bandwidth_gbs']} GB/s;", info["saehook_cuda"])
    rows = []
    header = (f"{'op':<7}{'shape':>13}{'dtype':>6}{'batch':>6}{'k':>5}{'saehook ms':>12}{'async ms':>10}"
              f"{'torch ms':>10}{'speedup':>9}{'GB/s':>8}{'of bw':>7}{'overlap':>9}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        d_model, d_sae = (int(v) for v in shape.lower().split("x"))
        for dtype in args.dtypes.split(","):
            # f32 master weights + encoder + decoder + torch's reference copy
            need = d_model * d_sae * (4 + bytes_of[dtype] + 2 * (2 if dtype == "int8" else bytes_of[dtype]))
            if need * 1.3 > torch.cuda.mem_get_info(dev)[0]:
                print(f"skip {shape} {dtype}: not enough free device memory")
                continue
            gen = torch.Generator(device=dev).manual_seed(0)
            W = torch.randn(d_sae, d_model, device=dev, generator=gen) / d_model ** 0.5
            b_enc = 0.1 * torch.randn(d_sae, device=dev, generator=gen)
            if dtype == "int8":
                scales = W.abs().amax(dim=1) / 127
                W_enc = torch.round(W / scales[:, None]).clamp(-127, 127).to(torch.int8)
                W_ref = W.to(torch.bfloat16)  # torch has no int8 x float matmul: its bf16 equivalent
                W_dec = W_ref
                gpu = sc.from_tensors(W_enc, W_dec, b_enc, k=1, activation="topk_relu", enc_scales=scales)
                ref_dtype = torch.bfloat16
            else:
                W_enc = W.to(torch_dtype[dtype])
                W_ref = W_enc
                W_dec = W_enc
                gpu = sc.from_tensors(W_enc, W_dec, b_enc, k=1, activation="topk_relu")
                ref_dtype = torch_dtype[dtype]
            del W
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, d_model, device=dev, generator=gen)
                x[:, :4] *= 20  # a few 'massive activation' dimensions, as in real residual streams
                for k in (int(v) for v in args.k.split(",")):
                    def saehook_encode():
                        return gpu.encode(x, k)

                    def torch_encode():
                        pre = torch.addmm(b_enc.to(ref_dtype), x.to(ref_dtype), W_ref.T)
                        return torch.topk(torch.relu(pre.float()), k)

                    v, i = saehook_encode()
                    tv, ti = torch_encode()
                    overlap = float(torch.mean(torch.tensor([
                        len(set(a) & set(b)) / k for a, b in zip(i.tolist(), ti.tolist())])))
                    if overlap < 0.9:
                        print(f"WARNING {shape} {dtype} batch {batch} k {k}: Top-K overlap with torch {overlap:.3f}")
                    t_s = timed(saehook_encode)
                    os.environ["SAEHOOK_CUDA_SYNC"] = "0"
                    try:
                        t_a = timed(saehook_encode)
                    finally:
                        del os.environ["SAEHOOK_CUDA_SYNC"]
                    t_t = timed(torch_encode)
                    enc_bytes = d_model * d_sae * bytes_of[dtype]
                    rate = enc_bytes / t_a  # the kernels' rate: GPU time without the report's wait
                    rows.append(dict(op="encode", shape=shape, dtype=dtype, batch=batch, k=k, saehook_ms=t_s * 1e3,
                                     async_ms=t_a * 1e3, torch_ms=t_t * 1e3, weight_gbs=rate / 1e9,
                                     of_bandwidth=rate / bandwidth, overlap=overlap))
                    r = rows[-1]
                    print(f"{'encode':<7}{shape:>13}{dtype:>6}{batch:>6}{k:>5}{r['saehook_ms']:>12.3f}{t_a * 1e3:>10.3f}"
                          f"{r['torch_ms']:>10.3f}{t_t / t_s:>9.2f}{r['weight_gbs']:>8.0f}{r['of_bandwidth']:>7.0%}"
                          f"{overlap:>9.3f}")

                    # decode of the codes: k decoder rows per token
                    Wd = gpu.W_dec

                    def saehook_decode():
                        return gpu.decode(v, i)

                    def torch_decode():
                        gathered = Wd[i.clamp(min=0).long()].float()  # (batch, k, d_model)
                        return torch.einsum("bk,bkd->bd", v * (i >= 0), gathered)

                    torch.testing.assert_close(saehook_decode(), torch_decode(), rtol=1e-3, atol=1e-3)
                    t_s = timed(saehook_decode)
                    t_t = timed(torch_decode)
                    touched = min(batch * k, d_sae) * d_model * Wd.element_size()  # distinct rows at most
                    rate = touched / t_s
                    rows.append(dict(op="decode", shape=shape, dtype=str(Wd.dtype).replace("torch.", ""), batch=batch,
                                     k=k, saehook_ms=t_s * 1e3, torch_ms=t_t * 1e3, weight_gbs=rate / 1e9,
                                     of_bandwidth=rate / bandwidth, overlap=None))
                    print(f"{'decode':<7}{shape:>13}{dtype:>6}{batch:>6}{k:>5}{t_s * 1e3:>12.3f}{'':>10}{t_t * 1e3:>10.3f}"
                          f"{t_t / t_s:>9.2f}{rate / 1e9:>8.0f}{rate / bandwidth:>7.0%}{'':>9}")

                    # steering: clamp 4 features (one encode, then 4 directions per row), in place
                    ops = [("clamp", f, 1.0) for f in (1, 2, 3, 4)]
                    h = x.clone()
                    t_s = timed(lambda: gpu.steer(ops, h, k=k))
                    rate = enc_bytes / t_s
                    rows.append(dict(op="steer", shape=shape, dtype=dtype, batch=batch, k=k, saehook_ms=t_s * 1e3,
                                     torch_ms=None, weight_gbs=rate / 1e9, of_bandwidth=rate / bandwidth, overlap=None))
                    print(f"{'steer':<7}{shape:>13}{dtype:>6}{batch:>6}{k:>5}{t_s * 1e3:>12.3f}{'':>10}{'':>10}{'':>9}"
                          f"{rate / 1e9:>8.0f}{rate / bandwidth:>7.0%}")
            del gpu, W_enc, W_dec, W_ref
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(json.dumps({"info": info, "n_rows": len(rows), "json": args.json}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
