"""The label store: one JSONL file beside the SAE, keyed by a fingerprint of its weights.

File layout (UTF-8, one JSON object per line, no pickle):
    line 1   {"format": "saehook-labels", "version": 1, "fingerprint": {...}, "sae": {...}}
    then     one object per labelled feature, sorted by feature:
             {"feature": 12, "label": "...", "source": "explained by qwen3-8b.gguf",
              "score": {...} | null, "examples": [...], "extra": {...}}

The fingerprint (see `fingerprint`) names the SAE the labels were made for; opening the store for
another SAE raises LabelFileMismatch instead of attaching wrong names to its features, while a
converted copy of the same SAE (f16/bf16/int8, other decoder layout) reads the same labels. Saving
writes a temporary file in the same directory, fsyncs it and renames it over the store, so a
crash leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

FORMAT = "saehook-labels"
VERSION = 1
FINGERPRINT_METHOD = "sampled-blocks+sketch-v1"
_BLOCKS = 64          # blocks hashed per weight matrix
_BLOCK_BYTES = 4096   # bytes per block
_SKETCH_FEATURES = 16
_SKETCH_PROJECTIONS = 4
SKETCH_MIN_COSINE = 0.99


class LabelError(ValueError):
    """A label file or label lookup problem; the message names the file, field or label."""


class LabelFileMismatch(LabelError):
    """A label file made for another SAE (its fingerprint differs)."""


def _as_f32(block: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (np.ascontiguousarray(block).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(block, dtype=np.float32)


def _sketch(sae) -> Dict[str, List[float]]:
    """Stored-format-independent numbers of the weights: 16 evenly spaced encoder rows, each
    projected on 4 fixed pseudo-random vectors, and the decoder's values at 16 consecutive
    features (from d_sae // 2) x 16 evenly spaced coordinates (a few pages in either layout)."""
    a = sae.arrays()
    rng = np.random.default_rng(20240517)
    proj = rng.standard_normal((sae.d_model, _SKETCH_PROJECTIONS)).astype(np.float32)
    n = min(_SKETCH_FEATURES, sae.d_sae)
    enc_f = np.unique(np.linspace(0, sae.d_sae - 1, n).astype(np.int64))
    enc = a["W_enc"][enc_f]
    enc = enc.astype(np.float32) * a["enc_scales"][enc_f, None] if sae.enc_dtype == "int8" else _as_f32(enc, sae.enc_dtype)
    lo = min(sae.d_sae // 2, sae.d_sae - n)
    coords = np.unique(np.linspace(0, sae.d_model - 1, min(_SKETCH_FEATURES, sae.d_model)).astype(np.int64))
    dec = a["W_dec"][lo:lo + n][:, coords] if sae.dec_layout == "rows" else a["W_dec"][coords][:, lo:lo + n].T
    return {"enc": [float(f"{v:.6g}") for v in (enc @ proj).ravel()],
            "dec": [float(f"{v:.6g}") for v in _as_f32(dec, sae.dec_dtype).ravel()]}


def fingerprint(sae) -> Dict[str, Any]:
    """A cheap identity of an SAE's weights, in two parts:

    - sha256: a SHA-256 over the shapes and dtypes, the small vectors (b_enc, b_dec, threshold,
      enc_scales, whole) and 64 evenly spaced 4 KiB blocks of the stored bytes of W_enc and of
      W_dec (first and last included): the same stored weights.
    - sketch: 16 encoder rows projected on 4 fixed random vectors and a 16 x 16 block of the
      decoder (see _sketch), which survive a conversion: an f16/bf16/int8 or re-laid-out copy of
      an SAE has sketches with cosine > 0.9999 to the original's, two different trainings
      about 0.1 (at most 0.33 over 29 random pairs).

    A label file applies to an SAE with the same d_model and d_sae and either the same sha256
    or sketches with cosine >= 0.99 (encoder and decoder parts each). Cost: about 1 MiB read
    whatever the SAE's size (a 2 GiB mmapped layer is not paged in). An SAE differing
    from another only outside the sampled blocks and rows (a few edited weights) matches it.
    """
    arrays = sae.arrays()
    h = hashlib.sha256()
    for name in ("W_enc", "W_dec"):
        a = arrays[name]
        flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # a view: weights are C-contiguous
        n = flat.shape[0]
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype.str}:".encode())
        if n <= _BLOCKS * _BLOCK_BYTES:
            h.update(flat.tobytes())
        else:
            for i in range(_BLOCKS):
                off = i * (n - _BLOCK_BYTES) // (_BLOCKS - 1)
                h.update(flat[off: off + _BLOCK_BYTES].tobytes())
    for name in ("b_enc", "b_dec", "threshold", "enc_scales"):
        v = arrays.get(name)
        h.update(f"{name}:".encode())
        if v is not None:
            h.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    return {"method": FINGERPRINT_METHOD, "d_model": int(sae.d_model), "d_sae": int(sae.d_sae),
            "enc_dtype": sae.enc_dtype, "dec_dtype": sae.dec_dtype, "dec_layout": sae.dec_layout,
            "sha256": h.hexdigest(), "sketch": _sketch(sae)}


def default_path(sae) -> str:
    """Where an SAE's labels live: `<file>.labels.jsonl` beside an SAE file, or
    `saehook-labels.jsonl` inside an SAE directory (SAELens, sparsify)."""
    src = sae.metadata.get("source")
    if not src:
        raise LabelError("this SAE was not loaded from a file, so its labels have no default place: "
                         "give the store a path (LabelStore.open(sae, path) / --labels FILE)")
    src = os.fspath(src)
    if os.path.isdir(src):
        return os.path.join(src, "saehook-labels.jsonl")
    return src + ".labels.jsonl"


@dataclass
class FeatureLabel:
    """One feature's label. str() of it is the label text."""

    feature: int
    label: str
    source: str                                   # "imported from FILE (neuronpedia ...)" / "explained by MODEL"
    score: Optional[Dict[str, Any]] = None        # e.g. {"detection": {"balanced_accuracy", "f1", ...}}
    examples: List[Dict[str, Any]] = field(default_factory=list)  # the contexts it was made from
    extra: Dict[str, Any] = field(default_factory=dict)           # source-specific fields

    def __str__(self) -> str:
        return self.label

    def to_json(self) -> Dict[str, Any]:
        return {"feature": self.feature, "label": self.label, "source": self.source, "score": self.score,
                "examples": self.examples, "extra": self.extra}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "FeatureLabel":
        if not isinstance(obj, dict):
            raise LabelError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        try:
            f, label, source = obj["feature"], obj["label"], obj["source"]
        except KeyError as e:
            raise LabelError(f"{where}: missing field {e.args[0]!r}") from None
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise LabelError(f"{where}: field 'feature' must be a non-negative integer, got {f!r}")
        if not isinstance(label, str) or not isinstance(source, str):
            raise LabelError(f"{where}: fields 'label' and 'source' must be strings")
        score, examples, extra = obj.get("score"), obj.get("examples") or [], obj.get("extra") or {}
        if score is not None and not isinstance(score, dict):
            raise LabelError(f"{where}: field 'score' must be an object or null, got {score!r}")
        if not isinstance(examples, list) or not isinstance(extra, dict):
            raise LabelError(f"{where}: field 'examples' must be a list and 'extra' an object")
        return cls(f, label, source, score, examples, extra)


def _sae_info(sae) -> Dict[str, Any]:
    src = sae.metadata.get("source")
    return {"d_sae": int(sae.d_sae), "d_model": int(sae.d_model), "layer": sae.layer, "hook_point": sae.hook_point,
            "source": None if src is None else os.path.basename(os.fspath(src))}


class LabelStore(Mapping):
    """feature -> FeatureLabel for one SAE, read from and saved to its JSONL file.

        store = LabelStore.open(sae)          # beside the SAE (empty if there is no file yet)
        store.set(12, "pirate speech", source="explained by qwen3-8b.gguf")
        store.save()
        str(store[12])                        # 'pirate speech'
    """

    def __init__(self, fp: Dict[str, Any], path: Optional[str] = None, sae_info: Optional[Dict[str, Any]] = None,
                 records: Optional[Mapping[int, FeatureLabel]] = None):
        self.fingerprint = dict(fp)
        self.path = path
        self.sae_info = dict(sae_info or {})
        self._records: Dict[int, FeatureLabel] = dict(records or {})

    # ---- opening ----
    @classmethod
    def open(cls, sae, path: Optional[str] = None) -> "LabelStore":
        """The store of `sae` at `path` (default: beside the SAE). A file made for another SAE is
        refused with LabelFileMismatch; a missing file gives an empty store that save() creates.
        An SAE built in memory (no source file) and no path: an empty store with no path."""
        if path is None and sae.metadata.get("source"):
            path = default_path(sae)
        path = None if path is None else os.fspath(path)
        fp = fingerprint(sae)
        if path is None or not os.path.exists(path):
            return cls(fp, path, _sae_info(sae))
        store = cls.read(path)
        check_fingerprint(store.fingerprint, fp, path)
        if any(f >= sae.d_sae for f in store._records):
            raise LabelError(f"{path}: feature {max(store._records)} is out of range for d_sae={sae.d_sae}")
        store.sae_info = _sae_info(sae)
        return store

    @classmethod
    def read(cls, path: str) -> "LabelStore":
        """A store file as it is (no check against an SAE)."""
        records: Dict[int, FeatureLabel] = {}
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if not lines or not lines[0].strip():
            raise LabelError(f"{path}: empty file, not a saehook label store")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError as e:
            raise LabelError(f"{path}:1: not JSON ({e})") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise LabelError(f"{path}: not a saehook label store (line 1 has no \"format\": \"{FORMAT}\")")
        if head.get("version") != VERSION:
            raise LabelError(f"{path}: label store version {head.get('version')!r}; this saehook reads {VERSION}")
        if not isinstance(head.get("fingerprint"), dict):
            raise LabelError(f"{path}: line 1 has no fingerprint object")
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelError(f"{path}:{n}: not JSON ({e})") from None
            rec = FeatureLabel.from_json(obj, f"{path}:{n}")
            records[rec.feature] = rec
        return cls(head["fingerprint"], path, head.get("sae"), records)

    # ---- mapping ----
    def __getitem__(self, feature: int) -> FeatureLabel:
        try:
            return self._records[int(feature)]
        except KeyError:
            raise KeyError(f"feature {feature} has no label") from None

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def label(self, feature: int) -> Optional[str]:
        rec = self._records.get(int(feature))
        return None if rec is None else rec.label

    # ---- changing ----
    def set(self, feature: int, label: str, *, source: str, score: Optional[Dict[str, Any]] = None,
            examples: Optional[List[Dict[str, Any]]] = None, extra: Optional[Dict[str, Any]] = None) -> FeatureLabel:
        f = int(feature)
        d_sae = self.fingerprint.get("d_sae")
        if f < 0 or (d_sae is not None and f >= d_sae):
            raise LabelError(f"feature {f} is out of range [0, {d_sae})")
        rec = FeatureLabel(f, str(label), str(source), score, list(examples or []), dict(extra or {}))
        self._records[f] = rec
        return rec

    def set_score(self, feature: int, kind: str, value: Dict[str, Any]) -> None:
        rec = self[feature]
        rec.score = {**(rec.score or {}), kind: value}

    def remove(self, feature: int) -> None:
        self._records.pop(int(feature), None)

    # ---- saving ----
    def dumps(self) -> str:
        head = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "sae": self.sae_info}
        lines = [json.dumps(head, sort_keys=True, ensure_ascii=False)]
        lines += [json.dumps(self._records[f].to_json(), sort_keys=True, ensure_ascii=False) for f in sorted(self._records)]
        return "\n".join(lines) + "\n"

    def save(self, path: Optional[str] = None) -> str:
        """Writes the whole store atomically (temp file, fsync, rename). Cost: the file's size
        (roughly 1-3 KiB per explained feature with its examples) per call."""
        path = os.fspath(path or self.path or "")
        if not path:
            raise LabelError("the store has no path to save to")
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(self.dumps())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.path = path
        return path


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def check_fingerprint(found: Mapping[str, Any], expected: Mapping[str, Any], path: str) -> None:
    """Raises LabelFileMismatch unless the file's fingerprint and the SAE's are the same SAE
    (rules in `fingerprint`'s doc); the message names what differs."""
    shape = [k for k in ("d_model", "d_sae") if found.get(k) != expected.get(k)]
    if shape:
        parts = ", ".join(f"{k}: file {found.get(k)!r} vs SAE {expected.get(k)!r}" for k in shape)
        raise LabelFileMismatch(f"{path}: these labels were made for another SAE ({parts}); refusing to apply them")
    if found.get("sha256") == expected.get("sha256"):
        return
    fs, es = found.get("sketch") or {}, expected.get("sketch") or {}
    cos = {part: _cosine(fs.get(part, []), es.get(part, [])) for part in ("enc", "dec")}
    if min(cos.values()) >= SKETCH_MIN_COSINE:
        return
    stored = [f"{k} {found.get(k)} vs {expected.get(k)}" for k in ("enc_dtype", "dec_dtype", "dec_layout")
              if found.get(k) != expected.get(k)]
    raise LabelFileMismatch(
        f"{path}: these labels were made for another SAE: the weights differ (sketch cosine encoder "
        f"{cos['enc']:.3f}, decoder {cos['dec']:.3f}; {SKETCH_MIN_COSINE} needed"
        + (f"; stored as {', '.join(stored)}" if stored else "") + "); refusing to apply them")


def open_labels(sae_path: str, *, layer: Optional[int] = None, labels: Optional[str] = None) -> LabelStore:
    """The label store of the SAE at `sae_path` (one layer of a multi-layer directory with
    `layer`), for code that has a path rather than an SAE object: a capture's manifest names the
    SAE it was made with (`manifest["sae"]`), so `open_labels(data.manifest["sae"],
    layer=data.layer)` gives the labels of a capture's features. The SAE loads memory-mapped."""
    from ..formats import SAESet, load

    sae = load(sae_path, layer=layer)
    if isinstance(sae, SAESet):
        raise LabelError(f"{sae_path} holds layers {sae.layers}: give the layer")
    return LabelStore.open(sae, labels)
