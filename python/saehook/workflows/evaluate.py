"""SAE quality on the user's own model and text: fraction of variance explained, L0, dead
features, and the loss increase when the residual is replaced by the reconstruction."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import numpy as np

from ..engines import Engine
from ..sae import SAE


def read_texts(path: str) -> List[str]:
    """The texts of a data file, read as `datasets.read_documents` reads it (.txt one document per
    line, .jsonl field "text", .csv column text, .parquet)."""
    from .datasets import read_documents

    return [d["text"] for d in read_documents(path)]


def evaluate(engine: Engine, sae: SAE, layer: int, texts: Iterable[str], *, max_tokens: int = 256,
             progress: Optional[Callable[[int], None]] = None) -> dict:
    """Metrics over all tokens of the texts (each cut to max_tokens):

    fve            1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens
    l0             mean number of active features per token
    dead_fraction  features that never fired on these tokens
    ce_clean, ce_spliced, ce_increase   mean next-token cross-entropy (nats) of the model and of
                   the model with the layer's residual replaced by the SAE reconstruction

    progress(done) is called after each text.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2:
        raise ValueError(f"max_tokens must be a whole number of at least 2 (a next-token loss needs two), got {max_tokens!r}")
    n = 0
    sse = 0.0
    sum_x = np.zeros(sae.d_model)
    sum_sq = 0.0
    active = 0
    fired = np.zeros(sae.d_sae, dtype=bool)
    ce_clean: List[np.ndarray] = []
    ce_spliced: List[np.ndarray] = []
    for done, text in enumerate(texts, 1):
        tokens = engine.tokenize(text)[:max_tokens]
        if progress:
            progress(done)
        if len(tokens) < 2:
            continue
        x = engine.residuals(tokens, layer).astype(np.float64)
        vals, idx = sae.encode(x.astype(np.float32))
        x_hat = sae.decode(vals, idx).astype(np.float64)
        sse += float(((x - x_hat) ** 2).sum())
        sum_x += x.sum(axis=0)
        sum_sq += float((x ** 2).sum())
        n += x.shape[0]
        live = (idx >= 0) & (vals != 0)
        active += int(live.sum())
        fired[idx[live]] = True
        ce_clean.append(engine.token_losses(tokens))
        ce_spliced.append(engine.token_losses(tokens, splice={layer: sae}))
    if n == 0:
        raise ValueError("no text with at least two tokens")
    total_var = sum_sq - float((sum_x ** 2).sum()) / n
    clean, spliced = float(np.concatenate(ce_clean).mean()), float(np.concatenate(ce_spliced).mean())
    return {"layer": layer, "n_tokens": n, "fve": 1.0 - sse / total_var, "l0": active / n,
            "dead_fraction": float(1.0 - fired.mean()), "ce_clean": clean, "ce_spliced": spliced,
            "ce_increase": spliced - clean}
