"""The wire format of `saehook serve`: OpenAI request fields and the `saehook` extension object,
parsed and checked into a GenerationRequest, and OpenAI's error object.

Every check names the field it rejects in `param` (e.g. `saehook.steer[0].feature`), so a client
can tell exactly what to fix. Nothing here touches the model: the server checks the prompt length
once it is tokenized.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..sae import SAE
from ..steering import _F32_MAX, POSITIONS, Steering

# The operations of the wire format: Steering's add/clamp/scale/ablate (issue 15) and the
# steering-modes ops cap and rescale, with Steering's semantics. Fields per op (besides sae,
# layer, feature, op, positions):
#   add, clamp, scale   value (required), normalize
#   ablate              normalize (value: 0 if given)
#   cap                 max and/or min (the projection on the unit direction is kept in [min, max])
#   rescale             value (required: the factor on that projection)
# cap and rescale always act along the unit decoder direction: `normalize` does not apply to them.
WIRE_OPS = ("add", "clamp", "scale", "ablate", "cap", "rescale")
_OP_KEYS = {"add": {"value", "normalize"}, "clamp": {"value", "normalize"}, "scale": {"value", "normalize"},
            "ablate": {"value", "normalize"}, "cap": {"max", "min"}, "rescale": {"value"}}


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, type: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_overloaded"}.get(status, "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: Optional[str], message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _labelled_feature(sae: SAE, name: str, spec: str, param: str) -> int:
    """"label:TEXT" -> the one feature of the SAE's label store it names (else a 400 listing the
    candidates)."""
    from ..labels import LabelError, resolve_feature

    try:
        return resolve_feature(sae, spec)
    except (LabelError, IndexError) as e:
        raise bad(param, f"{param} {json.dumps(spec)} for SAE {name!r}: {e}", "unknown_label") from None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (server options)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_steer_ops: int = 64
    max_top: int = 64
    max_stop: int = 4
    max_top_logprobs: int = 20


@dataclass
class FeatureRequest:
    """`saehook.features`: each token's top features at one layer."""

    sae_name: str
    sae: SAE
    layer: int
    top: int
    prompt: bool


