"""Feature datasets: run documents through a model and store each token's sparse SAE features
as Parquet shards, then analyse them (per-feature statistics, comparison of two datasets).

A capture directory holds
    manifest.json          what was captured (model, SAE, layers, shard size, d_sae, and fingerprints
                           of the documents and of each SAE) for resume
    .capture.lock          held (flock) while a capture writes here
    docs.parquet           doc_id, text, label (when the input has labels)
    shard-00000.parquet    one row per (document, token, layer): doc_id, position, token,
                           token_text, layer, indices (list<int32>), values (list<float32>)
Shard i holds documents [i * shard_docs, (i + 1) * shard_docs). A shard is written to a
temporary name and renamed when complete, so an interrupted run never leaves a shard that looks
complete, and a rerun with the same inputs skips the shards that exist; a rerun with other
documents or another SAE is refused (it would mix two captures in one directory).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..engines import Engine
from ..sae import SAE

try:
    import fcntl
except ImportError:  # not POSIX: no directory lock
    fcntl = None

MANIFEST = "manifest.json"
LOCK = ".capture.lock"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("feature datasets need pyarrow: pip install 'saehook[workflows]'") from None
    return pa, pq


def read_documents(path: str) -> List[dict]:
    """[{"text", "label"?, "id"?}] from .txt (a document per non-empty line), .jsonl (fields text,
    label, id), .csv (a header row with a text column, optional label and id) or .parquet (columns
    text, label, id). A .txt file whose first line is a JSON object or a CSV header naming a text
    column is refused: its lines would be captured as raw text, markup included."""
    if path.endswith(".parquet"):
        _, pq = _pa()
        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "text" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: the CSV header {reader.fieldnames} has no 'text' column")
            rows = [{k: v for k, v in r.items() if k is not None and (k == "text" or v != "")}
                    for r in reader if (r.get("text") or "").strip()]
    else:
        with open(path, encoding="utf-8") as f:
            rows = [{"text": line.rstrip("\n")} for line in f if line.strip()]
        if rows:
            _refuse_structured_text(path, rows[0]["text"])
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise ValueError(f"{path}: document {n} has no text field")
    if not rows:
        raise ValueError(f"{path}: no documents")
    return rows


def _refuse_structured_text(path: str, first: str) -> None:
    """A plain-text file is one document per line; say so when it is really JSONL or CSV."""
    line = first.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            raise ValueError(f"{path}: the first line is a JSON object (fields {sorted(obj)}), but a {_ext(path)} file "
                             "is read as plain text, one document per line: rename it to .jsonl to read its fields")
    header = next(csv.reader([line]), [])
    if len(header) > 1 and "text" in [h.strip().lower() for h in header]:
        raise ValueError(f"{path}: the first line looks like a CSV header ({line!r}), but a {_ext(path)} file is read "
                         "as plain text, one document per line: rename it to .csv to read its columns")


def _ext(path: str) -> str:
    return os.path.splitext(path)[1] or "extensionless"


def shard_name(i: int) -> str:
    """The file name of shard i (documents [i * shard_docs, (i + 1) * shard_docs))."""
    return f"shard-{i:05d}.parquet"


def _shard_path(out: str, i: int) -> str:
    return os.path.join(out, shard_name(i))


# ---- fingerprints: what a resumed capture checks it is continuing ----
SAMPLE_BYTES = 1 << 20  # hashed at each end of a large weight array
SAMPLE_CHUNKS = 64      # plus this many 4 KiB chunks spread evenly over it


def _byte_view(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (CPU, as loaded)
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return (a if a.flags.c_contiguous else np.ascontiguousarray(a)).reshape(-1).view(np.uint8)


def sae_fingerprint(sae: SAE) -> str:
    """A short hash that tells two SAEs apart without reading gigabytes: shapes, dtypes, k,
    activation and layout, every small array in full, and of each weight matrix its first and
    last MiB plus 64 chunks of 4 KiB spread over it (about 2.3 MiB read per matrix whatever its
    size: a few ms from the page cache). Two different trained SAEs differ in all of these; a
    change confined to unsampled bytes goes unseen, which is the trade for not hashing 2 GiB."""
    h = hashlib.sha256(json.dumps([sae.d_model, sae.d_sae, sae.k, sae.activation, sae.subtract_b_dec,
                                   sae.enc_dtype, sae.dec_dtype, sae.dec_layout]).encode())
    for name, a in sorted(sae.arrays().items()):
        if a is None:
            h.update(f"{name}:none;".encode())
            continue
        b = _byte_view(a)
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}:{b.size};".encode())
        if b.size <= 3 * SAMPLE_BYTES:
            h.update(b)
        else:
            h.update(b[:SAMPLE_BYTES])
            h.update(b[-SAMPLE_BYTES:])
            step = (b.size - 4096) // SAMPLE_CHUNKS
            for i in range(SAMPLE_CHUNKS):
                h.update(b[i * step: i * step + 4096])
    return h.hexdigest()[:32]


def documents_fingerprint(docs: Sequence[dict]) -> str:
    """A hash of every document's text and label, in order (the documents are in memory already;
    hashing them costs far less than one forward pass)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d["text"], d.get("label")], ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:32]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _check_inputs(engine: Engine, saes: Mapping[int, SAE], docs: Sequence[dict]) -> None:
    if not saes:
        raise ValueError("capture needs at least one SAE ({layer: sae})")
    n_layer = engine.n_layer
    d_model = engine.d_model
    for layer, sae in saes.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layer:
            raise ValueError(f"layer {layer!r} is outside the model (it has {n_layer} layers, 0 to {n_layer - 1})")
        if not isinstance(sae, SAE):
            raise TypeError(f"the SAE for layer {layer} is a {type(sae).__name__}, not a saehook.SAE")
        if sae.d_model != d_model:
            raise ValueError(f"the SAE for layer {layer} has d_model = {sae.d_model}, the model's residual is {d_model} wide")
    if not docs:
        raise ValueError("no documents to capture")
    for n, d in enumerate(docs):
        if not isinstance(d, Mapping) or not isinstance(d.get("text"), str):
            raise ValueError(f"document {n} has no text field (expected {{'text': str, 'label'?: ...}})")


