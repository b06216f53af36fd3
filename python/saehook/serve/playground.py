"""The steering playground of `saehook serve`: `GET /` answers a page (static/, plain HTML, CSS
and JavaScript: no CDN, no build step) that chats with the served model through the OpenAI
endpoints, shows each token's features and sends a steering spec with the next message; and
the few endpoints the page needs beyond the OpenAI ones:

    GET  /                               the page (static/index.html; its files under /playground/)
    GET  /v1/saehook/playground          what the page needs to know: model, SAEs (with label
                                         counts), chat template or not, limits, the steer ops this
                                         server takes in a request
    GET  /v1/saehook/labels?sae=&features=1,2   the labels of some features
    GET  /v1/saehook/search?sae=&q=&top=        features by label (BM25, saehook.labels.search_labels)
    GET  /v1/saehook/similar?sae=&feature=&top= features by decoder cosine (similar_features)
    POST /v1/saehook/control-vector      {"saehook": {"steer": [...]}} (add-only) -> a llama.cpp
                                         control-vector GGUF (saehook.llama.export_control_vector)

These read the SAEs only (never the model), so they run beside generation, in FastAPI's thread
pool. Cost: labels and search read the label file once (then a pass over the labels per search);
similar reads the whole decoder per call, in chunks of 2048 features (a few seconds for a
multi-GB SAE, no copy of it); a control vector is one float32 d_model vector per layer. Errors are OpenAI error objects with `param` naming the query field, as elsewhere.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, List, Optional, Tuple

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from ..steering import OPS
from .protocol import APIError, bad, parse_saehook

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page's files and their types: nothing else under static/ is served.
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
MAX_LABEL_QUERY = 256          # features per /v1/saehook/labels call
MAX_SEARCH_TOP = 100

# One op of each kind in the request form the page sends; an op the server's parser refuses
# (saehook.serve.protocol; this one takes all six) is offered by the page for the copied spec only.
_PROBES = {"add": {"value": 1.0}, "clamp": {"value": 1.0}, "scale": {"value": 0.5}, "ablate": {},
           "cap": {"max": 1.0, "min": -1.0}, "rescale": {"value": 0.5}}


def request_ops(state) -> List[str]:
    """The ops that `saehook.steer` of a request accepts on this server, found by asking the
    server's own parser (so the page follows the server as it gains ops)."""
    name = next(iter(state.registry.saes), None)
    if name is None:
        return []
    sae = state.registry.saes[name]
    layer = sae.layer if sae.layer is not None else 0
    ok = []
    for op in OPS:
        probe = {"sae": name, "layer": layer, "feature": 0, "op": op, **_PROBES.get(op, {"value": 1.0})}
        try:
            parse_saehook({"steer": [probe]}, state.registry, state.limits)
        except Exception:  # APIError (unknown field / op) or the Steering call's TypeError: not offered
            continue
        ok.append(op)
    return ok


def _sae(state, name: Optional[str]) -> Tuple[str, Any]:
    saes = state.registry.saes
    if not name:
        if len(saes) != 1:
            raise bad("sae", f"sae is required: this server has {len(saes)} SAEs ({', '.join(saes) or 'none'})",
                      "missing_field")
        name = next(iter(saes))
    if name not in saes:
        raise bad("sae", f"unknown SAE {name!r}; this server has {', '.join(saes) or 'none'}", "unknown_sae")
    return name, saes[name]


def _labels(sae):
    """The SAE's label store (read once, from beside its file); a file made for another SAE is
    an error the page shows, never an empty list."""
    from ..labels import LabelError

    try:
        return sae.labels
    except LabelError as e:
        raise APIError(500, f"the SAE's label file cannot be used: {e}", code="label_file_error")


def _int_arg(v: Optional[str], param: str, lo: int, hi: int, default: Optional[int] = None) -> int:
    if v is None or v == "":
        if default is None:
            raise bad(param, f"{param} is required", "missing_field")
        return default
    try:
        n = int(v)
    except ValueError:
        raise bad(param, f"{param} must be an integer, got {v!r}", "invalid_type") from None
    if not lo <= n <= hi:
        raise bad(param, f"{param} must be in [{lo}, {hi}], got {n}")
    return n


