#!/usr/bin/env python
"""llama.cpp's decode step of N sequences (one generated token each) under the KV layouts and
attention paths a server can choose, measured in alternation: the numbers behind README "Serve"
("Why one unified cache").

    python bench/bench_kv_layout.py                       # bench_serve's synthetic qwen3, 8 x 64 tokens
    python bench/bench_kv_layout.py --context 1024 --rounds 2
    python bench/bench_kv_layout.py --model m.gguf --seqs 4,5,6,7 # a step of sequences 4..7 only

Four contexts over one model: one unified KV cache (what `saehook serve` runs) or one KV stream
per sequence (llama-server's layout), each with plain attention (the server's default) and with
flash attention. Each round fills every context's sequences with --context tokens of random
ids, then times --steps decode steps of one token per sequence; the order of the contexts is
reversed every other round. Prints the median step time per layout, the time relative to the
unified cache with plain attention (median and range over rounds), and the micro-batches
llama.cpp cut one step into. With --seqs ids that are not consecutive, a per-sequence-stream
context cuts the step into one micro-batch per run of consecutive ids (split_equal with
sequential streams), each a pass over the weights; the unified cache takes it in one.
Raw llama-cpp-python calls, no saehook hook, no HTTP: llama.cpp's own cost.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF (default: bench_serve's synthetic qwen3, written once into --cache)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/saehook-bench"))
    ap.add_argument("--parallel", type=int, default=8, help="sequences the contexts hold (n_seq_max)")
    ap.add_argument("--seqs", default=None, help="the sequences each step decodes, e.g. 0,2,4,6 (default: all)")
    ap.add_argument("--context", type=int, default=64, help="tokens in each sequence before the timed steps")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    seqs = list(range(a.parallel)) if a.seqs is None else [int(s) for s in a.seqs.split(",")]
    if not seqs or len(set(seqs)) != len(seqs) or not all(0 <= s < a.parallel for s in seqs):
        raise SystemExit(f"--seqs must be distinct ids in 0..{a.parallel - 1}, got {a.seqs!r}")
    seqs.sort()  # sequential split_equal needs increasing ids (HookedLlama refuses others)
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # as saehook sets it, before libgomp loads
    import llama_cpp

    path = a.model
    if path is None:
        from bench_llama import synthetic_model

        path = synthetic_model(a.cache, 2048, 8, 5632, "Q4_K_M")
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    from saehook.engines.llama import _ggml_api, _resolve_extra_bufts

    mp.use_extra_bufts = _resolve_extra_bufts(None)  # as HookedLlama loads models
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"cannot load {path}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    per_seq = a.context + a.steps + 16
    n_batch = max(512, a.context)

    def context(unified: bool, flash: bool, cb_eval=None):
        cp = llama_cpp.llama_context_default_params()
        if cb_eval is not None:
            cp.cb_eval, cp.cb_eval_user_data = cb_eval, None
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = a.parallel * per_seq, n_batch, 512, a.parallel
        cp.kv_unified, cp.n_threads, cp.n_threads_batch = unified, a.threads, a.threads
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            raise SystemExit("cannot create the context")
        return ctx

    layouts = {"unified cache, plain attention (saehook serve)": (True, False),
               "one stream per sequence, plain attention": (False, False),
               "unified cache, flash attention": (True, True),
               "one stream per sequence, flash attention (llama-server)": (False, True)}
    ctxs = {name: context(*cfg) for name, cfg in layouts.items()}
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    rng = np.random.default_rng(0)

    def put(i, tok, pos, seq, out):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tok, pos, 1, seq, out

    def decode(ctx, n):
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def fill(ctx, context_tokens: int) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        for s in seqs:  # each sequence's context on its own (not timed)
            for i, t in enumerate(rng.integers(1, n_vocab - 1, context_tokens)):
                put(i, int(t), i, s, i == context_tokens - 1)
            decode(ctx, context_tokens)

    def step(ctx, pos: int) -> None:
        for i, s in enumerate(seqs):
            put(i, int(rng.integers(1, n_vocab - 1)), pos, s, True)
        decode(ctx, len(seqs))
        llama_cpp.llama_get_logits_ith(ctx, len(seqs) - 1)

    def round_of(ctx) -> float:
        fill(ctx, a.context)
        ts = []
        for g in range(a.steps):
            t0 = time.perf_counter()
            step(ctx, a.context + g)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    times = {name: [] for name in layouts}
    names = list(layouts)
    for rnd in range(a.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            times[name].append(round_of(ctxs[name]))
    # Micro-batches of one step, counted on contexts of their own (an eval callback slows the
    # timed ones): llama.cpp asks the callback about the first block's output once per micro-batch.
    asked = [0]
    # ggml_get_name of libllama's own ggml, found as the hook finds it
    get_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(_ggml_api().get_name)

    @llama_cpp.ggml_backend_sched_eval_callback
    def count(t, ask, _user):
        if ask and get_name(t) == b"l_out-0":
            asked[0] += 1
        return not ask

    ubatches = {}
    for unified in (True, False):
        ctx = context(unified, False, count)
        fill(ctx, 4)
        asked[0] = 0
        step(ctx, 4)
        ubatches[unified] = asked[0]
        llama_cpp.llama_free(ctx)
    base = np.array(times[names[0]])
    print(f"{os.path.basename(path)}: {len(seqs)} sequences {seqs} of {a.context} tokens, one token each per step, "
          f"{a.threads} threads, {a.rounds} rounds of {a.steps} steps")
    for name in names:
        t = np.array(times[name])
        r = t / base
        print(f"{name:<58} {np.median(t):8.2f} ms per step  vs served {np.median(r):.3f} ({r.min():.3f}-{r.max():.3f})"
              f"  micro-batches per step {ubatches[layouts[name][0]]}  rounds {', '.join(f'{x:.1f}' for x in t)}")
    llama_cpp.llama_batch_free(batch)
    for ctx in ctxs.values():
        llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
