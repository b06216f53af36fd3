"""Importing published labels into an SAE's store.

Formats read (each record's fields as their producers write them):
- Neuronpedia explanation exports, one Explanation row per line: the files of
  neuronpedia-datasets `v1/<modelId>/<source>/explanations/batch-N.jsonl.gz` (written by
  neuronpedia's utils export-data.py: id, modelId, layer, index, authorId, description,
  embedding, typeName, explanationModelName, umap_*), the older /api/explanation/export JSON
  array (id, modelId, layer, index, description, explanationModelName, typeName), and such
  rows with scores (scoreV1 / scoreV2 / scores[].value). `layer` is Neuronpedia's source id,
  `<layer>-<set>[-<width>]` such as `11-qwenscope-res-32k` or `20-gemmascope-res-16k`.
- Neuronpedia feature objects (the /api/feature response: index, layer, modelId and an
  `explanations` list of explanation rows), one per line or in a JSON array.
- A JSON object mapping feature index -> label (a string or an object with description /
  label / explanation), optionally wrapped as {"layer": L, "d_sae": N, "features": {...}}.
- A .jsonl, .json, .gz of either, or a directory of such files (a downloaded explanations/
  folder, or the source folder holding it).

Checks: a file naming a layer other than the SAE's, or a width (`32k`) other than its d_sae, is
refused; so is an index outside [0, d_sae) and a file mixing several sources. Widths: `Nk` matches
d_sae = N * 1024 or d_sae // 1000 = N (Neuronpedia writes 65536 features as both 64k and 65k),
`Nm` likewise with 1024**2 / 10**6.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .store import FORMAT, LabelError, LabelStore, check_fingerprint, fingerprint

_SOURCE_LAYER = re.compile(r"^(\d+)-")
_SOURCE_WIDTH = re.compile(r"-(\d+)([km])$", re.IGNORECASE)


def parse_source_id(source: str) -> Tuple[Optional[int], Optional[str]]:
    """Neuronpedia source id -> (layer, width text): '11-qwenscope-res-32k' -> (11, '32k')."""
    m, w = _SOURCE_LAYER.match(source or ""), _SOURCE_WIDTH.search(source or "")
    return (int(m.group(1)) if m else None), (w.group(1) + w.group(2).lower() if w else None)


def width_matches(width: str, d_sae: int) -> bool:
    n, unit = int(width[:-1]), width[-1].lower()
    binary, decimal = (1024, 1000) if unit == "k" else (1024 ** 2, 1000 ** 2)
    return d_sae == n * binary or d_sae // decimal == n


def _open_text(path: str) -> str:
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".gz") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not UTF-8 text ({e})") from None


def _records_of_file(path: str) -> Tuple[List[Tuple[str, Any]], Optional[dict]]:
    """([(where, record)], mapping) from one file: JSON lines, a JSON array, or a JSON object."""
    text = _open_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise LabelError(f"{path}: empty file")
    if stripped[0] in "[{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON lines whose first line is an object
        if isinstance(obj, list):
            return [(f"{path}[{i}]", r) for i, r in enumerate(obj)], None
        if isinstance(obj, dict):
            if "index" in obj:
                return [(path, obj)], None
            return [], obj
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise LabelError(f"{path}:{n}: not JSON ({e})") from None
    return out, None


def _files(path: str) -> List[str]:
    if os.path.isdir(os.path.join(path, "explanations")):  # a downloaded source folder (features/, explanations/, ...)
        path = os.path.join(path, "explanations")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")))
        if not names:
            raise LabelError(f"{path}: no .jsonl/.json(.gz) files in this directory")
        return [os.path.join(path, n) for n in names]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def _score_of(row: dict) -> Optional[float]:
    vals = [row.get(k) for k in ("scoreV2", "scoreV1")]
    for s in row.get("scores") or []:
        if isinstance(s, dict):
            vals.append(s.get("value"))
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(vals) if vals else None


def _explanation_rows(records: Iterable[Tuple[str, Any]]) -> List[Tuple[str, dict]]:
    """Feature objects flattened into explanation rows (with the feature's modelId/layer)."""
    rows = []
    for where, r in records:
        if not isinstance(r, dict):
            raise LabelError(f"{where}: expected a JSON object, got {type(r).__name__}")
        if isinstance(r.get("explanations"), list) and "description" not in r:
            for j, e in enumerate(r["explanations"]):
                if not isinstance(e, dict):
                    raise LabelError(f"{where}: explanations[{j}] is not an object")
                rows.append((f"{where} explanations[{j}]", {"modelId": r.get("modelId"), "layer": r.get("layer"),
                                                             "index": r.get("index"), **e}))
        else:
            rows.append((where, r))
    return rows


def _index(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise LabelError(f"{where}: field 'index' must be a feature index, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        return int(value)
    raise LabelError(f"{where}: field 'index' must be a feature index, got {value!r}")


def _check_target(sae, layer: Optional[int], width: Optional[str], what: str, path: str) -> None:
    if layer is not None:
        if sae.layer is None:
            raise LabelError(f"{path}: the labels are for layer {layer} ({what}) but the SAE does not say which layer "
                             "it reads; pass --layer")
        if int(layer) != int(sae.layer):
            raise LabelError(f"{path}: the labels are for layer {layer} ({what}), the SAE reads layer {sae.layer}; refusing")
    if width is not None and not width_matches(width, sae.d_sae):
        raise LabelError(f"{path}: the labels are for an SAE of width {width} ({what}), this SAE has "
                         f"d_sae={sae.d_sae}; refusing")


def _check_index(f: int, sae, where: str) -> None:
    if not 0 <= f < sae.d_sae:
        raise LabelError(f"{where}: feature index {f} is outside this SAE's [0, {sae.d_sae}); refusing the file")


def read_import(path: str, sae) -> List[Dict[str, Any]]:
    """The labels of a published file as [{feature, label, source, score, extra}], checked
    against `sae` (layer, width, index range; see the module doc). Nothing is written."""
    out: Dict[int, Dict[str, Any]] = {}
    base = os.path.basename(os.path.normpath(path))
    for file in _files(path):
        records, mapping = _records_of_file(file)
        if mapping is not None:
            for rec in _from_mapping(mapping, file, sae, base):
                out[rec["feature"]] = rec
            continue
        if records and isinstance(records[0][1], dict) and records[0][1].get("format") == FORMAT:
            raise LabelError(f"{file}: a saehook label store; open it with LabelStore.open or import it with "
                             "import_labels (which checks its fingerprint)")
        rows = _explanation_rows(records)
        sources = sorted({(str(r.get("modelId")), str(r.get("layer"))) for _, r in rows if r.get("layer") is not None})
        if len(sources) > 1:
            raise LabelError(f"{file}: explanations of several sources ({', '.join('/'.join(s) for s in sources[:5])}); "
                             "import one source at a time")
        if sources:
            layer, width = parse_source_id(sources[0][1])
            _check_target(sae, layer, width, f"Neuronpedia source {sources[0][0]}/{sources[0][1]}", file)
        cands: Dict[int, List[Tuple[Tuple[float, int], Dict[str, Any]]]] = {}
        for order, (where, r) in enumerate(rows):
            if "index" not in r:
                raise LabelError(f"{where}: no field 'index' (not a Neuronpedia explanation or feature)")
            desc = r.get("description")
            if desc is None:
                raise LabelError(f"{where}: no field 'description' (not a Neuronpedia explanation)")
            f = _index(r["index"], where)
            _check_index(f, sae, where)
            if not isinstance(desc, str) or not desc.strip():
                continue
            score = _score_of(r)
            np_fields = {k: r[k] for k in ("id", "modelId", "layer", "typeName", "explanationModelName") if r.get(k) is not None}
            rec = {"feature": f, "label": " ".join(desc.split()),
                   "source": f"imported from {base} (neuronpedia {r.get('modelId')}/{r.get('layer')}"
                             + (f", {r['explanationModelName']})" if r.get("explanationModelName") else ")"),
                   "score": None if score is None else {"neuronpedia": {"value": score}},
                   "extra": {"neuronpedia": np_fields}}
            # several explanations of one feature: the best scored, else the first in the file
            cands.setdefault(f, []).append(((-(score if score is not None else float("-inf")), order), rec))
        for f, lst in cands.items():
            rec = min(lst, key=lambda c: c[0])[1]
            rec["extra"]["alternatives"] = len(lst) - 1
            out[f] = rec
    if not out:
        raise LabelError(f"{path}: no labels found")
    return [out[f] for f in sorted(out)]


def _from_mapping(obj: dict, file: str, sae, base: str) -> List[Dict[str, Any]]:
    features = obj.get("features", obj.get("explanations", obj))
    if not isinstance(features, dict):
        raise LabelError(f"{file}: field 'features' must be an object of index -> label")
    layer = obj.get("layer") if features is not obj else None
    if isinstance(layer, str):
        layer, width = parse_source_id(layer)
    else:
        width = None
    d_sae = obj.get("d_sae") if features is not obj else None
    if d_sae is not None and int(d_sae) != sae.d_sae:
        raise LabelError(f"{file}: the labels are for an SAE with d_sae={d_sae}, this SAE has d_sae={sae.d_sae}; refusing")
    _check_target(sae, layer, width, "field 'layer'", file)
    out = []
    for key, val in features.items():
        where = f"{file}: feature {key!r}"
        if not re.fullmatch(r"\d+", str(key).strip()):
            raise LabelError(f"{file}: key {key!r} is not a feature index (a label file maps indices to labels, "
                             "or wraps them as {\"layer\": L, \"features\": {...}})")
        f = int(key)
        _check_index(f, sae, where)
        if isinstance(val, dict):
            text = next((val[k] for k in ("description", "label", "explanation") if isinstance(val.get(k), str)), None)
            if text is None:
                raise LabelError(f"{where}: no description/label/explanation string")
        elif isinstance(val, str):
            text = val
        else:
            raise LabelError(f"{where}: expected a label string or object, got {type(val).__name__}")
        if text.strip():
            out.append({"feature": f, "label": " ".join(text.split()), "source": f"imported from {base}",
                        "score": None, "extra": {}})
    return out


def import_labels(store: LabelStore, path: str, sae, *, overwrite: bool = True) -> Dict[str, int]:
    """Reads `path` (any format of the module doc, or another saehook label store made for this
    very SAE) into `store`; with overwrite=False existing labels stay. Returns counts; the
    caller saves the store."""
    if os.path.isfile(path) and not path.endswith(".gz"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = None
        if isinstance(head, dict) and head.get("format") == FORMAT:
            other = LabelStore.read(path)
            check_fingerprint(other.fingerprint, fingerprint(sae), path)
            recs = [dict(other[f].to_json()) for f in other]
        else:
            recs = read_import(path, sae)
    else:
        recs = read_import(path, sae)
    added = kept = 0
    for r in recs:
        if not overwrite and r["feature"] in store:
            kept += 1
            continue
        store.set(r["feature"], r["label"], source=r["source"], score=r.get("score"), examples=r.get("examples"),
                  extra=r.get("extra"))
        added += 1
    return {"imported": added, "kept": kept}
