#!/usr/bin/env python
"""llama.cpp on a CUDA GPU: what saehook's hook costs per generated token with every layer
offloaded (n_gpu_layers=-1), on the device path (the SAE on the GPU) and on the host path (the
residual copied to the host, encoded by the CPU kernels, copied back), against the issue's bound.

    python bench/bench_llama_cuda.py                          # synthetic Qwen3 4096 wide, SAE 4096x65536 f32
    python bench/bench_llama_cuda.py --model my.gguf --layer 12 --d-sae 65536 --json out.json

Scenarios, timed in alternating rounds (medians): the plain llama_cpp.Llama, HookedLlama without
entries (the callback's idle cost), capture at one layer on the device path and on the host path
(HookedLlama.device_hook = False), a 4-feature clamp at one layer (device path), and 8 sequences
in one decode, each with its own clamp (serve's shape; one shared encode per step). For each:
generation tokens/s and the extra time per token over the plain Llama (and over HookedLlama without
entries: the callback's and the announcements' share); for the device-path
capture also the target 1.2 x (W_enc bytes / measured device read bandwidth) + 50 us. The read
bandwidth is torch's sum over a 1 GiB tensor (CUDA events, median). Exits with a message
(status 0) where llama.cpp has no GPU backend, saehook no CUDA kernels, or there is no device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: a synthetic Qwen3, see --hidden)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--quant", default="Q8_0")
    p.add_argument("--layer", type=int, default=None, help="hooked layer (default: the middle one)")
    p.add_argument("--d-sae", type=int, default=65536)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--sae-dtype", default="f32", choices=["f32", "bf16", "int8"])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "saehook-bench"))
    p.add_argument("--json", default="bench_llama_cuda.json")
    p.add_argument("--emulate", action="store_true",
                   help="no GPU: the model on the CPU and the device path on saehook's emulated device (checks this "
                        "script end to end; the times mean nothing)")
    args = p.parse_args()

    from saehook.llama import HookedLlama, plain_llama  # first: it sets up llama.cpp's OpenMP threads

    import llama_cpp

    import saehook
    from saehook import _core

    import saehook.llama as shl

    if args.emulate:
        return run(args, llama_cpp, saehook, shl, HookedLlama, plain_llama, None)
    if not llama_cpp.llama_supports_gpu_offload():
        print("bench_llama_cuda: llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on); "
              "nothing to measure")
        return 0
    if not _core.cuda_available():
        print("bench_llama_cuda: this saehook build has no CUDA kernels; nothing to measure")
        return 0
    try:
        import torch
    except ImportError:
        print("bench_llama_cuda: needs torch to measure the device's bandwidth; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("bench_llama_cuda: no CUDA device; nothing to measure")
        return 0
    return run(args, llama_cpp, saehook, shl, HookedLlama, plain_llama, torch)


def read_bandwidth(torch) -> float:
    """Bytes/s of one read of 1 GiB on the GPU (a sum, CUDA events, median of 10)."""
    dev = torch.device("cuda", 0)
    buf = torch.ones(1 << 28, dtype=torch.float32, device=dev)
    ts = []
    for i in range(13):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        buf.sum()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            ts.append(a.elapsed_time(b) / 1e3)
    bw = buf.numel() * 4 / float(np.median(ts))
    del buf
    torch.cuda.empty_cache()
    return bw


def run(args, llama_cpp, saehook, shl, HookedLlama, plain_llama, torch) -> int:
    emulate = torch is None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_llama import synthetic_model  # one writer of the synthetic model

    path = args.model or synthetic_model(args.cache, args.hidden, args.layers, args.ffn, args.quant)
    kw = dict(n_ctx=256, n_batch=256, n_ubatch=256, n_gpu_layers=0 if emulate else -1, verbose=False)
    hooked = HookedLlama(path, **kw)
    batched = HookedLlama(path, context_overrides={"n_seq_max": 8, "kv_unified": True}, **kw)
    plain = plain_llama(path, **kw)
    for llm in (hooked, batched):
        shl._lib().emulate_device(llm._hook, int(emulate))
    n_embd, n_layer = hooked.n_embd_model, hooked.n_layer
    layer = args.layer if args.layer is not None else n_layer // 2
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((args.d_sae, n_embd), dtype=np.float32) / np.sqrt(n_embd)).astype(np.float32)
    sae = saehook.SAE(W, W, k=args.k, metadata={"layer": layer})
    if args.sae_dtype != sae.enc_dtype:
        sae = sae.to_dtype(args.sae_dtype)
    clamp = saehook.Steering(sae, layer=layer)
    for f in range(4):
        clamp.clamp(f, 5.0)

    if emulate:
        from common import read_bandwidth as cpu_bandwidth  # bench/common.py: the CPU's read probe

        read_bw, device_name = cpu_bandwidth(os.cpu_count())["bound"] * 1e9, "emulated (CPU)"
    else:
        read_bw, device_name = read_bandwidth(torch), torch.cuda.get_device_name(0)

    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 16)]
    n = args.gen_tokens

    def gen_seconds(llm, ctx_factory):
        """Seconds per generated token: prompt, then n single-token decodes (timed)."""
        llm.reset()
        with ctx_factory():
            llm.eval(prompt)
            t0 = time.perf_counter()
            for i in range(n):
                llm.eval([prompt[i % len(prompt)]])
            return (time.perf_counter() - t0) / n

    def batch8_seconds(_llm, _factory):
        """Seconds per step of 8 sequences (one token each) with 8 different clamps."""
        batch = llama_cpp.llama_batch_init(64, 0, 1)
        sts = [saehook.Steering(sae, layer=layer).clamp(10 + s, 5.0) for s in range(8)]
        hooks = [batched.hook_sequence(s, steerings=[sts[s]]) for s in range(8)]
        try:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(batched._ctx.ctx), True)

            def decode(entries, generated):
                for j, (s, tok, pos) in enumerate(entries):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = tok, pos, 1, s
                    batch.logits[j] = 1
                batch.n_tokens = len(entries)
                batched.announce_batch(batch, generated=generated)
                assert llama_cpp.llama_decode(batched._ctx.ctx, batch) == 0
                batched.raise_hook_error()

            for s in range(8):
                decode([(s, t, p) for p, t in enumerate(prompt)], False)
            before = batched.encode_count
            t0 = time.perf_counter()
            for i in range(n):
                decode([(s, prompt[(i + s) % len(prompt)], len(prompt) + i) for s in range(8)], True)
            dt = (time.perf_counter() - t0) / n
            batch8_seconds.encodes_per_step = (batched.encode_count - before) / n
            return dt
        finally:
            for h in hooks:
                h.close()
            llama_cpp.llama_batch_free(batch)

    from contextlib import contextmanager, nullcontext

    @contextmanager
    def host_path(ctx):
        hooked.device_hook = False
        shl._lib().emulate_device(hooked._hook, 0)
        try:
            with ctx:
                yield
        finally:
            hooked.device_hook = True
            shl._lib().emulate_device(hooked._hook, int(emulate))

    scenarios = [
        ("llama_cpp.Llama (no callback)", plain, nullcontext, gen_seconds),
        ("HookedLlama, no entries", hooked, nullcontext, gen_seconds),
        ("capture 1 layer, device path", hooked, lambda: hooked.capture({layer: sae}), gen_seconds),
        ("capture 1 layer, host path", hooked, lambda: host_path(hooked.capture({layer: sae})), gen_seconds),
        ("clamp 4 features, device path", hooked, lambda: hooked.steer(clamp), gen_seconds),
        ("8 sequences x own clamp, per step", batched, None, batch8_seconds),
    ]
    with hooked.capture({layer: sae}):
        hooked.eval(prompt[:2])
        path_line = hooked.hook_paths()[layer]
    print(f"model {os.path.basename(path)}: n_embd {n_embd}, {n_layer} layers, {'on the CPU' if emulate else 'all on the GPU'}; SAE {sae.d_model}x"
          f"{sae.d_sae} k={sae.k} {sae.enc_dtype}, layer {layer}: {path_line}")
    print(f"device {device_name}, read bandwidth {read_bw / 1e9:.0f} GB/s")
    times = {name: [] for name, *_ in scenarios}
    for rnd in range(args.reps + 1):  # the first round warms up (SAE upload, graph reservation)
        for name, llm, factory, fn in scenarios:
            t = fn(llm, factory)
            if rnd:
                times[name].append(t)
    base = float(np.median(times[scenarios[0][0]]))
    idle = float(np.median(times[scenarios[1][0]]))  # the callback and the announcements, no entry
    bound_s = sae.encoder_bytes / read_bw
    target_s = 1.2 * bound_s + 50e-6
    rows = []
    for name, *_ in scenarios:
        t = float(np.median(times[name]))
        row = dict(scenario=name, s_per_token=t, tok_s=1 / t, extra_us=(t - base) * 1e6,
                   extra_vs_idle_us=(t - idle) * 1e6)
        rows.append(row)
        print(f"{name:<36} {1 / t:9.1f} tok/s   {t * 1e3:8.3f} ms/token   {(t - base) * 1e6:+9.1f} us "
              f"({(t - idle) * 1e6:+9.1f} us over no entries)", flush=True)
    cap = next(r for r in rows if r["scenario"] == "capture 1 layer, device path")
    ok = cap["extra_us"] <= target_s * 1e6
    print(f"W_enc {sae.encoder_bytes / 2**20:.0f} MiB / {read_bw / 1e9:.0f} GB/s = {bound_s * 1e6:.1f} us; target "
          f"1.2 x that + 50 us = {target_s * 1e6:.1f} us; device-path capture adds {cap['extra_us']:.1f} us: "
          f"{'within' if ok else 'ABOVE'} the target")
    print(f"8 sequences: {getattr(batch8_seconds, 'encodes_per_step', float('nan')):.2f} encodes per step")
    with open(args.json, "w") as f:
        json.dump({"emulated": emulate, "device": device_name, "model": path, "n_embd": n_embd, "n_layer": n_layer, "layer": layer, "path": path_line,
                   "sae": [sae.d_model, sae.d_sae, sae.k, sae.enc_dtype], "read_bandwidth_GBps": read_bw / 1e9,
                   "bound_us": bound_s * 1e6, "target_us": target_s * 1e6, "within_target": ok,
                   "encodes_per_batch8_step": getattr(batch8_seconds, "encodes_per_step", None), "rows": rows}, f,
                  indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
