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

    def __init__(self, W: np.ndarray, b: np.ndarray, classes: Sequence[str], scale: np.ndarray, layer: int,
                 sae_fingerprint: str = ""):
        self.W, self.b, self.classes, self.scale, self.layer = W, b, list(classes), scale, layer
        self.sae_fingerprint = sae_fingerprint  # of the SAE whose features it was trained on ("" if unknown)

    @property
    def d_sae(self) -> int:
        return int(self.W.shape[1])

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
        if X.ndim != 2 or X.shape[1] != self.d_sae:
            raise ValueError(f"the probe was trained on {self.d_sae} features, the input has "
                             f"{X.shape[1] if X.ndim == 2 else X.shape}: it comes from another SAE")
        return [self.classes[i] for i in np.argmax((X / self.scale) @ self.W.T + self.b, axis=1)]

    def top_features(self, n: int = 10) -> Dict[str, List[List[float]]]:
        return {c: [[int(f), float(self.W[i, f])] for f in np.argsort(-self.W[i])[:n]] for i, c in enumerate(self.classes)}

    def save(self, path: str) -> None:
        np.savez(path, W=self.W, b=self.b, classes=np.array(self.classes), scale=self.scale, layer=self.layer,
                 sae_fingerprint=np.array(self.sae_fingerprint))

    @classmethod
    def load(cls, path: str) -> "LinearProbe":
        with np.load(path, allow_pickle=False) as z:
            fp = str(z["sae_fingerprint"]) if "sae_fingerprint" in z.files else ""
            return cls(z["W"], z["b"], [str(c) for c in z["classes"]], z["scale"], int(z["layer"]), fp)

    def check_capture(self, data: FeatureData, probe_path: str = "the probe") -> None:
        """Refuses a capture made with another SAE (width, layer, or the SAE's fingerprint)."""
        if self.layer != data.layer:
            raise ValueError(f"{probe_path} reads layer {self.layer}, the capture {data.path} holds layer {data.layer} "
                             "(pass --layer, or train a probe on this layer)")
        if self.d_sae != data.d_sae:
            raise ValueError(f"{probe_path} was trained on an SAE with {self.d_sae} features; {data.path} was captured "
                             f"with one of {data.d_sae}: a probe only reads the features of its own SAE")
        theirs = _capture_fingerprint(data)
        if self.sae_fingerprint and theirs and theirs != self.sae_fingerprint:
            raise ValueError(f"{probe_path} was trained on another SAE than the one {data.path} was captured with "
                             "(same width, different weights: feature numbers mean different things)")


def _capture_fingerprint(data: FeatureData) -> str:
    return str((data.manifest.get("sae_fingerprint") or {}).get(str(data.layer), ""))


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
    probe.sae_fingerprint = _capture_fingerprint(data)
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


def predict(probe: LinearProbe, data: FeatureData, *, probe_path: str = "the probe") -> List[tuple]:
    """[(doc_id, label)] for every captured document, after checking the capture's SAE is the probe's."""
    probe.check_capture(data, probe_path)
    ids, X = document_matrix(data)
    return list(zip(ids, probe.predict(X))) if ids else []


def _check_weights(sae: SAE, weights: Mapping[int, float]) -> Dict[int, float]:
    out = {}
    for f, w in weights.items():
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
            raise TypeError(f"feature keys must be integers, got {f!r}")
        if not 0 <= int(f) < sae.d_sae:
            raise IndexError(f"feature {f} is out of range: the SAE has features 0 to {sae.d_sae - 1}")
        if not np.isfinite(float(w)):
            raise ValueError(f"the weight of feature {f} is not finite: {w!r}")
        out[int(f)] = float(w)
    if not out:
        raise ValueError("no features given: weights maps feature index -> weight")
    return out


def score_texts(engine: Engine, sae: SAE, layer: int, weights: Mapping[int, float], texts: Sequence[str],
                max_tokens: int = 512) -> List[float]:
    """sum_f weights[f] * (mean activation of feature f over the text's tokens), per text."""
    weights = _check_weights(sae, weights)
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
    the feature score of each completion (a string, or chat messages whose contents are joined).
    Features out of the SAE's range and non-finite weights are refused here, not at the first call."""
    weights = _check_weights(sae, weights)
    if not 0 <= int(layer) < engine.n_layer:
        raise ValueError(f"layer {layer} is outside the model (it has {engine.n_layer} layers)")

    def reward(completions, **kwargs) -> List[float]:
        texts = [c if isinstance(c, str) else " ".join(m.get("content", "") for m in c) for c in completions]
        return score_texts(engine, sae, layer, weights, texts, max_tokens)

    reward.__name__ = "saehook_feature_reward"
    return reward
