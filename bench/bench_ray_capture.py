"""Capture throughput at Qwen3.5-9B's width: a synthetic Qwen3 GGUF with hidden 4096,
intermediate 12288, 32 heads (8 KV, head_dim 128), LAYERS layers (default 2), Q4_K_M; one
4096 x 65536 bf16 SAE (k = 100) at layer 0 (llama.cpp keeps only the requested output rows at
the last layer, so a capture there would see one token per document); documents of TOKENS byte-level tokens.
Times `datasets.capture` in this process and `capture_on_ray` on a local Ray cluster with one
actor of --threads CPUs, and prints tokens/s of each, and per layer (to scale to a deeper model:
the forward is per layer, the SAE encode once per hooked layer).

    python bench/bench_ray_capture.py --docs 16 --tokens 128 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before anything loads libgomp (see engines/llama.py)
import tempfile
import time

import numpy as np

import saehook
from saehook.demo import gguf_writer as gw
from saehook.engines import open_engine
from saehook.workflows import datasets
from saehook.workflows.distributed import capture_on_ray


def synthetic_model(path, layers, seed=0):
    rng = np.random.default_rng(seed)
    d, f, nh, nkv, hd = 4096, 12288, 32, 8, 128
    cfg = dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=nh,
               num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=1e6, vocab_size=gw.VOCAB)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    t = {"model.embed_tokens.weight": w(gw.VOCAB, d), "model.norm.weight": np.ones(d, np.float32),
         "lm_head.weight": w(gw.VOCAB, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(d, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                  p + "self_attn.q_proj.weight": w(nh * hd, d), p + "self_attn.k_proj.weight": w(nkv * hd, d),
                  p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
                  p + "self_attn.q_norm.weight": np.ones(hd, np.float32),
                  p + "self_attn.k_norm.weight": np.ones(hd, np.float32),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f)})
    f32 = path + ".f32.gguf"
    gw.write_qwen3(f32, cfg, t)
    del t
    gw.quantize(f32, path, "Q4_K_M")
    os.remove(f32)


def synthetic_sae(path, layer, seed=1):
    rng = np.random.default_rng(seed)
    d, n = 4096, 65536

    def bf16(shape):
        out = np.empty(shape, np.uint16)
        for r in range(0, shape[0], 4096):  # 64 MiB of f32 at a time
            x = rng.standard_normal((min(4096, shape[0] - r), shape[1]), dtype=np.float32) * 0.02
            out[r: r + len(x)] = (x.view(np.uint32) >> 16).astype(np.uint16)
        return out
    W_enc = bf16((n, d))
    saehook.SAE(W_enc, W_enc, k=100, activation="topk", enc_dtype="bf16", dec_dtype="bf16",
                metadata={"layer": layer}).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", help="where the model, SAE and captures go (default: a temporary directory)")
    a = ap.parse_args()
    d = a.dir or tempfile.mkdtemp(prefix="bench_ray_capture_")
    model, sae = os.path.join(d, "m.gguf"), os.path.join(d, "sae.safetensors")
    if not os.path.exists(model):
        synthetic_model(model, a.layers)
    if not os.path.exists(sae):
        synthetic_sae(sae, 0)
    rng = np.random.default_rng(0)
    # one byte-level token per character of this alphabet (none of the tiny vocabulary's merges)
    docs = [{"text": "".join(rng.choice(list("bcdfgjklmpqsuvwxyz"), a.tokens))} for _ in range(a.docs)]
    out = {}
    eng = open_engine(model, threads=a.threads)
    saes = {0: saehook.load(sae)}
    n_tok = sum(len(eng.tokenize(x["text"])) for x in docs)
    datasets.capture(eng, saes, docs[:1], os.path.join(d, "warm"), shard_docs=1)  # page the weights in
    t = time.perf_counter()
    datasets.capture(eng, saes, docs, os.path.join(d, "local"), shard_docs=4)
    out["local_tok_s"] = n_tok / (time.perf_counter() - t)
    del eng
    import ray

    ray.init(num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
    try:
        commits = []
        t = time.perf_counter()
        res = capture_on_ray(model, {0: sae}, docs, os.path.join(d, "ray"), shard_docs=4, num_actors=1, num_cpus=a.threads,
                             on_commit=lambda unit: commits.append(time.perf_counter()))
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    # steady state: the units after the first (the first one also pays the actor's start and loads)
    out["ray_tok_s_steady"] = n_tok * (len(commits) - 1) / len(commits) / (commits[-1] - commits[0])
    out["ray_start_s"] = commits[0] - t - (n_tok / len(commits)) / out["ray_tok_s_steady"]
    out["ray_tok_s_with_start"] = n_tok / wall
    out.update(tokens=n_tok, layers=a.layers, threads=a.threads, shards=res["shards"],
               shard_bytes=sum(os.path.getsize(os.path.join(d, "ray", datasets.shard_name(i)))
                               for i in range(res["shards"])))
    out["bytes_per_token"] = out["shard_bytes"] / n_tok
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
