"""`saehook stats` and `compare` over captures larger than memory: the shards are read one
record batch at a time, never loaded whole (datasets.FeatureData holds every row of a layer as
Python objects, about 200 bytes a row plus k * 8: fine for thousands of documents, not for a
billion tokens).

The results equal datasets.feature_stats / datasets.compare on FeatureData (same order of
accumulation, same tie-breaking by row); what each needs in memory:

    stream_feature_stats: O(d_sae * top), not O(rows): the counts, sums, maxima and running
        top contexts (d_sae * (24 + 24 * top) bytes), one record batch and its merge with the
        running tops (about batch_rows * k * 40 bytes: 30 MiB at 16,384 rows, k = 50), one
        shard's token texts while the contexts are written, and the result itself (a dict per
        feature with `top` contexts: about 1 KiB per context). Measured (a synthetic capture,
        k = 50, d_sae = 65,536, top 5): 435 MiB peak RSS for 200k rows and 480 MiB for 600k,
        where FeatureData + feature_stats took 910 MiB for the 200k (about 4 KiB per row).
    stream_compare: the frequencies in O(d_sae); the near-duplicate search keeps each document's
        mean-activation profile sparse (8 bytes per distinct feature a document fired) and
        compares the two sets block by block (block * d_sae * 4 bytes dense at a time); its time
        is n_docs_a * n_docs_b dot products, so for millions of documents pass redundancy=None
        (skipped) or compare samples.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from . import datasets

BATCH_ROWS = 16384


class StreamingCapture:
    """A capture directory opened for one streaming pass per analysis (nothing loaded here
    beyond the manifest and the shard list, checked by datasets.open_capture as FeatureData's are)."""

    def __init__(self, path: str, layer: Optional[int] = None, batch_rows: int = BATCH_ROWS):
        self.manifest, self.layer, self.d_sae, self.shards = datasets.open_capture(path, layer)
        self.path, self.batch_rows = path, int(batch_rows)
        self.n_tokens: Optional[int] = None  # known after a pass

    def batches(self, columns=("doc_id", "position", "indices", "values")):
        """(shard number, table) of this layer's rows, one record batch at a time, in row order."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for s, path in enumerate(self.shards):
            f = pq.ParquetFile(path)
            for batch in f.iter_batches(batch_size=self.batch_rows, columns=list(columns) + ["layer"]):
                t = pa.Table.from_batches([batch])
                yield s, t.filter(pc.equal(t["layer"], self.layer))


def _flat(table, name):
    """A list<...> column as (flat values, row of each value) numpy arrays."""
    import pyarrow.compute as pc

    col = table[name].combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    return col.flatten().to_numpy(zero_copy_only=False), np.repeat(np.arange(len(lengths)), lengths)


def stream_feature_stats(cap: StreamingCapture, top: int = 5) -> List[dict]:
    """datasets.feature_stats without loading the capture (see the module doc for memory)."""
    d = cap.d_sae
    counts = np.zeros(d, np.int64)
    sums = np.zeros(d)
    maxv = np.zeros(d)
    top_f = np.zeros(0, np.int64)
    top_v = np.zeros(0, np.float32)
    top_r = np.zeros(0, np.int64)
    row0 = 0
    shard_rows: List[int] = [0] * len(cap.shards)
    for s, t in cap.batches(("indices", "values")):
        idx, rows = _flat(t, "indices")
        val, _ = _flat(t, "values")
        idx = idx.astype(np.int64)
        counts += np.bincount(idx, minlength=d)
        np.add.at(sums, idx, val.astype(np.float64))  # the order FeatureData adds them in: bit-identical sums
        np.maximum.at(maxv, idx, val.astype(np.float64))
        # the running top contexts: per feature the `top` largest (value, row), larger row first on ties
        f = np.concatenate([top_f, idx])
        v = np.concatenate([top_v, val.astype(np.float32)])
        r = np.concatenate([top_r, rows + row0])
        order = np.lexsort((-r, -v, f))
        f, v, r = f[order], v[order], r[order]
        start = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
        rank = np.arange(len(f)) - np.repeat(start, np.diff(np.r_[start, len(f)]))
        keep = rank < top
        top_f, top_v, top_r = f[keep], v[keep], r[keep]
        row0 += t.num_rows
        shard_rows[s] += t.num_rows
    cap.n_tokens = row0
    contexts = _contexts(cap, top_r, shard_rows)
    n = max(1, row0)
    groups: Dict[int, List[Tuple[float, int]]] = {}
    for f, v, r in zip(top_f.tolist(), top_v.tolist(), top_r.tolist()):
        groups.setdefault(f, []).append((v, r))
    out = []
    for f in range(d):
        c = int(counts[f])
        out.append({"feature": f, "frequency": c / n, "count": c, "mean": float(sums[f] / c) if c else 0.0,
                    "max": float(maxv[f]), "dead": c == 0,
                    "top_contexts": [{"value": v, **contexts[r]} for v, r in groups.get(f, [])]})
    return out


def _contexts(cap: StreamingCapture, rows: np.ndarray, shard_rows: List[int], width: int = 6) -> Dict[int, dict]:
    """doc_id, position and FeatureData.context of each wanted row: a second pass over only the
    shards that hold one (a document never spans two shards, so the window stays in its shard)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    bounds = np.cumsum([0] + shard_rows)
    wanted = np.unique(rows)
    out: Dict[int, dict] = {}
    for s, path in enumerate(cap.shards):
        here = wanted[(wanted >= bounds[s]) & (wanted < bounds[s + 1])]
        if not len(here):
            continue
        t = pq.read_table(path, columns=["doc_id", "position", "token_text", "layer"])
        t = t.filter(pc.equal(t["layer"], cap.layer))
        doc, pos, text = t["doc_id"].to_numpy(), t["position"].to_numpy(), t["token_text"].to_pylist()
        for g in here.tolist():
            r = g - int(bounds[s])
            parts = []
            for q in range(max(0, r - width), min(len(doc), r + width + 1)):
                if doc[q] == doc[r]:
                    parts.append(f"[{text[q]}]" if pos[q] == pos[r] else text[q])
            out[g] = {"doc_id": int(doc[r]), "position": int(pos[r]), "context": "".join(parts)}
    return out


def _frequencies_and_profiles(cap: StreamingCapture, profiles: bool):
    """Feature counts of the layer, and (when asked) each document's mean activation profile as
    sparse (feature indices, values), computed shard by shard like FeatureData.doc_profiles."""
    d = cap.d_sae
    counts = np.zeros(d, np.int64)
    prof: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    n = 0
    pending = None  # the rows of one shard, gathered from its batches (a document stays in one shard)
    last_shard = -1

    def close_shard(p):
        doc, idx, val, rows = p
        if not len(doc):
            return
        ids, first, per_doc = np.unique(doc, return_index=True, return_counts=True)
        which = np.searchsorted(ids, doc)[rows]
        dense = np.zeros((len(ids), d), np.float32)
        np.add.at(dense, (which, idx), val)  # row order, as doc_profiles adds them
        for j, did in enumerate(ids.tolist()):
            p_ = dense[j] / np.float32(per_doc[j])
            nz = np.flatnonzero(p_)
            prof[did] = (nz, p_[nz])

    for s, t in cap.batches(("doc_id", "indices", "values")):
        idx, rows = _flat(t, "indices")
        idx = idx.astype(np.int64)
        counts += np.bincount(idx, minlength=d)
        n += t.num_rows
        if profiles:
            val, _ = _flat(t, "values")
            doc = t["doc_id"].to_numpy()
            if s != last_shard and pending is not None:
                close_shard(pending)
                pending = None
            if pending is None:
                pending = (doc, idx, val.astype(np.float32), rows)
            else:  # another batch of the same shard
                pd, pi, pv, pr = pending
                pending = (np.concatenate([pd, doc]), np.concatenate([pi, idx]),
                           np.concatenate([pv, val.astype(np.float32)]), np.concatenate([pr, rows + len(pd)]))
            last_shard = s
    if pending is not None:
        close_shard(pending)
    cap.n_tokens = n
    return counts, prof


def _dense(profiles, ids, d):
    m = np.zeros((len(ids), d), np.float32)
    for j, i in enumerate(ids):
        nz, v = profiles[i]
        m[j, nz] = v
    m /= np.linalg.norm(m, axis=1, keepdims=True) + 1e-12
    return m


def stream_compare(a: StreamingCapture, b: StreamingCapture, *, top: int = 20, redundancy: Optional[float] = 0.95,
                   block: int = 256) -> dict:
    """datasets.compare without loading either capture; redundancy=None skips the near-duplicate
    search (its cost is n_docs_a * n_docs_b dot products)."""
    if a.d_sae != b.d_sae or a.layer != b.layer:
        raise ValueError("compare needs captures of the same SAE and layer")
    ca, pa_ = _frequencies_and_profiles(a, redundancy is not None)
    cb, pb_ = _frequencies_and_profiles(b, redundancy is not None)
    near = []
    ids_a, ids_b = sorted(pa_), sorted(pb_)
    if redundancy is not None and ids_a and ids_b:
        for j0 in range(0, len(ids_b), block):
            B = _dense(pb_, ids_b[j0: j0 + block], a.d_sae)
            best = np.full(len(B), -np.inf, np.float32)
            arg = np.zeros(len(B), np.int64)
            for i0 in range(0, len(ids_a), block):
                sim = B @ _dense(pa_, ids_a[i0: i0 + block], a.d_sae).T
                m, am = sim.max(axis=1), sim.argmax(axis=1) + i0
                better = m > best  # the first maximum wins, as one argmax over all of A
                best[better], arg[better] = m[better], am[better]
            for j in range(len(B)):
                if best[j] >= redundancy:
                    near.append({"doc_b": ids_b[j0 + j], "doc_a": ids_a[int(arg[j])], "similarity": float(best[j])})
    return datasets.compare_result(a.layer, ca, a.n_tokens, cb, b.n_tokens, top, near)
