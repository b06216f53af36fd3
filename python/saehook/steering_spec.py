"""Conditions of conditional steering (`When`), their compilation into the C API's condition
items, and the JSON form of a steering spec (for the CLI's --spec and the server).

    When(g, above=2.0)                     z_g > 2.0 on the row (z_g: g's activation in the encode)
    When(g, below=0.5, latch=True)         once z_g < 0.5 on a token, true for the rest of the sequence
    When(a, above=1) & When(b, above=1)    both;   |  either

JSON (one object per steering, or a list of them):
    {"layer": 12, "positions": "all" | "prompt" | "generated" | {"from": a, "to": b},
     "normalize": false,
     "ops": [{"op": "add", "feature": f, "value": 8.0},
             {"op": "cap", "feature": f, "max": 3.0, "min": -1.0},
             {"op": "rescale", "feature": f, "value": 0.0,
              "when": {"feature": g, "above": 2.0, "latch": true}}],
     "stop_when": [{"feature": g, "above": 5.0}]}
A "when" is a condition object ({"feature", "above" and/or "below", "latch"}) or
{"all": [...]} / {"any": [...]} of them. A window {"from": a, "to": b} is the absolute token
positions a <= pos < b ("to" may be omitted or null: no end).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

# saehook_steer_op codes (csrc/include/saehook.h)
OPS = {"add": 0, "clamp": 1, "scale": 2, "ablate": 3, "cap": 4, "rescale": 5}
COND_ABOVE, COND_BELOW, COND_AND, COND_OR = 6, 7, 8, 9

# Mirrors saehook_steer_item in csrc/include/saehook.h (API version 2).
ITEM_DTYPE = np.dtype([("feature", "<i4"), ("op", "<i4"), ("value", "<f4"), ("normalize", "<i4"),
                       ("value2", "<f4"), ("when", "<i4"), ("arg_a", "<i4"), ("arg_b", "<i4"),
                       ("latch", "<i4")])


class Condition:
    """A condition on the row's encode; combine with & and |."""

    def __and__(self, other: "Condition") -> "Condition":
        return _Combine("and", _as_condition(self), _as_condition(other))

    def __or__(self, other: "Condition") -> "Condition":
        return _Combine("or", _as_condition(self), _as_condition(other))

    def features(self) -> List[int]:
        raise NotImplementedError

    def to_json(self) -> Dict[str, Any]:
        raise NotImplementedError


def _as_condition(c: Any) -> Condition:
    if not isinstance(c, Condition):
        raise TypeError(f"conditions combine with conditions (saehook.When), not {type(c).__name__}")
    return c


@dataclass(frozen=True, eq=True)
class When(Condition):
    """z_feature > above and/or z_feature < below on the row. latch=True: once it holds on a token
    of a sequence, it holds on every later token of that sequence."""

    feature: int
    above: Optional[float] = None
    below: Optional[float] = None
    latch: bool = False

    def __post_init__(self):
        if isinstance(self.feature, bool) or not isinstance(self.feature, (int, np.integer)):
            raise TypeError(f"When: feature must be an int, got {self.feature!r}")
        object.__setattr__(self, "feature", int(self.feature))
        if self.above is None and self.below is None:
            raise ValueError(f"When({self.feature}): give above= and/or below=")
        for name in ("above", "below"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                        or not math.isfinite(float(v)):
                    raise ValueError(f"When({self.feature}): {name} must be a finite number, got {v!r}")
                object.__setattr__(self, name, float(v))
        object.__setattr__(self, "latch", bool(self.latch))

    def features(self) -> List[int]:
        return [self.feature]

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"feature": self.feature}
        if self.above is not None:
            out["above"] = self.above
        if self.below is not None:
            out["below"] = self.below
        if self.latch:
            out["latch"] = True
        return out

    def __repr__(self) -> str:
        parts = [str(self.feature)] + [f"{n}={getattr(self, n):g}" for n in ("above", "below")
                                       if getattr(self, n) is not None]
        return f"When({', '.join(parts)}{', latch=True' if self.latch else ''})"


@dataclass(frozen=True, eq=True)
class _Combine(Condition):
    kind: str  # "and" | "or"
    a: Condition
    b: Condition

    def features(self) -> List[int]:
        return self.a.features() + self.b.features()

    def to_json(self) -> Dict[str, Any]:
        key = "all" if self.kind == "and" else "any"
        parts: List[Dict[str, Any]] = []
        for c in (self.a, self.b):  # flatten a & b & c into one list
            j = c.to_json()
            parts.extend(j[key] if isinstance(c, _Combine) and c.kind == self.kind else [j])
        return {key: parts}

    def __repr__(self) -> str:
        return f"({self.a!r} {'&' if self.kind == 'and' else '|'} {self.b!r})"


