"""`saehook demo`: find interpretable features in a real (tiny) language model and steer it,
offline, in seconds.

The package ships (saehook/demo/data, built by `python -m saehook.demo.build`) a 4-layer
Qwen3-architecture model with its own 2048-token BPE vocabulary, trained on prose (CPython's
documentation and docstrings) and code (the standard library's sources), as a Q8_0 GGUF run by
llama.cpp; a Top-K SAE trained on its layer-2 residual stream; and demo-features.json: every
feature's top-activating tokens and a context (its label), the demo's code feature (chosen by
measurement, see build.choose) with its clamp value, and the statistics code_likeness scores with.
`hf_model_dir()` builds a transformers copy of the model at first use (`saehook demo --paths`).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, Optional

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data")
MODEL = os.path.join(DATA, "demo-model-Q8_0.gguf")
SAE_FILE = os.path.join(DATA, "demo-sae.safetensors")
LABELS = os.path.join(DATA, "demo-features.json")
PROMPT = "The with statement is used to"


def cache_dir() -> str:
    """Where files built at first use go: $SAEHOOK_CACHE, else $XDG_CACHE_HOME/saehook, else ~/.cache/saehook."""
    root = os.environ.get("SAEHOOK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "saehook")
    return root


def hf_model_dir() -> str:
    """A transformers copy of the demo model (config, weights, tokenizer), for `--engine hf` and the
    transformers examples, offline. Built at first use from the shipped GGUF (Q8_0 weights
    dequantized to float32, about 6 MB, a few seconds) into cache_dir(); the directory name
    carries a hash of the GGUF, so a rebuilt demo gets a new copy."""
    import hashlib

    with open(MODEL, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(cache_dir(), f"demo-model-hf-{tag}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import tempfile

    from .gguf_writer import read_hf_model

    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-model-hf-", dir=cache_dir())
    read_hf_model(MODEL, tmp)
    try:
        os.rename(tmp, out)  # atomic: a concurrent first use finds a whole directory or none
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _show(text: str) -> str:
    return text.replace("\n", "\\n")


def code_likeness(ids, log_odds) -> float:
    """How much a token sequence looks like the demo corpus' code rather than its prose: the mean,
    over its tokens, of log P(token | code) - log P(token | prose) (unigram statistics of the
    training split, shipped in demo-features.json as code_log_odds). Above 0: more code-like."""
    ids = np.asarray(list(ids), dtype=np.int64)
    return float(np.asarray(log_odds, dtype=np.float64)[ids].mean()) if len(ids) else 0.0


def build_feature_labels(out: str = LABELS, *, model_path: str = MODEL, sae_path: str = SAE_FILE, docs=None,
                         choice: dict, log_odds, max_tokens: int = 200_000) -> dict:
    """demo-features.json: per feature, over training documents (every fifth one, up to max_tokens
    tokens): the tokens it fires on (its label), the tokens that follow where it fires, its largest
    activation and a context; the demo's feature and clamp value (`choice`, from build.choose) and
    the code_log_odds that code_likeness scores with."""
    from .. import load
    from ..engines import LlamaEngine

    sae = load(sae_path)
    eng = LlamaEngine(model_path, n_ctx=512)
    on: Dict[int, Counter] = {}
    after: Dict[int, Counter] = {}
    best: Dict[int, tuple] = {}
    seen = 0
    for doc in list(docs)[::5]:
        if seen >= max_tokens:
            break
        ids = eng.tokenize(doc)[: max_tokens - seen]
        seen += len(ids)
        for s in range(0, len(ids), 256):
            chunk = ids[s:s + 256]
            _, vals, idx = eng.features(chunk, {sae.layer: sae})[sae.layer]
            texts = [eng.token_text(t) for t in chunk]
            for r in range(len(chunk)):
                for v, f in zip(vals[r].tolist(), idx[r].tolist()):
                    if f < 0 or v <= 0:
                        continue
                    on.setdefault(f, Counter())[texts[r]] += v
                    if r + 1 < len(chunk):
                        after.setdefault(f, Counter())[chunk[r + 1]] += v
                    if v > best.get(f, (0.0, ""))[0]:
                        best[f] = (v, "".join(texts[max(0, r - 8): r]) + "[" + texts[r] + "]" + "".join(texts[r + 1: r + 4]))
    features = {}
    for f in sorted(on):
        c = on[f]
        total = sum(c.values())
        nxt = after.get(f, Counter())
        features[str(f)] = {"top_tokens": [[t, round(w / total, 3)] for t, w in c.most_common(5)],
                            "next_tokens": [[int(t), eng.token_text(t), round(w / max(1e-9, sum(nxt.values())), 3)]
                                            for t, w in nxt.most_common(3)],
                            "max": round(best[f][0], 3), "context": best[f][1], "mass": round(total, 2)}
    res = {"layer": sae.layer, "n_tokens": seen, "features": features, "demo_feature": choice["feature"],
           "demo_value": choice["value"], "demo_auroc": choice["auroc"], "demo_code_precision": choice["code_precision"],
           "demo_fires_on_code": choice["fires_on_code"],
           "demo_effect": {"clean_code_likeness": choice["clean_code_likeness"],
                           "steered_code_likeness": choice["steered_code_likeness"], "prompts": choice["prompts"],
                           "max_tokens": choice["max_tokens"]},
           "code_log_odds": [round(float(x), 3) for x in log_odds]}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    return res


def label(info: dict, f: int) -> str:
    """'on <tokens it fires on> -> <tokens that follow>'."""
    entry = info["features"].get(str(f))
    if not entry:
        return "(never seen)"
    on = " ".join(repr(t) for t, _ in entry["top_tokens"][:2])
    nxt = " ".join(repr(t) for _, t, _ in entry["next_tokens"][:2])
    return f"on {on} -> {nxt}"


def run(prompt: str = PROMPT, max_tokens: int = 40, strength: Optional[float] = None) -> dict:
    """Prints the prompt's top features per token, then the demo's code feature (chosen at build
    time by its code-vs-prose AUROC and its steering effect) and greedy continuations without and
    with it clamped to `strength` (default: the value chosen at build time) at every token."""
    from .. import load
    from ..engines.llama import HookedLlama
    from ..steering import Steering

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the demo needs a prompt with some text (--prompt)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens (--max-new-tokens) must be at least 1, got {max_tokens!r}")
    if strength is not None and not np.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    for path in (MODEL, SAE_FILE, LABELS):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: rebuild with python -m saehook.demo.build (see its doc)")
    with open(LABELS, encoding="utf-8") as fh:
        info = json.load(fh)
    sae = load(SAE_FILE)
    llm = HookedLlama(MODEL, n_ctx=512, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)

    print(f"model: {os.path.basename(MODEL)} (4 layers, {llm.n_vocab()}-token BPE, trained on CPython's docs and "
          f"standard library); SAE: {sae.d_sae} features, k={sae.k}, layer {sae.layer}\n\n"
          f"top features per token of {prompt!r}:")
    with llm.capture({sae.layer: sae}) as rec:
        llm.eval(ids)
    r = rec[sae.layer]
    for t, vals, idx in zip(r.tokens, r.values, r.indices):
        tops = ", ".join(f"#{f} {label(info, f)} ({v:.1f})" for v, f in zip(vals[:3], idx[:3]) if f >= 0)
        print(f"  {_show(llm.detokenize([int(t)]).decode(errors='replace'))!r:>10}  {tops}")

    f = info["demo_feature"]
    entry = info["features"][str(f)]
    strength = strength if strength is not None else info["demo_value"]
    steering = Steering(sae, layer=sae.layer).clamp(f, strength)

    def generate():
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, temp=0.0):
            if tok == llm.token_eos() or len(out) >= max_tokens:
                break
            out.append(tok)
        return out

    clean = generate()
    with llm.steer(steering):
        steered = generate()
    odds = info["code_log_odds"]
    c0, c1 = code_likeness(clean, odds), code_likeness(steered, odds)
    text = lambda t: llm.detokenize(t).decode(errors="replace")  # noqa: E731
    print(f"\nfeature #{f}, the code feature: on held-out text it fires on {100 * info['demo_fires_on_code']:.0f}% of "
          f"code tokens, and {100 * info['demo_code_precision']:.0f}% of its firings are in code (prose and code weighted "
          f"equally; {label(info, f)}, e.g. {entry['context']!r}).\nClamp it to {strength:g} at every token:")
    print(f"  code-likeness of the continuation (mean log-odds code vs prose per token): clean {c0:+.2f} -> "
          f"steered {c1:+.2f}")
    print(f"  clean:   {_show(prompt + text(clean))}")
    print(f"  steered: {_show(prompt + text(steered))}")
    return {"feature": f, "value": strength, "code_precision": info["demo_code_precision"], "code_likeness_clean": c0,
            "code_likeness_steered": c1, "clean": text(clean), "steered": text(steered)}
