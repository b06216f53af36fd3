#!/usr/bin/env python
"""llama.cpp benchmark: the cost of saehook's hook on prompt processing and generation.

    python bench/bench_llama.py                      # synthetic Qwen3, hidden 2048, Q4_K_M
    python bench/bench_llama.py --model my.gguf --sae layer12.safetensors --layer 12

Without --model it builds (once, cached in --cache) a random-weight Qwen3 of realistic width
written with saehook.demo.gguf_writer and quantized by llama.cpp, and a random Top-K SAE of matching
width. Scenarios: the plain llama_cpp.Llama, HookedLlama with no entries (the callback's idle
cost), capture at 1 and 4 layers, clamp steering of 4 features, additive steering through a
control vector. For each: prompt tokens/s and generation tokens/s, the overhead in percent, and
for capture/clamp the bound the issue sets: W_enc bytes / read bandwidth per token and layer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import saehook
from common import read_bandwidth


def synthetic_model(cache: str, hidden: int, layers: int, ffn: int, quant: str) -> str:
    from saehook.demo.gguf_writer import VOCAB, quantize, write_qwen3

    os.makedirs(cache, exist_ok=True)
    name = f"qwen3-h{hidden}-l{layers}-f{ffn}"
    out = os.path.join(cache, f"{name}-{quant}.gguf")
    if os.path.exists(out):
        return out
    heads, head_dim = hidden // 128, 128
    kv = max(1, heads // 4)
    cfg = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=1e6, vocab_size=VOCAB)
    rng = np.random.default_rng(0)
    rnd = lambda *shape: (0.02 * rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(VOCAB, hidden), "lm_head.weight": rnd(VOCAB, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                  p + "self_attn.q_norm.weight": np.ones(head_dim, np.float32),
                  p + "self_attn.k_norm.weight": np.ones(head_dim, np.float32),
                  p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": rnd(kv * head_dim, hidden),
                  p + "self_attn.v_proj.weight": rnd(kv * head_dim, hidden),
                  p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                  p + "mlp.down_proj.weight": rnd(hidden, ffn)})
    f32 = os.path.join(cache, f"{name}-f32.gguf")
    print(f"writing {f32} ...", flush=True)
    write_qwen3(f32, cfg, t)
    del t
    print(f"quantizing to {quant} ...", flush=True)
    quantize(f32, out, quant)
    os.remove(f32)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: a synthetic Qwen3)")
    p.add_argument("--sae", help="an SAE file (default: random Top-K of the model's width)")
    p.add_argument("--layer", type=int, default=None, help="hooked layer (default: the middle one)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--sae-dtype", default="f32", choices=["f32", "bf16", "int8"])
    p.add_argument("--prefilter", action="store_true",
                   help="encode the f32 SAE through its bf16 copy (SAE.set_prefilter: the same features); the "
                   "read bound stays that of the f32 W_enc")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="rounds over all scenarios (medians are reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "saehook-bench"))
    p.add_argument("--json", default="bench_llama.json")
    args = p.parse_args()

    from saehook.llama import HookedLlama, plain_llama  # first: it sets up llama.cpp's OpenMP threads

    path = args.model or synthetic_model(args.cache, args.hidden, args.layers, args.ffn, args.quant)
    common_kw = dict(n_ctx=args.prompt_tokens + args.gen_tokens + 64, n_batch=512, n_ubatch=512,
                     n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    hooked = HookedLlama(path, **common_kw)
    n_embd, n_layer = hooked.n_embd_model, hooked.n_layer
    layer = args.layer if args.layer is not None else n_layer // 2
    if args.sae:
        sae = saehook.load(args.sae, layer=layer)
    else:
        rng = np.random.default_rng(0)
        W = rng.standard_normal((args.d_sae, n_embd), dtype=np.float32) / np.sqrt(n_embd)
        sae = saehook.SAE(W, W, k=args.k, metadata={"layer": layer})
    if args.sae_dtype != sae.enc_dtype:
        sae = sae.to_dtype(args.sae_dtype)
    if args.prefilter:
        if sae.enc_dtype != "f32":
            raise SystemExit("--prefilter filters a float32 encoder: use --sae-dtype f32")
        sae.set_prefilter("bf16")
    saehook.set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(0, 256, args.prompt_tokens)]
    four = [max(1, min(n_layer - 1, layer + d)) for d in (-2, -1, 0, 1)]

    def once(llm, ctx_factory):
        """Seconds of one prompt evaluation and of the generation steps (without their prefix)."""
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def pp():
            llm.reset()
            with ctx_factory():
                llm.eval(prompt)

        def prefix():
            llm.reset()
            with ctx_factory():
                llm.eval(prompt[:16])

        def gen():
            llm.reset()
            with ctx_factory():
                llm.eval(prompt[:16])
                for i in range(args.gen_tokens):
                    llm.eval([prompt[16 + i % 200]])

        t_pp = timed(pp)
        h0 = hooked.hook_seconds
        t_prefix = timed(prefix)
        h1 = hooked.hook_seconds
        t_gen = timed(gen)
        h2 = hooked.hook_seconds
        # the hook's own seconds in the generation steps (gen's minus its prefix's; 0 for plain)
        return t_pp, t_gen - t_prefix, (h2 - h1) - (h1 - h0) if llm is hooked else 0.0

    x1 = rng.standard_normal((1, n_embd), dtype=np.float32)

    def encode_alone():
        """ms of one batch-1 encode of this SAE, back to back (the kernel without llama.cpp)."""
        sae.encode(x1)
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            sae.encode(x1)
        return (time.perf_counter() - t0) / args.gen_tokens * 1e3

    from contextlib import nullcontext

    plain = plain_llama(path, **common_kw)  # loaded as HookedLlama loads (see use_extra_bufts)
    st_clamp = saehook.Steering(sae, layer=layer)
    for f in range(4):
        st_clamp.clamp(f, 5.0)
    scenarios = [
        ("llama_cpp.Llama (no callback)", plain, nullcontext, 0),
        ("HookedLlama, no entries", hooked, nullcontext, 0),
        ("capture, 1 layer", hooked, lambda: hooked.capture({layer: sae}), 1),
        ("clamp 4 features, 1 layer", hooked, lambda: hooked.steer(st_clamp), 1),
        ("add (control vector), 1 layer", hooked, lambda: hooked.steer(saehook.Steering(sae, layer=layer).add(1, 4.0)), 0),
        ("capture, 4 layers", hooked, lambda: hooked.capture({L: sae for L in four}), 4),
    ]
    cpu = saehook.cpu_info()
    print(f"model {os.path.basename(path)}: n_embd {n_embd}, {n_layer} layers; SAE {sae.d_model}x{sae.d_sae} k={sae.k} "
          f"{sae.enc_dtype}; threads {args.threads}; CPU {cpu['vendor']} family {cpu['family']} model {cpu['model']}, "
          f"class {cpu['class']}, ISA {cpu['isa']}")
    # Rounds: the read bound, then every scenario once, in an order rotated every round (one
    # warm-up round first, not counted); medians over rounds, and each hooked scenario's cost
    # also taken within each round (against that round's plain llama.cpp and read bound), so that
    # this VM's drifting memory bandwidth affects all scenarios alike.
    times = {name: [] for name, *_ in scenarios}
    bws, enc_ms = [], []
    for rnd in range(args.reps + 1):
        if rnd:
            bws.append(read_bandwidth(args.threads)["bound"])
            enc_ms.append(encode_alone())
        shift = rnd % len(scenarios)
        for name, llm, factory, _ in scenarios[shift:] + scenarios[:shift]:
            t = once(llm, factory)
            if rnd:
                times[name].append(t)
    bw = {"bound_rounds": bws, "bound": float(np.median(bws))}
    print(f"read bandwidth {bw['bound']:.1f} GB/s (median of the rounds: "
          + ", ".join(f"{b:.0f}" for b in bws) + ")")
    rows = []
    base_pp = base_gen = None
    for name, llm, factory, n_hooked in scenarios:
        t_pp = float(np.median([t[0] for t in times[name]]))
        t_gen = float(np.median([t[1] for t in times[name]]))
        tps_pp, tps_gen = args.prompt_tokens / t_pp, args.gen_tokens / t_gen
        if base_pp is None:
            base_pp, base_gen = tps_pp, tps_gen
        bound_ms = n_hooked * sae.encoder_bytes / (bw["bound"] * 1e9) * 1e3
        extra_ms = (1 / tps_gen - 1 / base_gen) * 1e3
        row = dict(scenario=name, prompt_tok_s=tps_pp, gen_tok_s=tps_gen,
                   prompt_overhead_pct=100 * (base_pp / tps_pp - 1), gen_overhead_pct=100 * (base_gen / tps_gen - 1),
                   gen_extra_ms_per_token=extra_ms, encoder_read_bound_ms=bound_ms)
        rows.append(row)
        bound = ""
        if n_hooked:  # the target: at most the W_enc read bound + 5% per token
            row["within_bound_plus_5pct"] = bool(extra_ms <= 1.05 * bound_ms)
            base_name = scenarios[0][0]
            per_round = [((t[1] - b[1]) / args.gen_tokens * 1e3) / (n_hooked * sae.encoder_bytes / (g * 1e9) * 1e3)
                         for t, b, g in zip(times[name], times[base_name], bws)]
            row["bound_multiple_per_round"] = per_round
            # Where the added time goes, per round: the hook's own time (the callback: reading
            # the rows, the encodes, any write-back), the rest outside it (llama.cpp's graph
            # split at the hooked layers), and the same encodes alone, back to back.
            hook_ms = [t[2] / args.gen_tokens * 1e3 for t in times[name]]
            row["hook_ms_per_token_rounds"] = hook_ms
            row["encode_alone_ms_rounds"] = [n_hooked * e for e in enc_ms]
            bound = (f"  (+{extra_ms:.2f} ms/token; W_enc read bound {bound_ms:.2f} ms, {extra_ms / bound_ms:.2f}x; "
                     f"per round {np.median(per_round):.2f}x, {min(per_round):.2f}-{max(per_round):.2f})")
            bound += (f"\n{'':<32} of it the hook {np.median(hook_ms):.2f} ms/token (encodes alone "
                      f"{n_hooked * np.median(enc_ms):.2f} ms, {np.median([e * g / (sae.encoder_bytes / 1e6) for e, g in zip(enc_ms, bws)]):.2f}x "
                      f"the round's bound), outside the hook {extra_ms - np.median(hook_ms):.2f} ms")
        print(f"{name:<32} prompt {tps_pp:8.1f} tok/s ({row['prompt_overhead_pct']:+6.1f}%)   "
              f"generation {tps_gen:7.2f} tok/s ({row['gen_overhead_pct']:+6.1f}%){bound}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"model": path, "cpu": cpu, "n_embd": n_embd, "n_layer": n_layer, "layer": layer, "sae_dtype": sae.enc_dtype,
                   "d_sae": sae.d_sae, "k": sae.k, "threads": args.threads, "bandwidth_GBps": bw, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
