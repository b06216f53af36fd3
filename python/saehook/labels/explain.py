"""Local explanation and detection scoring of features, batched and resumable.

explain_features: for each feature, the explanation examples of contexts.FeatureContexts.sample
go to the explainer; the label, its source ("explained by MODEL"), the examples and the sampling
settings are stored. The store is saved after every batch: an interrupted run keeps the batches
done, and a rerun skips the features that have a label (imported ones included), so interrupting and
resuming gives the same store as one run (the sampling is a fixed function of capture, feature
and seed, and LlamaCppModel answers each prompt from an empty cache).

score_features: detection scoring as delphi does it. The held-out windows of a feature (firing
ones and as many where it does not fire) are shown with the label to a scorer that says which
match; stored per feature under score["detection"]: balanced accuracy (mean of the true positive
and true negative rates, 0.5 = chance), F1 of the "fires" class, precision, recall and counts.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .contexts import FeatureContexts
from .store import LabelStore

Progress = Optional[Callable[[int, int], None]]


def explained_by(name: str) -> str:
    return f"explained by {name}"


def _batches(items: List[int], size: int) -> Iterable[List[int]]:
    size = max(1, int(size))
    for i in range(0, len(items), size):
        yield items[i: i + size]


def explain_features(store: LabelStore, contexts: FeatureContexts, features: Sequence[int], explainer, *,
                     batch: int = 8, seed: int = 0, n_top: int = 10, n_quantile: int = 10, n_quantiles: int = 5,
                     overwrite: bool = False, progress: Progress = None, save: bool = True) -> Dict[str, int]:
    """Labels `features` with `explainer` (see the module doc). Features that already have a
    label are skipped unless overwrite (which also drops their old scores); features that never
    fire in the capture get no label. Returns counts {explained, skipped, silent}."""
    source = explained_by(explainer.name)
    todo = [int(f) for f in features if overwrite or int(f) not in store]
    counts = {"explained": 0, "skipped": len(features) - len(todo), "silent": 0}
    done = counts["skipped"]
    if progress:
        progress(done, len(features))
    for group in _batches(todo, batch):
        for f in group:
            s = contexts.sample(f, n_top=n_top, n_quantile=n_quantile, n_quantiles=n_quantiles, seed=seed)
            if not s.explain:
                counts["silent"] += 1
                continue
            text = explainer.explain(s.explain, s.max_activation)
            store.set(f, text, source=source, examples=[e.to_json() for e in s.explain],
                      extra={"explain": {"ctx_len": contexts.ctx_len, "seed": seed, "n_top": n_top,
                                         "n_quantile": n_quantile, "n_quantiles": n_quantiles,
                                         "max_activation": round(s.max_activation, 4),
                                         "firing_windows": s.n_firing_windows, "windows": contexts.n_windows}})
            counts["explained"] += 1
        done += len(group)
        if save:
            store.save()
        if progress:
            progress(done, len(features))
    return counts


def detection_metrics(truth: Sequence[bool], said: Sequence[bool]) -> Dict[str, Any]:
    tp = sum(1 for t, s in zip(truth, said) if t and s)
    fn = sum(1 for t, s in zip(truth, said) if t and not s)
    tn = sum(1 for t, s in zip(truth, said) if not t and not s)
    fp = sum(1 for t, s in zip(truth, said) if not t and s)
    tpr = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"balanced_accuracy": round((tpr + tnr) / 2, 4), "f1": round(f1, 4), "precision": round(precision, 4),
            "recall": round(tpr, 4), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_features(store: LabelStore, contexts: FeatureContexts, features: Sequence[int], scorer, *,
                   batch: int = 8, seed: int = 0, n_top: int = 10, n_quantile: int = 10, n_quantiles: int = 5,
                   n_test: int = 10, label_of: Optional[Callable[[int], str]] = None, progress: Progress = None,
                   save: bool = True) -> Dict[int, Dict[str, Any]]:
    """Detection-scores the labels of `features` (those with a label; `label_of` overrides the
    text scored, e.g. a shuffled control). Sampling settings must equal explain's so the
    held-out windows are the ones the explainer did not see. Returns {feature: metrics}."""
    todo = [int(f) for f in features if int(f) in store or label_of is not None]
    results: Dict[int, Dict[str, Any]] = {}
    done = 0
    for group in _batches(todo, batch):
        for f in group:
            s = contexts.sample(f, n_top=n_top, n_quantile=n_quantile, n_quantiles=n_quantiles, n_test=n_test, seed=seed)
            if not s.test_firing or not s.test_silent:
                continue
            text = label_of(f) if label_of is not None else store[f].label
            examples = s.test_firing + s.test_silent
            truth = [True] * len(s.test_firing) + [False] * len(s.test_silent)
            said = scorer.detect(text, [e.text for e in examples])
            if len(said) != len(examples):
                raise ValueError(f"the scorer {scorer.name} answered {len(said)} times for {len(examples)} examples")
            m = detection_metrics(truth, said)
            m.update({"scorer": scorer.name, "n_firing": len(s.test_firing), "n_silent": len(s.test_silent),
                      "seed": seed, "ctx_len": contexts.ctx_len})
            results[f] = m
            if label_of is None:
                store.set_score(f, "detection", m)
        done += len(group)
        if save and label_of is None:
            store.save()
        if progress:
            progress(done, len(todo))
    return results


def capture_for(engine, sae, docs: List[dict], directory: str, *, model: str, data: str, max_tokens: int = 512,
                shard_docs: int = 64, progress=None) -> str:
    """Captures `docs` at the SAE's layer into directory/<key> (key: model, data, settings), or
    reuses that capture: explain and score over the same data read the same windows."""
    from ..workflows.datasets import capture
    from .store import fingerprint

    fp = fingerprint(sae)["sha256"]
    key = hashlib.sha1("\0".join([os.path.abspath(model), os.path.abspath(data), fp, str(sae.layer), str(max_tokens),
                                   str(shard_docs)]).encode()).hexdigest()[:12]
    out = os.path.join(directory, key)
    capture(engine, {sae.layer: sae}, docs, out, shard_docs=shard_docs, max_tokens=max_tokens,
            manifest_extra={"model": os.path.abspath(model), "data": os.path.abspath(data), "sae_fingerprint": fp},
            progress=progress)
    return out