def router(state) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @r.get("/playground/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no playground file {name!r}", code="not_found")
        return FileResponse(os.path.join(STATIC, name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @r.get("/v1/saehook/playground")
    def info():
        saes = []
        for d in state.registry.describe():
            sae = state.registry.saes[d["name"]]
            try:
                n, err = len(_labels(sae)), None
            except APIError as e:
                n, err = 0, e.message
            saes.append({**d, "labels": n, "labels_error": err})
        from . import _no_template

        return {"model": state.model_name, "saes": saes, "chat": state.chat_formatter is not _no_template,
                "n_ctx": state.scheduler.n_ctx, "parallel": state.scheduler.parallel,
                "max_tokens": state.limits.max_tokens, "max_top": state.limits.max_top,
                "max_steer_ops": state.limits.max_steer_ops, "ops": list(OPS), "request_ops": request_ops(state)}

    @r.get("/v1/saehook/labels")
    def labels(sae: Optional[str] = None, features: str = ""):
        name, s = _sae(state, sae)
        ids = []
        for part in filter(None, features.split(",")):
            ids.append(_int_arg(part.strip(), "features", 0, s.d_sae - 1))
        if len(ids) > MAX_LABEL_QUERY:
            raise bad("features", f"features lists {len(ids)} ids; at most {MAX_LABEL_QUERY} per call")
        store = _labels(s)
        return {"sae": name, "data": {str(f): store.label(f) for f in ids}}

    @r.get("/v1/saehook/search")
    def search(sae: Optional[str] = None, q: str = "", top: Optional[str] = None):
        from ..labels import search_labels

        name, s = _sae(state, sae)
        n = _int_arg(top, "top", 1, MAX_SEARCH_TOP, 20)
        if not q.strip():
            raise bad("q", "q (the words to look for in the labels) is required", "missing_field")
        store = _labels(s)
        return {"object": "list", "sae": name, "labels": len(store), "data": search_labels(store, q, top=n)}

    @r.get("/v1/saehook/similar")
    def similar(sae: Optional[str] = None, feature: Optional[str] = None, top: Optional[str] = None):
        from ..labels import similar_features

        name, s = _sae(state, sae)
        f = _int_arg(feature, "feature", 0, s.d_sae - 1)
        n = _int_arg(top, "top", 1, MAX_SEARCH_TOP, 10)
        _labels(s)  # a bad label file is reported, not hidden behind similar_features' label lookups
        return {"object": "list", "sae": name, "feature": f, "data": similar_features(s, f, top=n)}

    @r.post("/v1/saehook/control-vector")
    async def control_vector(request: Request):
        import json

        raw = await request.body()
        if len(raw) > state.limits.max_body_bytes:
            raise APIError(413, f"the request body exceeds {state.limits.max_body_bytes} bytes (--max-body)",
                           code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(None, f"the request body is not valid JSON: {e}", "invalid_json")
        if not isinstance(body, dict) or "saehook" not in body:
            raise bad("saehook", 'the body must be {"saehook": {"steer": [...]}} (the spec a request carries)',
                      "missing_field")
        ext = body["saehook"]
        steerings, _, groups, _ = parse_saehook(ext, state.registry, state.limits)
        if not steerings:
            raise bad("saehook.steer", "saehook.steer has no operations: nothing to export", "missing_field")
        for i, op in enumerate(ext.get("steer") or []):
            p = f"saehook.steer[{i}]"
            if op.get("op") != "add":
                raise bad(f"{p}.op", f"{p}.op is {op.get('op')!r}: a control vector is a fixed vector, so only "
                          "add-only specs export (clamp, scale, ablate, cap and rescale read the row)",
                          "not_additive")
            if op.get("positions", "all") != "all":
                raise bad(f"{p}.positions", f"{p}.positions is {op.get('positions')!r}: a llama.cpp control "
                          "vector applies to every token, so only positions 'all' exports", "not_additive")
        for st in steerings:
            if st.layer < 1:
                raise bad("saehook.steer", f"layer {st.layer}: llama.cpp control vectors cannot steer block 0's "
                          "output (direction.0 is never applied); steer with the hook instead", "invalid_value")
        return Response(control_vector_bytes(steerings, state.model_name), media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="saehook-control-vector.gguf"'})

    return r


def control_vector_bytes(steerings, model_hint: str) -> bytes:
    """export_control_vector's file, as bytes (a temporary file: gguf's writer wants a path).
    Size: one float32 vector of d_model per steered layer."""
    from ..engines.llama import export_control_vector

    fd, path = tempfile.mkstemp(suffix=".gguf", prefix="saehook-cvec-")
    os.close(fd)
    try:
        export_control_vector(steerings, path, model_hint=model_hint)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)