class ItemBuilder:
    """Builds the saehook_steer_item list: each distinct condition becomes condition items once
    (AND/OR refer to earlier ones), then the op items point at theirs with `when` = 1 + index."""

    def __init__(self):
        self.rows: List[tuple] = []
        self._index: Dict[Condition, int] = {}

    def condition(self, c: Condition) -> int:
        if c in self._index:
            return self._index[c]
        if isinstance(c, When):
            leaves = []
            if c.above is not None:
                leaves.append((c.feature, COND_ABOVE, c.above))
            if c.below is not None:
                leaves.append((c.feature, COND_BELOW, c.below))
            if len(leaves) == 1:
                f, op, v = leaves[0]
                j = self._push((f, op, v, 0, 0.0, 0, 0, 0, int(c.latch)))
            else:
                a = self._push(leaves[0] + (0, 0.0, 0, 0, 0, 0))
                b = self._push(leaves[1] + (0, 0.0, 0, 0, 0, 0))
                j = self._push((0, COND_AND, 0.0, 0, 0.0, 0, a, b, int(c.latch)))
        elif isinstance(c, _Combine):
            a, b = self.condition(c.a), self.condition(c.b)
            j = self._push((0, COND_AND if c.kind == "and" else COND_OR, 0.0, 0, 0.0, 0, a, b, 0))
        else:
            raise TypeError(f"not a condition: {c!r}")
        self._index[c] = j
        return j

    def op(self, op: str, feature: int, value: float, normalize: bool, value2: float = 0.0,
           when: Optional[Condition] = None) -> int:
        w = 0 if when is None else 1 + self.condition(when)
        return self._push((feature, OPS[op], value, int(normalize), value2, w, 0, 0, 0))

    def _push(self, row: tuple) -> int:
        self.rows.append(row)
        return len(self.rows) - 1

    def array(self) -> np.ndarray:
        arr = np.zeros(len(self.rows), dtype=ITEM_DTYPE)
        for j, r in enumerate(self.rows):
            arr[j] = r
        return arr


# ---- JSON ----
_OP_FIELDS = {
    "add": {"value", "strength"}, "clamp": {"value"}, "scale": {"value", "factor"}, "ablate": set(),
    "cap": {"max", "min"}, "rescale": {"value"},
}
_COMMON_FIELDS = {"op", "feature", "when", "normalize"}


class SpecError(ValueError):
    """A steering spec that cannot be used; the message names the field (e.g. ops[2].max)."""


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise SpecError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{where}: expected an integer, got {v!r}")
    return v


def condition_from_json(obj: Any, where: str = "when") -> Condition:
    if not isinstance(obj, Mapping):
        raise SpecError(f"{where}: expected an object, got {obj!r}")
    for key in ("all", "any"):
        if key in obj:
            if set(obj) != {key}:
                raise SpecError(f"{where}: {key!r} takes no other fields, got {sorted(obj)}")
            parts = obj[key]
            if not isinstance(parts, list) or not parts:
                raise SpecError(f"{where}.{key}: expected a non-empty list of conditions")
            conds = [condition_from_json(p, f"{where}.{key}[{i}]") for i, p in enumerate(parts)]
            out = conds[0]
            for c in conds[1:]:
                out = (out & c) if key == "all" else (out | c)
            return out
    unknown = set(obj) - {"feature", "above", "below", "latch"}
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
    if "feature" not in obj:
        raise SpecError(f"{where}.feature: missing")
    feature = _int(obj["feature"], f"{where}.feature")
    above = _number(obj["above"], f"{where}.above") if obj.get("above") is not None else None
    below = _number(obj["below"], f"{where}.below") if obj.get("below") is not None else None
    if above is None and below is None:
        raise SpecError(f"{where}: give 'above' and/or 'below'")
    latch = obj.get("latch", False)
    if not isinstance(latch, bool):
        raise SpecError(f"{where}.latch: expected true or false, got {latch!r}")
    return When(feature, above=above, below=below, latch=latch)


def positions_from_json(obj: Any, where: str = "positions") -> Union[str, Tuple[int, Optional[int]]]:
    from .steering import POSITIONS

    if isinstance(obj, str):
        if obj not in POSITIONS:
            raise SpecError(f"{where}: expected one of {POSITIONS} or {{\"from\": a, \"to\": b}}, got {obj!r}")
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"from", "to"}
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
        start = _int(obj.get("from", 0), f"{where}.from")
        end = None if obj.get("to") is None else _int(obj["to"], f"{where}.to")
        if start < 0 or (end is not None and end < start):
            raise SpecError(f"{where}: needs 0 <= from <= to, got from={start}, to={end}")
        return (start, end)
    raise SpecError(f"{where}: expected a string or an object, got {obj!r}")