@contextlib.contextmanager
def _directory_lock(out: str):
    """One capture per directory at a time: an exclusive flock on out/.capture.lock, released when
    the capture ends (also when its process dies)."""
    path = os.path.join(out, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CaptureBusyError(f"another capture is writing into {out} right now (it holds {path}); "
                                       "wait for it to finish or use another directory") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class CaptureBusyError(RuntimeError):
    """The capture directory is locked by another running capture."""


def _manifest_mismatch(out: str, old: dict, new: dict) -> str:
    what = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in ("docs_fingerprint", "sae_fingerprint") and key not in old:
            what.append(f"{key} (this directory was captured by an older saehook that recorded none, so a resume "
                        "cannot check what it continues)")
        elif key == "docs_fingerprint":
            what.append("the documents (their text or labels differ from those the capture started with)")
        elif key == "sae_fingerprint":
            a, b = old.get(key) or {}, new.get(key) or {}
            changed = sorted(set(a) | set(b), key=int) if isinstance(a, dict) and isinstance(b, dict) else []
            changed = [L for L in changed if a.get(L) != b.get(L)]
            what.append(f"the SAE of layer{'s' if len(changed) > 1 else ''} {', '.join(changed) or '?'} "
                        "(its weights are not those the capture started with)")
        else:
            what.append(f"{key} (was {old.get(key)!r}, now {new.get(key)!r})")
    return (f"{out} holds a capture made with other inputs; changed: {'; '.join(what)}. "
            "Resuming would mix the two: use a new directory, or delete this one to start over")


def capture(engine: Engine, saes: Mapping[int, SAE], docs: Sequence[dict], out: str, *, shard_docs: int = 64,
            max_tokens: int = 512, manifest_extra: Optional[dict] = None, progress=None) -> dict:
    """Captures the features of every document into `out` (resumable: see the module doc).

    Everything is checked before anything is written (the arguments, each layer against the
    model, each SAE's width against the model's residual). A directory that already holds a
    capture is resumed only when its manifest matches: same settings, the same documents
    (a hash of their text and labels) and the same SAEs (`sae_fingerprint`); otherwise the
    error names what changed. A second capture into a directory in use is refused
    (`CaptureBusyError`)."""
    _pa()  # without pyarrow, fail before writing anything
    shard_docs = _positive_int("shard_docs", shard_docs)
    max_tokens = _positive_int("max_tokens", max_tokens)
    _check_inputs(engine, saes, docs)
    manifest = capture_manifest(saes, docs, shard_docs, max_tokens, manifest_extra)
    os.makedirs(out, exist_ok=True)
    with _directory_lock(out):
        mpath = os.path.join(out, MANIFEST)
        if os.path.exists(mpath):
            with open(mpath) as f:
                old = json.load(f)
            if old != manifest:
                raise ValueError(_manifest_mismatch(out, old, manifest))
        else:
            write_json(mpath, manifest)
        return _capture_shards(engine, saes, docs, out, shard_docs, max_tokens, progress)


def capture_manifest(saes: Mapping[int, SAE], docs: Sequence[dict], shard_docs: int, max_tokens: int,
                     manifest_extra: Optional[dict] = None) -> dict:
    """What a capture directory's manifest.json holds (local and Ray captures write the same)."""
    return {"layers": sorted(int(k) for k in saes), "d_sae": {str(k): s.d_sae for k, s in saes.items()},
            "k": {str(k): s.k for k, s in saes.items()}, "shard_docs": shard_docs, "max_tokens": max_tokens,
            "n_docs": len(docs), "docs_fingerprint": documents_fingerprint(docs),
            "sae_fingerprint": {str(k): sae_fingerprint(s) for k, s in saes.items()}, **(manifest_extra or {})}


def docs_table(docs: Sequence[dict]):
    """docs.parquet's table: doc_id, text, label (when any document has one)."""
    pa, _ = _pa()
    table = {"doc_id": list(range(len(docs))), "text": [d["text"] for d in docs]}
    if any("label" in d for d in docs):
        table["label"] = [None if d.get("label") is None else str(d["label"]) for d in docs]
    return pa.table(table)


def shard_table(engine: Engine, saes: Mapping[int, SAE], docs: Sequence[dict], first_doc_id: int, max_tokens: int,
                on_document=None):
    """One shard's rows: the features of `docs`, numbered from first_doc_id (the unit of work of a
    local and of a Ray capture). on_document(doc_id) is called after each document."""
    pa, _ = _pa()
    cols: Dict[str, list] = {k: [] for k in ("doc_id", "position", "token", "token_text", "layer", "indices", "values")}
    for doc_id, doc in enumerate(docs, first_doc_id):
        tokens = engine.tokenize(doc["text"])[:max_tokens]
        if tokens:
            texts = [engine.token_text(t) for t in tokens]
            for layer, (pos, vals, idx) in engine.features(tokens, saes).items():
                for r, p in enumerate(pos):
                    keep = idx[r] >= 0
                    cols["doc_id"].append(doc_id)
                    cols["position"].append(int(p))
                    cols["token"].append(int(tokens[p]))
                    cols["token_text"].append(texts[p])
                    cols["layer"].append(int(layer))
                    cols["indices"].append(idx[r][keep].astype(np.int32))
                    cols["values"].append(vals[r][keep].astype(np.float32))
        if on_document:
            on_document(doc_id)
    schema = pa.schema([("doc_id", pa.int64()), ("position", pa.int32()), ("token", pa.int32()),
                        ("token_text", pa.string()), ("layer", pa.int32()),
                        ("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])
    return pa.table(cols, schema=schema)


def _capture_shards(engine, saes, docs, out, shard_docs, max_tokens, progress) -> dict:
    docs_path = os.path.join(out, "docs.parquet")
    if not os.path.exists(docs_path):
        _atomic_parquet(docs_table(docs), docs_path)
    n_shards = (len(docs) + shard_docs - 1) // shard_docs
    written = 0
    for i in range(n_shards):
        path = _shard_path(out, i)
        if os.path.exists(path):
            continue
        lo = i * shard_docs
        table = shard_table(engine, saes, docs[lo: lo + shard_docs], lo, max_tokens,
                            on_document=(lambda doc_id: progress(doc_id + 1, len(docs))) if progress else None)
        _atomic_parquet(table, path)
        written += 1
    return {"out": out, "shards": n_shards, "written": written, "skipped": n_shards - written}


def _atomic_parquet(table, path: str) -> None:
    _, pq = _pa()
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def open_capture(path: str, layer: Optional[int] = None) -> Tuple[dict, int, int, List[str]]:
    """A capture directory's manifest, the layer to read (the first one by default), its d_sae and
    the paths of all its shards; refused when the layer is not captured or a shard is missing.
    The one check both FeatureData and the streaming analyses open a capture with."""
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    layers = manifest["layers"]
    chosen = layers[0] if layer is None else int(layer)
    if chosen not in layers:
        raise ValueError(f"{path} has layers {layers}, not {layer}")
    expected = (manifest["n_docs"] + manifest["shard_docs"] - 1) // manifest["shard_docs"]
    shards = [os.path.join(path, shard_name(i)) for i in range(expected)]
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise ValueError(f"{path}: {expected - len(missing)} of {expected} shards present (missing "
                         f"{os.path.basename(missing[0])}...); rerun capture to complete it")
    return manifest, chosen, int(manifest["d_sae"][str(chosen)]), shards


class FeatureData:
    """A capture directory loaded for analysis (all rows of one layer in memory)."""

    def __init__(self, path: str, layer: Optional[int] = None):
        _, pq = _pa()
        self.manifest, self.layer, self.d_sae, shards = open_capture(path, layer)
        import pyarrow as pa
        import pyarrow.compute as pc

        table = pa.concat_tables([pq.read_table(s) for s in shards])
        table = table.filter(pc.equal(table["layer"], self.layer))
        self.doc_id = table["doc_id"].to_numpy()
        self.position = table["position"].to_numpy()
        self.token_text = table["token_text"].to_pylist()
        self.indices = [np.asarray(v, dtype=np.int64) for v in table["indices"].to_pylist()]
        self.values = [np.asarray(v, dtype=np.float32) for v in table["values"].to_pylist()]
        self.docs = pq.read_table(os.path.join(path, "docs.parquet")).to_pylist()
        self.path = path

    @property
    def n_tokens(self) -> int:
        return len(self.indices)

    def feature_counts(self) -> np.ndarray:
        return np.bincount(np.concatenate(self.indices), minlength=self.d_sae) if self.indices else np.zeros(self.d_sae)

    def doc_profiles(self) -> Dict[int, np.ndarray]:
        """doc_id -> mean activation of every feature over the document's tokens (dense)."""
        out: Dict[int, np.ndarray] = {}
        counts: Dict[int, int] = {}
        for d, idx, val in zip(self.doc_id.tolist(), self.indices, self.values):
            prof = out.setdefault(d, np.zeros(self.d_sae, np.float32))
            np.add.at(prof, idx, val)
            counts[d] = counts.get(d, 0) + 1
        return {d: p / counts[d] for d, p in out.items()}

    def context(self, row: int, width: int = 6) -> str:
        """The tokens around a row, the row's own token in [brackets]."""
        d, p = self.doc_id[row], self.position[row]
        parts = []
        for r in range(max(0, row - width), min(self.n_tokens, row + width + 1)):
            if self.doc_id[r] == d:
                parts.append(f"[{self.token_text[r]}]" if self.position[r] == p else self.token_text[r])
        return "".join(parts)


def feature_stats(data: FeatureData, top: int = 5) -> List[dict]:
    """Per feature: firing frequency, mean and max activation, top-activating contexts."""
    n = max(1, data.n_tokens)
    counts = data.feature_counts()
    sums = np.zeros(data.d_sae)
    maxv = np.zeros(data.d_sae)
    best: Dict[int, List[tuple]] = {}
    for row, (idx, val) in enumerate(zip(data.indices, data.values)):
        np.add.at(sums, idx, val)
        np.maximum.at(maxv, idx, val)
        for f, v in zip(idx.tolist(), val.tolist()):
            lst = best.setdefault(f, [])
            lst.append((v, row))
            if len(lst) > 4 * top:
                lst.sort(reverse=True)
                del lst[top:]
    out = []
    for f in range(data.d_sae):
        c = int(counts[f])
        tops = sorted(best.get(f, []), reverse=True)[:top]
        out.append({"feature": f, "frequency": c / n, "count": c, "mean": float(sums[f] / c) if c else 0.0,
                    "max": float(maxv[f]), "dead": c == 0,
                    "top_contexts": [{"value": v, "doc_id": int(data.doc_id[r]), "position": int(data.position[r]),
                                      "context": data.context(r)} for v, r in tops]})
    return out


def compare(a: FeatureData, b: FeatureData, *, top: int = 20, redundancy: float = 0.95) -> dict:
    """Evaluation analysis between two captures of the same SAE: which features separate them,
    how much of each one's active feature set the other covers, and which documents of B
    nearly duplicate a document of A (cosine similarity of their feature profiles)."""
    if a.d_sae != b.d_sae or a.layer != b.layer:
        raise ValueError("compare needs captures of the same SAE and layer")
    pa_, pb_ = a.doc_profiles(), b.doc_profiles()
    ids_a, ids_b = sorted(pa_), sorted(pb_)
    near = []
    if ids_a and ids_b:
        A = np.stack([pa_[i] for i in ids_a])
        B = np.stack([pb_[i] for i in ids_b])
        A /= np.linalg.norm(A, axis=1, keepdims=True) + 1e-12
        B /= np.linalg.norm(B, axis=1, keepdims=True) + 1e-12
        sim = B @ A.T
        for j, i in enumerate(sim.argmax(axis=1)):
            if sim[j, i] >= redundancy:
                near.append({"doc_b": ids_b[j], "doc_a": ids_a[int(i)], "similarity": float(sim[j, i])})
    return compare_result(a.layer, a.feature_counts(), a.n_tokens, b.feature_counts(), b.n_tokens, top, near)


def compare_result(layer: int, counts_a: np.ndarray, tokens_a: int, counts_b: np.ndarray, tokens_b: int,
                   top: int, near: List[dict]) -> dict:
    """compare()'s result from each capture's per-feature firing counts and token count (the
    separating features, coverage, Jaccard) and the near-duplicate documents already found;
    shared with the streaming compare, which counts without loading the captures."""
    fa = counts_a / max(1, tokens_a)
    fb = counts_b / max(1, tokens_b)
    eps = 1.0 / max(tokens_a, tokens_b, 1)
    log_ratio = np.log((fa + eps) / (fb + eps))
    active_a, active_b = set(np.flatnonzero(fa).tolist()), set(np.flatnonzero(fb).tolist())
    both = active_a & active_b
    order = np.argsort(-np.abs(fa - fb))
    sep = [{"feature": int(f), "freq_a": float(fa[f]), "freq_b": float(fb[f]), "log_ratio": float(log_ratio[f])}
           for f in order[:top] if fa[f] != fb[f]]
    return {
        "layer": layer, "tokens_a": tokens_a, "tokens_b": tokens_b,
        "active_a": len(active_a), "active_b": len(active_b), "active_both": len(both),
        "coverage_of_b_by_a": len(both) / max(1, len(active_b)), "coverage_of_a_by_b": len(both) / max(1, len(active_a)),
        "jaccard": len(both) / max(1, len(active_a | active_b)),
        "separating_features": sep, "redundant_docs_b": near,
    }