@dataclass
class GenerationRequest:
    """One checked request, ready for the scheduler (prompt still text or token ids)."""

    kind: str                                  # "chat" | "completion"
    prompt: Any                                # str or list of token ids
    stream: bool
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    logprobs: Optional[int]                    # None: off; n >= 0: the chosen token plus n alternatives
    include_usage: bool
    steerings: List[Steering]
    steer_key: Tuple                            # canonical form of the steering (the prompt cache's key)
    steer_groups: List[Tuple]                  # (positions, group key) per Steering, same order
    features: Optional[FeatureRequest]
    model: str
    ignore_eos: bool = False                   # llama-server's and vLLM's extension: generate max_tokens
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: Mapping, key: str, param: str, lo: int, hi: Optional[int] = None, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(param, f"{param} must be an integer, got {json.dumps(v)}", "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(param, f"{param} must be in {rng}, got {v}")
    return v


def _float(body: Mapping, key: str, param: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not _is_num(v) or not math.isfinite(v):
        raise bad(param, f"{param} must be a finite number, got {json.dumps(v)}", "invalid_type")
    if not lo <= v <= hi:
        raise bad(param, f"{param} must be in [{lo}, {hi}], got {v}")
    return float(v)


def _bool(obj: Mapping, key: str, param: str, default: bool) -> bool:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(param, f"{param} must be true or false, got {json.dumps(v)}", "invalid_type")
    return v


class SAERegistry:
    """The SAEs a server loaded, by name, and the model facts their requests are checked against."""

    def __init__(self, saes: Mapping[str, SAE], paths: Mapping[str, str], n_layer: int):
        self.saes, self.paths, self.n_layer = dict(saes), dict(paths), int(n_layer)

    def describe(self) -> List[Dict[str, Any]]:
        return [{"name": n, "path": self.paths.get(n), "layer": s.layer, "d_model": s.d_model, "d_sae": s.d_sae,
                 "k": s.k, "activation": s.activation, "prefilter": s.prefilter} for n, s in self.saes.items()]

    def pick(self, obj: Mapping, param: str) -> Tuple[str, SAE, int]:
        """The SAE and layer an object names (`sae` may be omitted with one SAE loaded; `layer`
        defaults to the SAE's own)."""
        name = obj.get("sae")
        if name is None:
            if len(self.saes) != 1:
                raise bad(f"{param}.sae", f"{param}.sae is required: this server has {len(self.saes)} SAEs "
                          f"({', '.join(self.saes) or 'none'})", "missing_field")
            name = next(iter(self.saes))
        elif not isinstance(name, str):
            raise bad(f"{param}.sae", f"{param}.sae must be a string, got {json.dumps(name)}", "invalid_type")
        elif name not in self.saes:
            raise bad(f"{param}.sae", f"unknown SAE {name!r} in {param}.sae; this server has "
                      f"{', '.join(self.saes) or 'none'} (GET /v1/saehook/saes)", "unknown_sae")
        sae = self.saes[name]
        layer = obj.get("layer", None)
        if layer is None:
            layer = sae.layer
            if layer is None:
                raise bad(f"{param}.layer", f"{param}.layer is required: SAE {name!r} does not say which layer "
                          "it reads", "missing_field")
        elif not _is_int(layer):
            raise bad(f"{param}.layer", f"{param}.layer must be an integer, got {json.dumps(layer)}", "invalid_type")
        if not 0 <= layer < self.n_layer:
            raise bad(f"{param}.layer", f"{param}.layer {layer} is outside the model (it has {self.n_layer} "
                      f"layers, 0..{self.n_layer - 1})")
        return name, sae, int(layer)


def _number(op: Mapping, key: str, param: str, kind: str, required: bool) -> Optional[float]:
    v = op.get(key)
    if v is None:
        if required:
            raise bad(param, f"{param} is required for op {kind!r}", "missing_field")
        return None
    if not _is_num(v) or not math.isfinite(v):
        raise bad(param, f"{param} must be a finite number, got {json.dumps(v)}", "invalid_value")
    if abs(v) > _F32_MAX:  # the kernels take float32
        raise bad(param, f"{param} {v!r} overflows float32 (largest {_F32_MAX:.4g})")
    return float(v)


def _add_op(st: Steering, op: Mapping, kind: str, feature: int, p: str) -> Tuple:
    """Adds one checked wire op to its Steering; returns its canonical key (the prompt cache's)."""
    if kind == "cap":
        hi = _number(op, "max", f"{p}.max", kind, False)
        lo = _number(op, "min", f"{p}.min", kind, False)
        if hi is None and lo is None:
            raise bad(f"{p}.max", f"op 'cap' needs {p}.max and/or {p}.min", "missing_field")
        if hi is not None and lo is not None and lo > hi:
            raise bad(f"{p}.min", f"{p}.min {lo:g} is above {p}.max {hi:g}")
        st.cap(feature, max=hi, min=lo)
        return (kind, feature, hi, lo)
    value = _number(op, "value", f"{p}.value", kind, kind != "ablate")
    if kind == "ablate" and value not in (None, 0.0):
        raise bad(f"{p}.value", f"{p}.value must be 0 or absent for op 'ablate', got {json.dumps(op['value'])}")
    if kind == "rescale":
        st.rescale(feature, value)
        return (kind, feature, value, True)
    normalize = _bool(op, "normalize", f"{p}.normalize", False)
    try:
        if kind == "ablate":
            st.ablate(feature, normalize=normalize)
        else:
            getattr(st, kind)(feature, value, normalize=normalize)
    except ValueError as e:  # add: value times the decoder direction overflows float32
        raise bad(f"{p}.value", f"{p}.value: {e}") from None
    return (kind, feature, float(value or 0.0), normalize)


_STEER_KEYS = {"sae", "layer", "feature", "op", "value", "positions", "normalize", "max", "min"}
_FEATURE_KEYS = {"sae", "layer", "top", "prompt"}


def _known_fields(obj: dict, known: Sequence[str], p: str) -> None:
    """A 400 naming the first field of obj (at path p) that is not in `known` (listed in that order)."""
    for key in obj:
        if key not in known:
            raise bad(f"{p}.{key}", f"unknown field {p}.{key} (known: {', '.join(known)})", "unknown_field")


def parse_saehook(ext: Any, reg: SAERegistry, limits: Limits):
    """`saehook` -> (steerings, steer_key, steer_groups, FeatureRequest or None). Ops that share
    (SAE, layer, positions) become one Steering (one encode), in the order they first appear."""
    if ext is None:
        return [], (), [], None
    if not isinstance(ext, dict):
        raise bad("saehook", "saehook must be an object", "invalid_type")
    _known_fields(ext, ("steer", "features"), "saehook")
    steer = ext.get("steer") or []
    if not isinstance(steer, list):
        raise bad("saehook.steer", "saehook.steer must be a list of operations", "invalid_type")
    if len(steer) > limits.max_steer_ops:
        raise bad("saehook.steer", f"saehook.steer has {len(steer)} operations; this server allows at most "
                  f"{limits.max_steer_ops} (--max-steer-ops)", "too_many_ops")
    groups: Dict[Tuple[str, int, str], Steering] = {}
    keys: Dict[Tuple[str, int, str], list] = {}
    for i, op in enumerate(steer):
        p = f"saehook.steer[{i}]"
        if not isinstance(op, dict):
            raise bad(p, f"{p} must be an object", "invalid_type")
        _known_fields(op, sorted(_STEER_KEYS), p)
        name, sae, layer = reg.pick(op, p)
        kind = op.get("op")
        if kind not in WIRE_OPS:
            raise bad(f"{p}.op", f"{p}.op must be one of {', '.join(WIRE_OPS)}, got {json.dumps(kind)}",
                      "unknown_op")
        feature = op.get("feature")
        if isinstance(feature, str) and feature.strip().lower().startswith("label:"):
            feature = _labelled_feature(sae, name, feature, f"{p}.feature")
        if not _is_int(feature):
            raise bad(f"{p}.feature", f"{p}.feature must be an integer, got {json.dumps(feature)}", "invalid_type")
        if not 0 <= feature < sae.d_sae:
            raise bad(f"{p}.feature", f"{p}.feature {feature} is out of range for SAE {name!r} "
                      f"(d_sae = {sae.d_sae}: 0..{sae.d_sae - 1})")
        for key in op:
            if key in _STEER_KEYS - {"sae", "layer", "feature", "op", "positions"} - _OP_KEYS[kind]:
                raise bad(f"{p}.{key}", f"{p}.{key} does not apply to op {kind!r} (it takes "
                          f"{', '.join(sorted(_OP_KEYS[kind]))})", "unknown_field")
        positions = op.get("positions", "all")
        if positions not in POSITIONS:
            raise bad(f"{p}.positions", f"{p}.positions must be one of {', '.join(POSITIONS)}, got "
                      f"{json.dumps(positions)}")
        g = (name, layer, positions)
        if g not in groups:
            groups[g] = Steering(sae, layer=layer, positions=positions)
            keys[g] = []
        keys[g].append(_add_op(groups[g], op, kind, feature, p))
    steerings = list(groups.values())
    steer_groups = [(g[2], (g[0], g[1], tuple(keys[g]))) for g in groups]
    steer_key = tuple(k for _, k in steer_groups)

    feats = ext.get("features")
    fr = None
    if feats is not None:
        p = "saehook.features"
        if not isinstance(feats, dict):
            raise bad(p, f"{p} must be an object", "invalid_type")
        _known_fields(feats, sorted(_FEATURE_KEYS), p)
        name, sae, layer = reg.pick(feats, p)
        top = _int(feats, "top", f"{p}.top", 1, None, default=min(5, sae.k))
        if top > limits.max_top:
            raise bad(f"{p}.top", f"{p}.top {top} exceeds this server's limit of {limits.max_top} (--max-top)")
        if top > sae.k:
            raise bad(f"{p}.top", f"{p}.top {top} exceeds SAE {name!r}'s k = {sae.k} (the features it keeps per "
                      "token)")
        fr = FeatureRequest(name, sae, layer, top, _bool(feats, "prompt", f"{p}.prompt", False))
    return steerings, steer_key, steer_groups, fr


def _stop(v: Any, limits: Limits) -> List[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(v) > limits.max_stop:
        raise bad("stop", f"stop has {len(v)} sequences; at most {limits.max_stop} are allowed")
    return [s for s in v if s]


def _messages(v: Any) -> List[Dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise bad("messages", "messages must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(p, f"{p} must be an object", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{p}.role", f"{p}.role must be system, developer, user, assistant or tool, got "
                      f"{json.dumps(role)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can reach a text model
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{p}.content[{j}]", f"{p}.content[{j}] must be a text part "
                              "({\"type\": \"text\", \"text\": ...}); this model reads text only")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{p}.content", f"{p}.content must be a string or a list of text parts", "invalid_type")
        out.append({**{k: val for k, val in m.items() if k in ("name",)}, "role": "system" if role == "developer"
                    else role, "content": content})
    return out


# Fields saehook serve cannot honour: refused unless they hold their no-op value (OpenAI clients
# send some of them by default), never silently ignored.
_UNSUPPORTED = {"n": 1, "echo": False, "best_of": 1, "suffix": None, "tools": None, "functions": None,
                "tool_choice": None, "function_call": None, "response_format": None, "logit_bias": None,
                "presence_penalty": 0, "frequency_penalty": 0}
_NO_OP = (None, [], {}, "none", "auto")


def parse_request(kind: str, body: Any, reg: SAERegistry, limits: Limits) -> GenerationRequest:
    """A /v1/chat/completions (kind 'chat') or /v1/completions ('completion') body, checked."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_type")
    for key, ok in _UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and v != ok and not (isinstance(v, (list, dict, str)) and v in _NO_OP):
            raise bad(key, f"{key}={json.dumps(v)} is not supported by saehook serve", "unsupported")
    if kind == "chat":
        prompt: Any = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt or not all(_is_int(t) for t in prompt):
                raise bad("prompt", "prompt must be a string, a list of token ids or a one-element list of either",
                          "invalid_type")
        elif not isinstance(prompt, str):
            raise bad("prompt", "prompt must be a string (one prompt per request)", "invalid_type")
    mt_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _int(body, mt_key, mt_key, 1, None, default=None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(mt_key, f"{mt_key} {max_tokens} exceeds this server's limit of {limits.max_tokens} (--max-tokens)")
    temperature = _float(body, "temperature", "temperature", 0.0, 2.0, 1.0)
    top_p = _float(body, "top_p", "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p", "top_p must be in (0, 1], got 0")
    seed = _int(body, "seed", "seed", -(1 << 63), (1 << 64) - 1, default=None)
    if kind == "chat":
        lp = _bool(body, "logprobs", "logprobs", False)
        top_lp = _int(body, "top_logprobs", "top_logprobs", 0, limits.max_top_logprobs, default=None)
        if top_lp is not None and not lp:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (top_lp or 0) if lp else None
    else:
        logprobs = _int(body, "logprobs", "logprobs", 0, limits.max_top_logprobs, default=None)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", "stream_options must be an object", "invalid_type")
    stream = _bool(body, "stream", "stream", False)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "model must be a string", "invalid_type")
    ctk = body.get("chat_template_kwargs") or {}
    if not isinstance(ctk, dict):
        raise bad("chat_template_kwargs", "chat_template_kwargs must be an object", "invalid_type")
    steerings, key, groups, feats = parse_saehook(body.get("saehook"), reg, limits)
    return GenerationRequest(kind=kind, prompt=prompt, stream=stream, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop=_stop(body.get("stop"), limits), logprobs=logprobs,
                             include_usage=bool((so or {}).get("include_usage")), steerings=steerings, steer_key=key,
                             steer_groups=groups, features=feats, model=model or "",
                             ignore_eos=_bool(body, "ignore_eos", "ignore_eos", False), chat_template_kwargs=ctk)


def token_key(req_groups: Sequence[Tuple], generated: bool) -> Tuple:
    """The steering that applied to one token's KV: the groups whose positions cover it. Two
    tokens with the same id, position history and key have the same KV (the prompt cache's rule)."""
    return tuple(k for positions, k in req_groups
                 if positions == "all" or (positions == "generated") == generated)