def steering_from_json(obj: Any, saes: Any, where: str = "spec"):
    """A Steering from one JSON object. `saes`: one SAE, or {layer: SAE} (the object's "layer"
    picks one; without it the single SAE's own layer is used)."""
    from .sae import SAE
    from .steering import Steering

    if not isinstance(obj, Mapping):
        raise SpecError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = set(obj) - {"layer", "positions", "normalize", "ops", "stop_when", "sae"}
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}")
    layer = obj.get("layer")
    if layer is not None:
        layer = _int(layer, f"{where}.layer")
    if isinstance(saes, SAE):
        sae = saes
    else:
        if layer is None:
            if len(saes) != 1:
                raise SpecError(f"{where}.layer: missing (SAEs are loaded for layers {sorted(saes)})")
            layer = next(iter(saes))
        if layer not in saes:
            raise SpecError(f"{where}.layer: no SAE for layer {layer} (loaded: {sorted(saes)})")
        sae = saes[layer]
    normalize = obj.get("normalize", False)
    if not isinstance(normalize, bool):
        raise SpecError(f"{where}.normalize: expected true or false, got {normalize!r}")
    positions = positions_from_json(obj.get("positions", "all"), f"{where}.positions")
    try:
        st = Steering(sae, layer=layer, positions=positions, normalize=normalize)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None
    ops = obj.get("ops", [])
    if not isinstance(ops, list):
        raise SpecError(f"{where}.ops: expected a list")
    for i, o in enumerate(ops):
        _op_from_json(st, o, f"{where}.ops[{i}]")
    stops = obj.get("stop_when", [])
    if isinstance(stops, Mapping):
        stops = [stops]
    if not isinstance(stops, list):
        raise SpecError(f"{where}.stop_when: expected a list of conditions")
    for i, c in enumerate(stops):
        cond = condition_from_json(c, f"{where}.stop_when[{i}]")
        _checked(lambda: st.stop_when(cond), f"{where}.stop_when[{i}]")
    if not st.ops and not st.stops:
        raise SpecError(f"{where}.ops: no operation and no stop_when")
    return st


def _checked(fn, where: str):
    try:
        return fn()
    except (ValueError, IndexError, TypeError) as e:
        raise SpecError(f"{where}: {e}") from None


def _op_from_json(st, o: Any, where: str) -> None:
    if not isinstance(o, Mapping):
        raise SpecError(f"{where}: expected an object")
    name = o.get("op")
    if name not in _OP_FIELDS:
        raise SpecError(f"{where}.op: expected one of {sorted(_OP_FIELDS)}, got {name!r}")
    unknown = set(o) - _COMMON_FIELDS - _OP_FIELDS[name]
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)} for op {name!r}")
    if "feature" not in o:
        raise SpecError(f"{where}.feature: missing")
    f = _int(o["feature"], f"{where}.feature")
    when = condition_from_json(o["when"], f"{where}.when") if o.get("when") is not None else None
    norm = o.get("normalize")
    if norm is not None and not isinstance(norm, bool):
        raise SpecError(f"{where}.normalize: expected true or false, got {norm!r}")

    def value(*keys: str) -> float:
        for k in keys:
            if k in o:
                return _number(o[k], f"{where}.{k}")
        raise SpecError(f"{where}.{keys[0]}: missing")

    if name == "cap":
        hi = _number(o["max"], f"{where}.max") if o.get("max") is not None else None
        lo = _number(o["min"], f"{where}.min") if o.get("min") is not None else None
        _checked(lambda: st.cap(f, max=hi, min=lo, when=when), where)
    elif name == "rescale":
        _checked(lambda: st.rescale(f, value("value"), when=when), where)
    elif name == "ablate":
        _checked(lambda: st.ablate(f, normalize=norm, when=when), where)
    else:
        keys = {"add": ("value", "strength"), "clamp": ("value",), "scale": ("value", "factor")}[name]
        _checked(lambda: getattr(st, name)(f, value(*keys), normalize=norm, when=when), where)


def steering_to_json(st) -> Dict[str, Any]:
    """The JSON object of a Steering (steering_from_json(steering_to_json(st), sae) rebuilds it)."""
    out: Dict[str, Any] = {"layer": st.layer}
    if isinstance(st.positions, tuple):
        out["positions"] = {"from": st.positions[0], "to": st.positions[1]}
    else:
        out["positions"] = st.positions
    out["normalize"] = st.normalize
    ops = []
    for o in st.ops:
        j: Dict[str, Any] = {"op": o.op, "feature": o.feature}
        if o.op == "cap":
            if math.isfinite(o.value):
                j["max"] = o.value
            if math.isfinite(o.value2):
                j["min"] = o.value2
        elif o.op != "ablate":
            j["value"] = o.value
        if o.op in ("add", "clamp", "scale", "ablate") and o.normalize != st.normalize:
            j["normalize"] = o.normalize
        if o.when is not None:
            j["when"] = o.when.to_json()
        ops.append(j)
    out["ops"] = ops
    if st.stops:
        out["stop_when"] = [c.to_json() for c in st.stops]
    return out


def load_spec(source: Any, saes: Any) -> List[Any]:
    """Steerings from a JSON file path, a JSON string, or parsed JSON (an object or a list)."""
    if isinstance(source, str):
        text = source
        if not source.lstrip().startswith(("{", "[")):
            try:
                with open(source, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as e:
                raise SpecError(f"{source}: cannot read the spec file ({e.strerror})") from None
        try:
            source = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
    objs = source if isinstance(source, list) else [source]
    if not objs:
        raise SpecError("spec: an empty list")
    where = (lambda i: f"spec[{i}]") if isinstance(source, list) else (lambda i: "spec")
    return [steering_from_json(o, saes, where(i)) for i, o in enumerate(objs)]
