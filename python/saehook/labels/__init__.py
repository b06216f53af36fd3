"""Labels for SAE features: a store beside each SAE (keyed by a fingerprint of its weights),
import of published explanations, local explanation and detection scoring with a GGUF model,
and search (by label, by example against a contrast, by decoder direction).

    import saehook
    from saehook.labels import resolve_feature, search_labels, similar_features
    sae = saehook.load("layer11.sae.pt")
    sae.labels[123].label                      # the store, read lazily from beside the file
    resolve_feature(sae, "label:pirate")       # -> 123, or LabelError listing the candidates
    search_labels(sae.labels, "french text")   # BM25 over the labels
    similar_features(sae, 123)                 # decoder-direction cosine
"""
from __future__ import annotations

from .contexts import Example, FeatureContexts, Samples
from .explain import capture_for, detection_metrics, explain_features, explained_by, score_features
from .importers import import_labels, parse_source_id, read_import
from .models import Explainer, LlamaCppModel, Scorer
from .resolve import feature_value_pairs, find_label, label_of, resolve_feature
from .search import search_by_example, search_labels, similar_features
from .store import (FeatureLabel, LabelError, LabelFileMismatch, LabelStore, check_fingerprint, default_path,
                    fingerprint, open_labels)

__all__ = [
    "LabelStore", "open_labels", "FeatureLabel", "LabelError", "LabelFileMismatch", "fingerprint", "default_path",
    "check_fingerprint", "resolve_feature", "feature_value_pairs", "find_label", "label_of", "import_labels", "read_import",
    "parse_source_id", "FeatureContexts", "Example", "Samples", "Explainer", "Scorer", "LlamaCppModel",
    "explain_features", "score_features", "detection_metrics", "explained_by", "capture_for",
    "search_labels", "search_by_example", "similar_features",
]
