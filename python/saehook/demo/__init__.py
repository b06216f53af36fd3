"""`saehook demo`: find interpretable features in a real (tiny) language model and steer it,
offline, in seconds.

The package ships (saehook/demo/data, built by `python -m saehook.demo.build`) a 4-layer
Qwen3-architecture model trained on CPython's own documentation, as a Q8_0 GGUF run by
llama.cpp, a Top-K SAE trained on its layer-2 residual stream, and demo-features.json: every
feature's top-activating tokens and a context, from which each feature gets its label.
`hf_model_dir()` builds a transformers copy of the model at first use (`saehook demo --paths`).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List, Optional

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
    dequantized to float32, about 3.5 MB, a few seconds) into cache_dir(); the directory name
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


def build_feature_labels(out: str = LABELS, max_docs: Optional[int] = None, candidates: int = 80) -> dict:
    """Per feature, over the training topics: the tokens it fires on (its label), the tokens
    that follow where it fires, its largest activation and a context. Then the steering demo's
    feature: among the frequent ones, the one whose clamp most raises the probability of the
    tokens that follow it, measured on the demo prompt."""
    from .. import load
    from .build import corpus
    from ..engines import LlamaEngine
    from ..steering import Steering

    sae = load(SAE_FILE)
    eng = LlamaEngine(MODEL, n_ctx=512, logits_all=True)  # every row, the last layer's included
    on: Dict[int, Counter] = {}
    after: Dict[int, Counter] = {}
    best: Dict[int, tuple] = {}
    docs = [d for i, d in enumerate(corpus()) if i % 10 != 0][:max_docs]
    for doc in docs:
        ids = eng.tokenize(doc)
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
    for f, c in on.items():
        total = sum(c.values())
        nxt = after.get(f, Counter())
        features[str(f)] = {"top_tokens": [[t, round(w / total, 3)] for t, w in c.most_common(5)],
                            "next_tokens": [[int(t), eng.token_text(t), round(w / max(1e-9, sum(nxt.values())), 3)]
                                            for t, w in nxt.most_common(3)],
                            "max": round(best[f][0], 3), "context": best[f][1], "mass": round(total, 2)}
    llm = eng.llm
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    trials = []
    for f in sorted(features, key=lambda f: -features[f]["mass"])[:candidates]:
        e = features[f]
        if not e["next_tokens"]:
            continue
        targets = [e["next_tokens"][0][0]]
        p0 = target_probability(llm, ids, targets)
        with llm.steer(Steering(sae, layer=sae.layer).clamp(int(f), 2.0 * e["max"])):
            p1 = target_probability(llm, ids, targets)
        trials.append((p1 - p0, int(f), targets, p0, p1))
    gain, demo, targets, p0, p1 = max(trials)
    res = {"layer": sae.layer, "features": features, "demo_feature": demo, "demo_targets": targets,
           "demo_effect": {"p_clean": p0, "p_steered": p1}}
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


def target_probability(llm, prompt_ids: List[int], targets: List[int]) -> float:
    """Mean probability, over the prompt's positions, that the next token is one of `targets`."""
    llm.reset()
    llm.eval(prompt_ids)
    logits = np.asarray(llm.scores[: len(prompt_ids)], dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(p[:, targets].sum(1).mean())


def run(prompt: str = PROMPT, max_tokens: int = 40, strength: Optional[float] = None) -> dict:
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
    llm = HookedLlama(MODEL, n_ctx=512, logits_all=True, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)

    print(f"model: {os.path.basename(MODEL)} (4 layers, trained on CPython's docs); SAE: {sae.d_sae} features, "
          f"k={sae.k}, layer {sae.layer}\n\ntop features per token of {prompt!r}:")
    with llm.capture({sae.layer: sae}) as rec:
        llm.eval(ids)
    r = rec[sae.layer]
    for t, vals, idx in zip(r.tokens, r.values, r.indices):
        tops = ", ".join(f"#{f} {label(info, f)} ({v:.1f})" for v, f in zip(vals[:3], idx[:3]) if f >= 0)
        print(f"  {_show(llm.detokenize([int(t)]).decode(errors='replace'))!r:>8}  {tops}")

    f = info["demo_feature"]
    entry = info["features"][str(f)]
    strength = strength if strength is not None else 2.0 * entry["max"]
    targets = info["demo_targets"]
    shown = [llm.detokenize([t]).decode(errors="replace") for t in targets]
    steering = Steering(sae, layer=sae.layer).clamp(f, strength)

    def generate():
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, temp=0.0):
            if tok == llm.token_eos() or len(out) >= max_tokens:
                break
            out.append(tok)
        return llm.detokenize(out).decode(errors="replace")

    clean = generate()
    p_clean = target_probability(llm, ids, targets)
    with llm.steer(steering):
        steered = generate()
        p_steer = target_probability(llm, ids, targets)
    print(f"\nfeature #{f}: {label(info, f)} (e.g. {entry['context']!r}); clamp it to {strength:.1f} at every token:")
    print(f"  p(next token is {' or '.join(map(repr, shown))}) clean {p_clean:.3f} -> steered {p_steer:.3f}")
    print(f"  clean:   {_show(prompt + clean)}")
    print(f"  steered: {_show(prompt + steered)}")
    return {"feature": f, "p_clean": p_clean, "p_steered": p_steer, "clean": clean, "steered": steered}
