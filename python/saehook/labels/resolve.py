"""Features named by label: `"label:pirate"` -> a feature index, for Steering specs, the CLI and
the server. One place decides what "unambiguous" means:

1. a label equal to the query (case and runs of whitespace ignored) wins if it is the only one;
2. otherwise the labels containing every word of the query, if there is exactly one;
3. anything else is an error (LabelError) listing the candidates: the tied labels, or for an
   unknown label the closest ones by search_labels (BM25).
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple, Union

from .store import LabelError, LabelStore

PREFIX = "label:"
_MAX_LISTED = 10


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _store_of(obj: Any) -> Tuple[LabelStore, int]:
    if isinstance(obj, LabelStore):
        return obj, int(obj.fingerprint.get("d_sae") or 0)
    return obj.labels, int(obj.d_sae)   # an SAE: its lazily opened store


def _listing(store: LabelStore, features: List[int]) -> str:
    shown = [f"#{f} {store[f].label!r}" for f in features[:_MAX_LISTED]]
    more = len(features) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def find_label(store: LabelStore, query: str) -> int:
    """The one feature whose label matches `query` (rules in the module doc) or LabelError."""
    q = _norm(query)
    if not q:
        raise LabelError("an empty label was given")
    exact = [f for f in store if _norm(store[f].label) == q]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise LabelError(f"label {query!r} is ambiguous: {len(exact)} features have it: {_listing(store, exact)}")
    words = re.findall(r"\w+", q)
    containing = [f for f in store if all(w in _norm(store[f].label) for w in words)] if words else []
    if len(containing) == 1:
        return containing[0]
    if containing:
        raise LabelError(f"label {query!r} is ambiguous: {len(containing)} labels contain it: "
                         f"{_listing(store, containing)}; give more of the label")
    if not len(store):
        where = f" ({store.path})" if store.path else ""
        raise LabelError(f"no feature is labelled {query!r}: this SAE has no labels yet{where}; "
                         "see `saehook labels import/explain`")
    from .search import search_labels

    near = [h["feature"] for h in search_labels(store, query, top=5)]
    hint = f"; closest: {_listing(store, near)}" if near else ""
    raise LabelError(f"no feature is labelled {query!r}{hint}")


def resolve_feature(sae_or_store: Any, spec: Union[int, str]) -> int:
    """A feature index from `spec`: an int, "123", "#123", or "label:TEXT" (looked up in the SAE's
    label store). Raises IndexError for an index outside [0, d_sae) and LabelError for an
    unknown or ambiguous label (the message lists the candidates)."""
    if isinstance(spec, bool):
        raise LabelError(f"a feature must be an index or 'label:TEXT', got {spec!r}")
    if isinstance(spec, int):
        f = spec
    elif isinstance(spec, str):
        s = spec.strip()
        if s.lower().startswith(PREFIX):
            store, _ = _store_of(sae_or_store)
            return find_label(store, s[len(PREFIX):])
        s = s[1:] if s.startswith("#") else s
        if not re.fullmatch(r"\d+", s):
            raise LabelError(f"a feature must be an index or 'label:TEXT', got {spec!r}")
        f = int(s)
    else:
        raise LabelError(f"a feature must be an index or 'label:TEXT', got {type(spec).__name__} {spec!r}")
    d_sae = int(sae_or_store.d_sae) if not isinstance(sae_or_store, LabelStore) else \
        int(sae_or_store.fingerprint.get("d_sae") or 0)
    if not 0 <= f < d_sae:
        raise IndexError(f"feature {f} is out of range [0, {d_sae})")
    return f


def feature_value_pairs(sae_or_store: Any, specs, flag: str, value_type=float) -> List[Tuple[int, Any]]:
    """CLI steering flags `F=V` with F an index or a label: ["12=8", "label:pirate speech=4"] ->
    [(12, 8.0), (f, 4.0)]. The value is after the last '=', so a label may contain '='."""
    out = []
    for spec in specs or []:
        f, sep, v = str(spec).rpartition("=")
        if not sep or not f:
            raise LabelError(f"{flag} expects FEATURE=VALUE (FEATURE an index or label:TEXT), got {spec!r}")
        try:
            value = value_type(v)
        except ValueError:
            raise LabelError(f"{flag} {spec!r}: {v!r} is not a {value_type.__name__}") from None
        out.append((resolve_feature(sae_or_store, f), value))
    return out


def label_of(sae_or_store: Any, feature: int) -> Optional[str]:
    """The feature's label, or None when it has none (or the SAE has no label file). A label
    file made for another SAE raises LabelFileMismatch rather than showing nothing."""
    store, _ = _store_of(sae_or_store)
    return store.label(feature)
