"""The recipe of the demo shipped in saehook/demo/data, one command (about 40 minutes on 2 cores):

    python -m saehook.demo.build --out python/saehook/demo/data

1. The corpus, from the running Python alone (no network): prose = the documentation topics every
   CPython carries (pydoc_data.topics) and the standard library's docstrings of 300+ characters;
   code = the standard library's own .py sources (Lib/ minus tests, idlelib, tkinter, ...), in
   sorted path order. Every tenth document of each kind is held out. demo_model.json records
   the Python version, the file counts and a sha256 of the corpus.
2. A byte-level BPE tokenizer (the `tokenizers` package, extra `demo-build`) trained on the
   training documents, written into the GGUF as llama.cpp's gpt2/qwen2 vocabulary; the build
   checks that llama.cpp tokenizes every held-out document exactly as the trained tokenizer.
3. A tiny Qwen3-architecture causal LM trained on it (torch, half prose and half code windows per
   batch), converted to GGUF Q8_0 (llama.cpp's quantizer).
4. A Top-K SAE trained with saehook's trainer on its layer-LAYER residual stream.
5. The demo's feature and steering, chosen by measurement (choose()): per-feature AUROC of
   "this token is from code" on held-out tokens, then, for the most code-selective features,
   the clamp value that most raises the code-likeness of greedy continuations of prose prompts.

Seeds are fixed and torch runs on --threads threads (default 2). On one machine with the same
package versions a rebuild is bit-exact (the same files); another CPU, thread count or torch
version changes float rounding, so the weights differ slightly and the choice (recorded with its
numbers) may differ while its measured effect stays of the same size.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

LAYER = 2
CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False)
VOCAB_SIZE = 2048
MIN_DOCSTRING = 300
# Lib/ folders left out of the code corpus: tests, GUI and tooling code unlike ordinary Python,
# generated tables (encodings), and the docs themselves (pydoc_data: the prose side).
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip",
             "encodings", "pydoc_data", "__pycache__", "tkinter", "unittest"}
# Prose prompts whose continuations the steering search scores (none is in the corpus verbatim).
PROSE_PROMPTS = ["The with statement is used to", "A list is a sequence of", "When the interpreter starts, it",
                 "This module provides a way to", "The value of the expression is", "In this section we describe",
                 "Exceptions are raised when", "Each object has an identity, a type and"]


def corpus() -> List[Tuple[str, str, str]]:
    """(kind, source, text) documents, kind "prose" or "code", in a fixed order: the pydoc topics
    (sorted), then per standard-library file (sorted paths) its docstrings of MIN_DOCSTRING+
    characters as prose and the file itself as code. Files that are not UTF-8 Python are skipped."""
    import pydoc_data.topics

    docs = [("prose", f"pydoc_data.topics[{k!r}]", pydoc_data.topics.topics[k]) for k in sorted(pydoc_data.topics.topics)]
    lib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, lib)
            try:
                with open(path, encoding="utf-8") as f:
                    src = f.read()
                tree = ast.parse(src)
            except (UnicodeDecodeError, SyntaxError, ValueError):
                continue
            for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                              ast.ClassDef))]:
                d = ast.get_docstring(node, clean=True)
                if d and len(d) >= MIN_DOCSTRING:
                    docs.append(("prose", f"{rel}:{getattr(node, 'lineno', 1)} docstring", d))
            docs.append(("code", rel, src))
    return docs


def split(docs):
    """Every tenth document of each kind is held out: (train, held_out)."""
    seen: Dict[str, int] = {}
    train, held = [], []
    for d in docs:
        i = seen[d[0]] = seen.get(d[0], -1) + 1
        (held if i % 10 == 0 else train).append(d)
    return train, held


def corpus_facts(docs) -> dict:
    h = hashlib.sha256()
    for kind, src, text in docs:
        h.update(f"{kind}\0{src}\0".encode())
        h.update(text.encode("utf-8"))
    kinds = {k: {"documents": sum(1 for d in docs if d[0] == k), "characters": sum(len(d[2]) for d in docs if d[0] == k)}
             for k in ("prose", "code")}
    return {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"], "sha256": h.hexdigest(),
            "prose": "pydoc_data.topics + standard-library docstrings of %d+ characters" % MIN_DOCSTRING,
            "code": "standard-library .py files (skipping %s)" % ", ".join(sorted(SKIP_DIRS)), **kinds,
            "held_out": "every 10th document of each kind"}


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (the `tokenizers` package) with llama.cpp's qwen2 split."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise SystemExit("the demo recipe trains its tokenizer with the `tokenizers` package: "
                         "pip install 'saehook[demo-build]'") from None
    from .gguf_writer import EOS, pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def check_tokenization(gguf_path: str, vocab, texts) -> int:
    """llama.cpp's ids for each text equal the trained tokenizer's (else the build stops)."""
    import llama_cpp

    llm = llama_cpp.Llama(gguf_path, vocab_only=True, verbose=False)
    hf = vocab.hf_tokenizer()
    n = 0
    for t in texts:
        a = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        b = hf.encode(t, add_special_tokens=False, split_special_tokens=True)  # as special=False
        if a != b:
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise SystemExit(f"llama.cpp tokenizes {t[:60]!r}... differently from the trained tokenizer at token {i}: "
                             f"{a[i:i + 5]} vs {b[i:i + 5]}")
        n += len(a)
    return n


def code_log_odds(train_ids: Dict[str, List[np.ndarray]], vocab_size: int) -> np.ndarray:
    """Per token id: log P(token | code) - log P(token | prose), unigram counts over the training
    split with add-one smoothing. A text's code-likeness (demo.code_likeness) is their mean."""
    c = {k: np.bincount(np.concatenate(v), minlength=vocab_size).astype(np.float64) + 1 for k, v in train_ids.items()}
    return np.log(c["code"] / c["code"].sum()) - np.log(c["prose"] / c["prose"].sum())


def auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per column, P(a positive row's value > a negative row's) + P(equal) / 2 (ties at zero are
    most rows of a sparse code)."""
    out = np.empty(pos.shape[1])
    for j in range(pos.shape[1]):
        n = np.sort(neg[:, j])
        lo = np.searchsorted(n, pos[:, j], "left")
        hi = np.searchsorted(n, pos[:, j], "right")
        out[j] = (lo.sum() + 0.5 * (hi - lo).sum()) / (len(pos) * len(n))
    return out


def code_precision(code: np.ndarray, prose: np.ndarray):
    """Per feature: P(code | fires) with both kinds weighted equally, and its firing rate on code."""
    rc, rp = (code > 0).mean(0), (prose > 0).mean(0)
    return rc / np.maximum(rc + rp, 1e-12), rc


def dense_codes(eng, sae, ids: List[int], chunk: int = 256) -> np.ndarray:
    """(n_tokens, d_sae) float32 activations at sae.layer, through llama.cpp (the shipped model)."""
    out = np.zeros((len(ids), sae.d_sae), np.float32)
    for s in range(0, len(ids), chunk):
        _, vals, idx = eng.features(ids[s:s + chunk], {sae.layer: sae})[sae.layer]
        rows = np.arange(len(vals))[:, None].repeat(vals.shape[1], 1)
        ok = idx >= 0
        out[s + rows[ok], idx[ok]] = vals[ok]
    return out


def choose(model_path: str, sae, held, log_odds: np.ndarray, *, n_candidates: int = 8,
           multiples=(1.0, 2.0, 4.0, 8.0), max_tokens: int = 32, tokens_per_kind: int = 30_000) -> dict:
    """The demo's feature and steering, by measurement:
    1. on held-out tokens (up to tokens_per_kind of each kind, documents in order, cut to
       256-token chunks), each feature's code precision: P(code | the feature fires) with the
       two kinds weighted equally, among features that fire on at least 1% of code tokens (a
       Top-K feature is silent on most tokens, so its AUROC, also recorded, stays near 0.5 even
       when it fires on code alone);
    2. for the n_candidates most code-precise features, clamps at `multiples` of the feature's
       99th-percentile activation on held-out code tokens (where it fires): greedy continuations
       (max_tokens) of PROSE_PROMPTS with and without the clamp, scored by code-likeness (mean
       code_log_odds of the continuation's tokens). A setting whose continuations are degenerate
       (distinct tokens per token below 0.3, or below 3/4 of the clean continuations' own ratio
       when that is lower) is not eligible.
    The chosen (feature, value) is the eligible one with the largest mean gain in code-likeness."""
    from . import code_likeness
    from ..engines import LlamaEngine
    from ..steering import Steering

    eng = LlamaEngine(model_path, n_ctx=512)
    codes = {}
    for kind in ("code", "prose"):
        ids: List[int] = []
        for k, _, text in held:
            if k == kind and len(ids) < tokens_per_kind:
                ids += eng.tokenize(text)[:1024]
        codes[kind] = dense_codes(eng, sae, ids[:tokens_per_kind])
    au = auroc(codes["code"], codes["prose"])
    precision, rate = code_precision(codes["code"], codes["prose"])
    ranked = [int(f) for f in np.lexsort((-rate, -precision)) if rate[f] >= 0.01]
    cands = ranked[:n_candidates]
    llm = eng.llm
    prompts = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in PROSE_PROMPTS]

    def continuations(steering=None):
        outs = []
        for ids in prompts:
            outs.append(eng.generate(ids, max_tokens, [steering] if steering else []))
        return outs

    def score(outs):
        cl = [code_likeness(o, log_odds) for o in outs]
        distinct = [len(set(o)) / max(1, len(o)) for o in outs]
        return float(np.mean(cl)), float(np.mean(distinct))

    clean = continuations()
    base, base_distinct = score(clean)
    min_distinct = min(0.3, 0.75 * base_distinct)
    trials = []
    for f in cands:
        act = codes["code"][:, f]
        p99 = float(np.percentile(act[act > 0], 99)) if (act > 0).any() else 1.0
        for m in multiples:
            v = round(m * p99, 2)
            outs = continuations(Steering(sae, layer=sae.layer).clamp(f, v))
            cl, distinct = score(outs)
            trials.append({"feature": f, "code_precision": round(float(precision[f]), 4),
                           "fires_on_code": round(float(rate[f]), 4), "auroc": round(float(au[f]), 4), "value": v, "multiple_of_p99": m,
                           "code_likeness": round(cl, 4), "gain": round(cl - base, 4), "distinct": round(distinct, 3),
                           "eligible": distinct >= min_distinct})
            print(json.dumps(trials[-1]), flush=True)
    eligible = [t for t in trials if t["eligible"]]
    if not eligible:
        raise SystemExit(f"no clamp of the {n_candidates} most code-selective features keeps its continuations "
                         f"varied (distinct >= {min_distinct:.2f}); see the trials above")
    best = max(eligible, key=lambda t: t["gain"])
    return {"auroc_tokens": {k: int(len(v)) for k, v in codes.items()}, "candidates": cands,
            "top_code_precision": [[int(f), round(float(precision[f]), 4), round(float(rate[f]), 4)] for f in cands],
            "top_auroc": [[int(f), round(float(au[f]), 4)] for f in np.argsort(-au, kind="stable")[:n_candidates]],
            "clean_code_likeness": round(base, 4), "clean_distinct": round(base_distinct, 3),
            "min_distinct": round(min_distinct, 3),
            "prompts": PROSE_PROMPTS, "max_tokens": max_tokens, "trials": trials,
            "feature": best["feature"], "value": best["value"], "auroc": best["auroc"], "gain": best["gain"],
            "code_precision": best["code_precision"], "fires_on_code": best["fires_on_code"],
            "steered_code_likeness": best["code_likeness"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sae-steps", type=int, default=2000)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--from-model", metavar="DIR",
                   help="skip the LM training: use the transformers model (and curve.json) a run kept in "
                        "OUT/lm (--keep-lm), e.g. to redo the SAE and the choice")
    p.add_argument("--keep-lm", action="store_true", help="keep the trained LM in OUT/lm (not shipped)")
    p.add_argument("--reuse-sae", action="store_true",
                   help="with --from-model: keep OUT's demo-sae.safetensors, redo only the measurements and the choice")
    args = p.parse_args(argv)

    import torch
    import transformers

    from . import gguf_writer
    from ..engines import HFEngine
    from ..workflows.evaluate import evaluate
    from ..workflows.train import shuffled_batches, train_sae

    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    docs = corpus()
    facts = corpus_facts(docs)
    print(json.dumps(facts), flush=True)
    train, held = split(docs)
    tok = train_tokenizer([d[2] for d in train], args.vocab)
    vocab = gguf_writer.Vocabulary.from_tokenizer(tok)
    def encode(part):
        enc = [np.asarray(e.ids, np.int64) for e in tok.encode_batch([d[2] for d in part])]
        return {kind: [x for x, d in zip(enc, part) if d[0] == kind] for kind in ("prose", "code")}

    ids, held_ids = encode(train), encode(held)
    eos = vocab.eos
    stream = {k: np.concatenate([np.append(x, eos) for x in v]) for k, v in ids.items()}
    val_stream = {k: np.concatenate([np.append(x, eos) for x in v]) for k, v in held_ids.items()}
    print(json.dumps({"tokens": {k: len(v) for k, v in stream.items()},
                      "held_out_tokens": {k: len(v) for k, v in val_stream.items()}}), flush=True)

    cfg = transformers.Qwen3Config(vocab_size=len(vocab.tokens), eos_token_id=eos, bos_token_id=eos, **CONFIG)
    model = transformers.Qwen3ForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the vocabulary check, before any training
        gguf_writer.write_hf_model(model, os.path.join(tmp, "tok.gguf"), vocab)
        n_checked = check_tokenization(os.path.join(tmp, "tok.gguf"), vocab, [d[2] for d in held])
    print(json.dumps({"llama_cpp_tokenization_checked_tokens": n_checked}), flush=True)

    rng = np.random.default_rng(args.seed)
    if args.from_model:
        model = transformers.Qwen3ForCausalLM.from_pretrained(args.from_model, local_files_only=True)
        with open(os.path.join(args.from_model, "curve.json")) as f:
            curve = json.load(f)
        args.steps = 0
    else:
        curve = []
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(1, args.steps), pct_start=0.05)

    def windows(s, n):
        starts = rng.integers(0, len(s) - args.seq - 1, n)
        return np.stack([s[a:a + args.seq] for a in starts])

    def batch(streams):  # half prose, half code
        h = args.batch // 2
        return torch.as_tensor(np.concatenate([windows(streams["prose"], h), windows(streams["code"], args.batch - h)]))

    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x = batch(stream)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val = {k: float(np.mean([model(v, labels=v).loss.item() for v in
                                         (torch.as_tensor(windows(val_stream[k], 8)) for _ in range(4))]))
                       for k in ("prose", "code")}
            model.train()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss_prose": round(val["prose"], 4),
                          "val_loss_code": round(val["code"], 4), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
    model.eval()
    f32 = os.path.join(args.out, "demo-f32.gguf")
    model_path = os.path.join(args.out, "demo-model-Q8_0.gguf")
    gguf_writer.write_hf_model(model, f32, vocab)
    gguf_writer.quantize(f32, model_path, "Q8_0")
    os.remove(f32)
    hf_dir = os.path.join(args.out, "lm") if args.keep_lm else tempfile.mkdtemp()
    model.save_pretrained(hf_dir)
    vocab.hf_tokenizer().save_pretrained(hf_dir)  # HFEngine (evaluate) tokenizes text with it
    with open(os.path.join(hf_dir, "curve.json"), "w") as f:
        json.dump(curve, f)

    # The SAE, trained on the residual stream after block LAYER with saehook's trainer: rows of
    # 256-token windows, alternately prose and code.
    eng = HFEngine(hf_dir)
    t_sae = time.time()

    def rows():
        r = np.random.default_rng(args.seed + 1)
        while True:
            for k in ("prose", "code"):
                a = int(r.integers(0, len(stream[k]) - 257))
                yield eng.residuals(stream[k][a:a + 256].tolist(), LAYER)

    sae_path = os.path.join(args.out, "demo-sae.safetensors")
    if args.reuse_sae:
        from .. import load

        sae = load(sae_path)
    else:
        sae = train_sae(shuffled_batches(rows(), 256, seed=args.seed), CONFIG["hidden_size"], args.d_sae, args.k,
                        steps=args.sae_steps, lr=1e-3, seed=args.seed, dead_tokens=200_000,
                        metadata={"layer": LAYER, "hook_point": "resid_post", "model": "saehook-demo-qwen3"})
        sae.save(sae_path)
    metrics = evaluate(eng, sae, LAYER, [d[2] for d in held], max_tokens=256)
    metrics["seconds"] = round(time.time() - t_sae, 1)
    print(json.dumps(metrics), flush=True)

    from . import build_feature_labels

    log_odds = code_log_odds(ids, len(vocab.tokens))
    choice = choose(model_path, sae, held, log_odds)
    print(json.dumps({k: choice[k] for k in ("feature", "value", "code_precision", "auroc", "gain", "clean_code_likeness",
                                             "steered_code_likeness")}), flush=True)
    build_feature_labels(os.path.join(args.out, "demo-features.json"), model_path=model_path, sae_path=sae_path,
                         docs=[d[2] for d in train], choice=choice, log_odds=log_odds)
    with open(os.path.join(args.out, "demo_model.json"), "w") as f:
        json.dump({"config": CONFIG, "vocab_size": len(vocab.tokens), "tokenizer": "byte-level BPE (tokenizers "
                   "BpeTrainer, min_frequency 2) on the training documents; llama.cpp gpt2/qwen2 vocabulary",
                   "llama_cpp_tokenization_checked_tokens": n_checked, "seed": args.seed, "threads": args.threads,
                   "steps": curve[-1]["step"] if curve else 0, "seq": args.seq, "batch": args.batch, "corpus": facts,
                   "tokens": {k: int(len(v)) for k, v in stream.items()}, "loss_curve": curve,
                   "sae": {"layer": LAYER, "d_sae": args.d_sae, "k": args.k, "steps": args.sae_steps,
                           "held_out_metrics": metrics},
                   "choice": {k: v for k, v in choice.items()},
                   "build_seconds": round(time.time() - t_start, 1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
