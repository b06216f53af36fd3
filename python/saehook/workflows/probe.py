"""Classifying documents with SAE features (a linear probe on pooled activations) and scoring
texts by features (for filtering SFT data, or as a reward function for TRL's trainers)."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from .datasets import FeatureData
from ..engines import Engine
from ..sae import SAE


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LinearProbe:
    """Multinomial logistic regression on each document's mean feature activations."""

    def __init__(self, W: np.ndarray, b: np.ndarray, classes: Sequence[str], scale: np.ndarray, layer: int):
        self.W, self.b, self.classes, self.scale, self.layer = W, b, list(classes), scale, layer

    @classmethod
    def fit(cls, X: np.ndarray, y: Sequence[str], layer: int, *, l2: float = 1e-3, steps: int = 500,
            lr: float = 0.5) -> "LinearProbe":
        classes = sorted(set(y))
        if len(classes) < 2:
            raise ValueError("training needs documents of at least two labels")
        Y = np.zeros((len(y), len(classes)))
        Y[np.arange(len(y)), [classes.index(v) for v in y]] = 1
        scale = X.max(axis=0) + 1e-6  # features in [0, 1]: one step size fits all
        Xs = X / scale
        W = np.zeros((len(classes), X.shape[1]))
        b = np.zeros(len(classes))
        for _ in range(steps):  # full-batch gradient descent: the problem is convex and small
            P = _softmax(Xs @ W.T + b)
            G = (P - Y) / len(y)
            W -= lr * (G.T @ Xs + l2 * W)
            b -= lr * G.sum(axis=0)
        return cls(W, b, classes, scale, layer)

    def predict(self, X: np.ndarray) -> List[str]:
        return [self.classes[i] for i in np.argmax((X / self.scale) @ self.W.T + self.b, axis=1)]

    def top_features(self, n: int = 10) -> Dict[str, List[List[float]]]:
        return {c: [[int(f), float(self.W[i, f])] for f in np.argsort(-self.W[i])[:n]] for i, c in enumerate(self.classes)}

    def save(self, path: str) -> None:
        np.savez(path, W=self.W, b=self.b, classes=np.array(self.classes), scale=self.scale, layer=self.layer)

    @classmethod
    def load(cls, path: str) -> "LinearProbe":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["W"], z["b"], [str(c) for c in z["classes"]], z["scale"], int(z["layer"]))


def document_matrix(data: FeatureData):
    """(doc_ids, X): one row of mean feature activations per captured document."""
    prof = data.doc_profiles()
    ids = sorted(prof)
    return ids, np.stack([prof[i] for i in ids]) if ids else np.zeros((0, data.d_sae))


def train(data: FeatureData, *, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Fits a probe on the labelled documents of a capture; reports held-out accuracy and F1."""
    ids, X = document_matrix(data)
    labels = {d["doc_id"]: d.get("label") for d in data.docs}
    keep = [j for j, i in enumerate(ids) if labels.get(i) is not None]
    if not keep:
        raise ValueError(f"{data.path}: no labelled documents (give the data file a label field)")
    X, y = X[keep], [labels[ids[j]] for j in keep]
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y)))) if len(y) > 1 else 0
    test, tr = order[:n_test], order[n_test:]
    probe = LinearProbe.fit(X[tr], [y[i] for i in tr], data.layer)
    pred = probe.predict(X[test])
    truth = [y[i] for i in test]
    acc = float(np.mean([p == t for p, t in zip(pred, truth)])) if n_test else float("nan")
    f1s = []
    for c in probe.classes:
        tp = sum(p == c and t == c for p, t in zip(pred, truth))
        fp = sum(p == c and t != c for p, t in zip(pred, truth))
        fn = sum(p != c and t == c for p, t in zip(pred, truth))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return {"probe": probe, "n_train": len(tr), "n_test": int(n_test), "accuracy": acc,
            "macro_f1": float(np.mean(f1s)), "top_features": probe.top_features()}


def score_texts(engine: Engine, sae: SAE, layer: int, weights: Mapping[int, float], texts: Sequence[str],
                max_tokens: int = 512) -> List[float]:
    """sum_f weights[f] * (mean activation of feature f over the text's tokens), per text."""
    out = []
    for text in texts:
        tokens = engine.tokenize(text)[:max_tokens]
        if not tokens:
            out.append(0.0)
            continue
        _, vals, idx = engine.features(tokens, {layer: sae})[layer]
        s = 0.0
        for f, w in weights.items():
            s += w * float(np.where(idx == int(f), vals, 0.0).sum()) / len(tokens)
        out.append(s)
    return out


def feature_reward(engine: Engine, sae: SAE, layer: int, weights: Mapping[int, float],
                   max_tokens: int = 512) -> Callable[..., List[float]]:
    """A reward function with the signature TRL's trainers call, reward(completions, **kwargs):
    the feature score of each completion (a string, or chat messages whose contents are joined)."""

    def reward(completions, **kwargs) -> List[float]:
        texts = [c if isinstance(c, str) else " ".join(m.get("content", "") for m in c) for c in completions]
        return score_texts(engine, sae, layer, weights, texts, max_tokens)

    reward.__name__ = "saehook_feature_reward"
    return reward
