"""Example contexts of features from a capture (the `capture` command's Parquet shards, read with
workflows.datasets.FeatureData), sampled as delphi samples them.

The capture's tokens are cut into windows of `ctx_len` consecutive tokens of one document
(delphi's fixed-length windows); a window's activation for a feature is the largest activation
of that feature on its tokens. For each feature, its firing windows are split at random in two
halves (the strongest window always on the explanation side): the explanation half gives the
top windows plus a sample spread over activation quantiles, the held-out half gives the firing
examples of detection scoring, matched by as many windows where the feature does not fire. The
split is a fixed function of (capture, feature, seed), so explain and score can run apart.

Memory: the capture's layer is loaded by FeatureData (all rows); this module adds flat arrays of
the (row, feature, value) entries of the requested features only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


@dataclass
class Example:
    """One window: its tokens and the feature's activation on each."""

    doc_id: int
    position: int            # position of the first token in its document
    tokens: List[str]
    acts: List[float]

    @property
    def max(self) -> float:
        return max(self.acts) if self.acts else 0.0

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def to_json(self) -> dict:
        return {"doc_id": self.doc_id, "position": self.position, "tokens": self.tokens,
                "acts": [round(float(a), 4) for a in self.acts]}


@dataclass
class Samples:
    explain: List[Example] = field(default_factory=list)
    test_firing: List[Example] = field(default_factory=list)
    test_silent: List[Example] = field(default_factory=list)
    max_activation: float = 0.0
    n_firing_windows: int = 0


def quantile_sample(pool: Sequence[int], n: int, n_quantiles: int, rng: np.random.Generator) -> List[int]:
    """n items of `pool` (sorted strongest first) spread over n_quantiles equal slices of it,
    picked at random within each slice; all of the pool when it has at most n items."""
    pool = list(pool)
    if len(pool) <= n:
        return pool
    slices = np.array_split(np.asarray(pool), max(1, min(n_quantiles, n)))
    out: List[int] = []
    for i, sl in enumerate(slices):
        want = n // len(slices) + (1 if i < n % len(slices) else 0)
        pick = rng.choice(len(sl), size=min(want, len(sl)), replace=False)
        out.extend(int(x) for x in sl[np.sort(pick)])
    return out


