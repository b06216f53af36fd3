"""Finding features: by label text (BM25), by example text against a contrast (activations), and
by decoder direction (cosine)."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .store import LabelStore, _as_f32

BM25_K1 = 1.2
BM25_B = 0.75


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def search_labels(store: LabelStore, query: str, *, top: int = 20) -> List[Dict[str, Any]]:
    """Features ranked by Okapi BM25 of their label against the query (k1=1.2, b=0.75, Lucene's
    idf ln(1 + (N - n + 0.5) / (n + 0.5))). Words are lowercase runs of letters, digits and _;
    no stemming. Only labels sharing a word with the query are returned, best first (ties:
    lower feature first). Cost: one pass over all labels per call."""
    q = set(_words(query))
    if not q:
        return []
    docs = {f: _words(store[f].label) for f in store}
    n_docs = len(docs)
    if not n_docs:
        return []
    avg = sum(len(w) for w in docs.values()) / n_docs or 1.0
    df = Counter(w for words in docs.values() for w in set(words) if w in q)
    idf = {w: math.log(1.0 + (n_docs - df[w] + 0.5) / (df[w] + 0.5)) for w in df}
    hits = []
    for f, words in docs.items():
        tf = Counter(w for w in words if w in idf)
        if not tf:
            continue
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(words) / avg)
        s = sum(idf[w] * c * (BM25_K1 + 1) / (c + norm) for w, c in tf.items())
        hits.append((-s, f))
    hits.sort()
    return [{"feature": f, "label": store[f].label, "score": -s} for s, f in hits[:top]]


def mean_activations(engine, sae, texts: Sequence[str], *, max_tokens: int = 512) -> tuple:
    """(mean activation of every feature over all tokens of the texts (d_sae,), max (d_sae,),
    number of tokens). Features outside a token's Top-K count as 0 there."""
    total = np.zeros(sae.d_sae, np.float64)
    peak = np.zeros(sae.d_sae, np.float32)
    n = 0
    for text in texts:
        tokens = engine.tokenize(text)[:max_tokens]
        if not tokens:
            continue
        _, vals, idx = engine.features(tokens, {sae.layer: sae})[sae.layer]
        keep = idx >= 0
        np.add.at(total, idx[keep], vals[keep])
        np.maximum.at(peak, idx[keep], vals[keep])
        n += idx.shape[0]
    if n == 0:
        raise ValueError("the texts have no tokens")
    return (total / n).astype(np.float32), peak, n


def search_by_example(engine, sae, example: str, *, against: Optional[Sequence[str]] = None, top: int = 20,
                      max_tokens: int = 512) -> List[Dict[str, Any]]:
    """Features ranked by how much more they fire on `example` than on the contrast texts
    `against`: score = mean activation over the example's tokens - mean over the contrast's
    tokens (features outside a token's Top-K count as 0). Without a contrast the score is the
    example's mean activation. Features that never fire on the example are not returned."""
    mean_x, max_x, n_x = mean_activations(engine, sae, [example], max_tokens=max_tokens)
    if against:
        mean_c, _, _ = mean_activations(engine, sae, against, max_tokens=max_tokens)
    else:
        mean_c = np.zeros_like(mean_x)
    score = mean_x - mean_c
    fired = np.flatnonzero(max_x > 0)
    order = fired[np.lexsort((fired, -score[fired]))][:top]
    store = sae.labels
    return [{"feature": int(f), "score": float(score[f]), "example_mean": float(mean_x[f]),
             "contrast_mean": float(mean_c[f]), "example_max": float(max_x[f]), "label": store.label(int(f))}
            for f in order]


def _decoder_rows(sae, start: int, stop: int) -> np.ndarray:
    """Decoder directions [start, stop) as float32 (stop - start, d_model): a copy of that chunk
    only (bf16/f16 widened), read from the weights in place (mmapped files stay mmapped)."""
    W = sae.arrays()["W_dec"]
    return _as_f32(W[start:stop] if sae.dec_layout == "rows" else W[:, start:stop].T, sae.dec_dtype)


def similar_features(sae, feature: int, *, top: int = 10, chunk: int = 2048) -> List[Dict[str, Any]]:
    """Features whose decoder directions have the largest cosine with `feature`'s (itself left
    out), best first. Reads W_dec in chunks of `chunk` features: extra memory chunk * d_model *
    4 bytes (32 MiB at d_model 4096), never a copy of the whole decoder."""
    f = int(feature)
    if not 0 <= f < sae.d_sae:
        raise IndexError(f"feature {f} is out of range [0, {sae.d_sae})")
    d = sae.decoder_direction(f, normalize=True).astype(np.float32)
    best_s = np.empty(0, np.float32)
    best_i = np.empty(0, np.int64)
    for start in range(0, sae.d_sae, chunk):
        stop = min(sae.d_sae, start + chunk)
        rows = _decoder_rows(sae, start, stop)
        norms = np.linalg.norm(rows, axis=1)
        cos = (rows @ d) / np.where(norms > 0, norms, 1.0)
        cos[norms == 0] = 0.0
        ids = np.arange(start, stop)
        if start <= f < stop:
            cos[f - start] = -np.inf
        s = np.concatenate([best_s, cos])
        i = np.concatenate([best_i, ids])
        keep = np.lexsort((i, -s))[:top]
        best_s, best_i = s[keep], i[keep]
    store = sae.labels
    return [{"feature": int(i), "cosine": float(s), "label": store.label(int(i))}
            for s, i in zip(best_s, best_i) if np.isfinite(s)]
