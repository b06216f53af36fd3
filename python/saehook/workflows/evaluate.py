"""SAE quality on the user's own model and text: fraction of variance explained, L0, dead
features, and the loss increase when the residual is replaced by the reconstruction."""
from __future__ import annotations

import json
from typing import Iterable, List

import numpy as np

from ..engines import Engine
from ..sae import SAE


def read_texts(path: str) -> List[str]:
    """Documents of a .txt (one per non-empty line) or .jsonl (field "text") file."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
            else:
                docs.append(line)
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def evaluate(engine: Engine, sae: SAE, layer: int, texts: Iterable[str], *, max_tokens: int = 256) -> dict:
    """Metrics over all tokens of the texts (each cut to max_tokens):

    fve            1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens
    l0             mean number of active features per token
    dead_fraction  features that never fired on these tokens
    ce_clean, ce_spliced, ce_increase   mean next-token cross-entropy (nats) of the model and of
                   the model with the layer's residual replaced by the SAE reconstruction
    """
    n = 0
    sse = 0.0
    sum_x = np.zeros(sae.d_model)
    sum_sq = 0.0
    active = 0
    fired = np.zeros(sae.d_sae, dtype=bool)
    ce_clean: List[np.ndarray] = []
    ce_spliced: List[np.ndarray] = []
    for text in texts:
        tokens = engine.tokenize(text)[:max_tokens]
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