class FeatureContexts:
    """Windows of a loaded capture and, per requested feature, its firing windows."""

    def __init__(self, data, features: Optional[Iterable[int]] = None, *, ctx_len: int = 32):
        if ctx_len < 1:
            raise ValueError(f"ctx_len must be at least 1, got {ctx_len}")
        self.data, self.ctx_len = data, int(ctx_len)
        n = data.n_tokens
        if n == 0:
            raise ValueError(f"{data.path}: the capture has no tokens")
        doc = np.asarray(data.doc_id)
        first = np.r_[True, doc[1:] != doc[:-1]]
        start_of_run = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        key = np.flatnonzero(first | ((np.arange(n) - start_of_run) % self.ctx_len == 0))
        self.win_start = key
        self.win_end = np.r_[key[1:], n]
        self.row_window = np.repeat(np.arange(len(key)), self.win_end - self.win_start)
        lens = np.fromiter((len(i) for i in data.indices), dtype=np.int64, count=n)
        rows = np.repeat(np.arange(n), lens)
        feats = np.concatenate(data.indices).astype(np.int64) if lens.sum() else np.zeros(0, np.int64)
        vals = np.concatenate(data.values).astype(np.float32) if lens.sum() else np.zeros(0, np.float32)
        if features is not None:
            keep = np.isin(feats, np.fromiter((int(f) for f in features), dtype=np.int64))
            rows, feats, vals = rows[keep], feats[keep], vals[keep]
        wins = self.row_window[rows]
        order = np.lexsort((-vals, wins, feats))        # by feature, window, activation descending
        feats, wins, vals = feats[order], wins[order], vals[order]
        head = np.r_[True, (feats[1:] != feats[:-1]) | (wins[1:] != wins[:-1])] if len(feats) else np.zeros(0, bool)
        feats, wins, vals = feats[head], wins[head], vals[head]   # one entry per (feature, window): its max
        self._firing: Dict[int, tuple] = {}
        bounds = np.flatnonzero(np.r_[True, feats[1:] != feats[:-1], True]) if len(feats) else []
        for a, b in zip(bounds[:-1], bounds[1:]):
            o = np.lexsort((wins[a:b], -vals[a:b]))        # strongest first, ties by window
            self._firing[int(feats[a])] = (wins[a:b][o], vals[a:b][o])

    @property
    def n_windows(self) -> int:
        return len(self.win_start)

    def firing_features(self) -> List[int]:
        """The requested features that fire somewhere in the capture, ascending."""
        return sorted(self._firing)

    def firing(self, feature: int):
        """(window ids, their max activation), strongest first."""
        return self._firing.get(int(feature), (np.zeros(0, np.int64), np.zeros(0, np.float32)))

    def example(self, feature: int, window: int) -> Example:
        d = self.data
        a, b = int(self.win_start[window]), int(self.win_end[window])
        acts = []
        for r in range(a, b):
            hit = np.flatnonzero(d.indices[r] == feature)
            acts.append(float(d.values[r][hit[0]]) if len(hit) else 0.0)
        return Example(int(d.doc_id[a]), int(d.position[a]), list(d.token_text[a:b]), acts)

    def sample(self, feature: int, *, n_top: int = 10, n_quantile: int = 10, n_quantiles: int = 5,
               n_test: int = 10, seed: int = 0) -> Samples:
        """The explanation examples (n_top strongest + n_quantile spread over n_quantiles) and the
        held-out detection examples (up to n_test firing and as many silent windows); see the
        module doc."""
        f = int(feature)
        rng = np.random.default_rng([int(seed), f])
        wins, maxes = self.firing(f)
        out = Samples(max_activation=float(maxes[0]) if len(maxes) else 0.0, n_firing_windows=len(wins))
        if not len(wins):
            return out
        rank = np.arange(len(wins))
        rest = rank[1:]
        held = np.zeros(len(wins), bool)
        held[rng.permutation(rest)[: len(rest) // 2]] = True
        explain_pool, test_pool = rank[~held], rank[held]    # both strongest first
        chosen = list(explain_pool[:n_top]) + quantile_sample(explain_pool[n_top:], n_quantile, n_quantiles, rng)
        out.explain = [self.example(f, int(wins[i])) for i in chosen]
        test = quantile_sample(test_pool, n_test, n_quantiles, rng)
        out.test_firing = [self.example(f, int(wins[i])) for i in test]
        out.test_silent = [self.example(f, int(w)) for w in self._silent_windows(wins, len(test), rng)]
        return out

    def _silent_windows(self, firing: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """n windows at random where the feature does not fire, in window order. Draws a few
        times n candidates and drops firing ones (cost O(n log n), not O(windows) per feature);
        only a feature that fires almost everywhere falls back to listing all silent windows."""
        firing = np.sort(firing)
        n_silent = self.n_windows - len(firing)
        n = min(n, n_silent)
        if n <= 0:
            return np.zeros(0, np.int64)
        if n_silent >= self.n_windows // 2:
            cand = rng.choice(self.n_windows, size=min(self.n_windows, 4 * n + 16), replace=False)
            pos = np.searchsorted(firing, cand)
            hit = (pos < len(firing)) & (firing[np.minimum(pos, len(firing) - 1)] == cand) if len(firing) else \
                np.zeros(len(cand), bool)
            cand = cand[~hit]
            if len(cand) >= n:
                return np.sort(cand[:n])
        silent = np.setdiff1d(np.arange(self.n_windows), firing)
        return np.sort(silent[rng.choice(len(silent), size=n, replace=False)])
