"""Steering specifications shared by every engine integration (numpy, torch, transformers,
llama.cpp): which features of which SAE to add / clamp / scale / ablate / cap / rescale at which
layer, under which conditions (steering_spec.When), until which stop condition."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from . import _core
from ._arrays import mark_written, rows
from .sae import SAE, _threads
from .steering_spec import ITEM_DTYPE, OPS, Condition, ItemBuilder, When  # noqa: F401 (re-exported)

_F32_MAX = float(np.finfo(np.float32).max)

POSITIONS = ("all", "prompt", "generated")  # or a window (start, end) of absolute positions

assert ITEM_DTYPE.itemsize == _core.STEER_ITEM_SIZE


def _as_int(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SteerOp:
    op: str
    feature: int
    value: float
    normalize: bool
    value2: float = 0.0                # cap: the lower bound (value is the upper one)
    when: Optional[Condition] = None   # applies only on rows where this holds


class Steering:
    """Interventions on one SAE's features at one layer, applied with a single encode.

        Steering(sae, layer=12).add(f, 8.0).clamp(g, 0.0).scale(h, 2.0).ablate(i)

    add:    h += s * d_f                      (needs no encode)
    clamp:  h += (v - z_f) * d_f              (z_f: f's activation in the Top-K, else 0)
    scale:  h += (c - 1) * z_f * d_f
    ablate: clamp to 0
    cap:     h += (clip(p_f, min, max) - p_f) * u_f  (p_f = h . u_f, u_f = d_f / ||d_f||; no encode)
    rescale: h += (c - 1) * p_f * u_f               (c = 0 removes the direction; no encode)
    Everything the SAE does not explain stays in h. `normalize=True` uses d_f / ||d_f|| (cap and
    rescale always do). Ops apply in order; z_f comes from one encode of the unsteered row, p_f
    from the row as the earlier ops left it.
    when=saehook.When(g, above=t): the op applies only on rows where z_g > t (see steering_spec).
    stop_when(When(...)): engines stop generating at the first generated token where it holds.
    `positions` chooses the tokens steered by engine hooks: 'all', 'prompt', 'generated', or a
    window (start, end) of absolute token positions start <= pos < end (end None: no end).
    """

    def __init__(self, sae: SAE, layer: Optional[int] = None, *,
                 positions: Union[str, Tuple[int, Optional[int]]] = "all", normalize: bool = False):
        if not isinstance(sae, SAE):
            raise TypeError(f"Steering needs an SAE, got {type(sae).__name__}")
        positions = _check_positions(positions)
        if layer is None:
            layer = sae.layer
        elif _as_int(sae.layer) is not None and int(layer) != _as_int(sae.layer):
            warnings.warn(f"Steering at layer {int(layer)} with an SAE trained for layer {_as_int(sae.layer)}: its "
                          "features describe another layer's residual stream", UserWarning, stacklevel=2)
        self.sae = sae
        self.layer = None if layer is None else int(layer)
        self.positions = positions
        self.normalize = bool(normalize)
        self.ops: List[SteerOp] = []
        self.stops: List[Condition] = []

    def _feature(self, feature: int) -> int:
        f = int(feature)
        if not 0 <= f < self.sae.d_sae:
            raise IndexError(f"feature {f} is out of range [0, {self.sae.d_sae})")
        return f

    def _condition(self, when: Optional[Condition]) -> Optional[Condition]:
        if when is None:
            return None
        if not isinstance(when, Condition):
            raise TypeError(f"when= takes a saehook.When condition, got {type(when).__name__}")
        for g in when.features():
            if not 0 <= g < self.sae.d_sae:
                raise IndexError(f"condition feature {g} is out of range [0, {self.sae.d_sae})")
        return when

    def _push(self, op: str, feature: int, value: float, normalize: Optional[bool],
              when: Optional[Condition] = None, value2: float = 0.0) -> "Steering":
        f = self._feature(feature)
        v = float(value)
        if not np.isfinite(v):
            raise ValueError(f"steering value for feature {f} is not finite: {value!r}")
        if abs(v) > _F32_MAX:  # the kernels take float32
            raise ValueError(f"{op}({f}, {value!r}): the value overflows float32 (largest {_F32_MAX:.4g})")
        norm = self.normalize if normalize is None else bool(normalize)
        if op == "add":
            # value * d_f must be finite too (clamp/scale depend on the input: the kernels check those).
            dmax = float(np.abs(self.sae.decoder_direction(f, norm)).max())
            if abs(v) * dmax > _F32_MAX:
                raise ValueError(f"add({f}, {value!r}): the value times the feature's decoder direction "
                                 f"(largest |component| {dmax:.4g}) overflows float32")
        self.ops.append(SteerOp(op, f, v, norm, value2, self._condition(when)))
        return self

    def add(self, feature: int, strength: float, *, normalize: Optional[bool] = None,
            when: Optional[Condition] = None) -> "Steering":
        return self._push("add", feature, strength, normalize, when)

    def clamp(self, feature: int, value: float, *, normalize: Optional[bool] = None,
              when: Optional[Condition] = None) -> "Steering":
        return self._push("clamp", feature, value, normalize, when)

    def scale(self, feature: int, factor: float, *, normalize: Optional[bool] = None,
              when: Optional[Condition] = None) -> "Steering":
        return self._push("scale", feature, factor, normalize, when)

    def ablate(self, feature: int, *, normalize: Optional[bool] = None,
               when: Optional[Condition] = None) -> "Steering":
        return self._push("ablate", feature, 0.0, normalize, when)

    def cap(self, feature: int, max: Optional[float] = None, min: Optional[float] = None, *,
            when: Optional[Condition] = None) -> "Steering":
        """Keeps the projection p_f = h . u_f within [min, max]: only the component along u_f moves,
        and only where p_f is outside the bound (no encode unless `when` is given)."""
        f = self._feature(feature)
        if max is None and min is None:
            raise ValueError(f"cap of feature {f}: give max= and/or min=")
        hi = float("inf") if max is None else float(max)
        lo = float("-inf") if min is None else float(min)
        for name, v in (("max", max), ("min", min)):
            if v is not None and not np.isfinite(float(v)):
                raise ValueError(f"cap of feature {f}: {name} is not finite: {v!r}")
            if v is not None and abs(float(v)) > _F32_MAX:  # the kernels take float32
                raise ValueError(f"cap of feature {f}: {name} {v!r} overflows float32 (largest {_F32_MAX:.4g})")
        if lo > hi:
            raise ValueError(f"cap of feature {f}: min {lo:g} > max {hi:g}")
        self.ops.append(SteerOp("cap", f, hi, True, lo, self._condition(when)))
        return self

    def rescale(self, feature: int, factor: float, *, when: Optional[Condition] = None) -> "Steering":
        """Multiplies the projection p_f = h . u_f by `factor` (0 removes the direction; no encode
        unless `when` is given)."""
        return self._push("rescale", feature, factor, True, when)

    def stop_when(self, *conditions: Condition) -> "Steering":
        """Engines stop generating at the first generated token on which one of the conditions
        holds (and report which); they change nothing in h."""
        for c in conditions:
            if self._condition(c) is None:
                raise TypeError("stop_when takes saehook.When conditions")
            self.stops.append(c)
        return self

    @property
    def additive_only(self) -> bool:
        """True when no op needs the encoder or the row (the whole spec is one fixed vector)."""
        return all(o.op == "add" and o.when is None for o in self.ops) and not self.stops

    @property
    def needs_encode(self) -> bool:
        """Whether applying reads the encoder (clamp/scale/ablate, a condition, a stop)."""
        return bool(self.stops) or any(o.op in ("clamp", "scale", "ablate") or o.when is not None for o in self.ops)

    @property
    def latched(self) -> bool:
        """Whether a condition latches (then engines keep state per sequence)."""
        items = self.items()
        return bool(items["latch"].any())

    def _build(self) -> Tuple[np.ndarray, List[int]]:
        b = ItemBuilder()
        for o in self.ops:
            b.op(o.op, o.feature, o.value, o.normalize, o.value2, o.when)
        stop_items = [b.condition(c) for c in self.stops]
        return b.array(), stop_items

    def items(self) -> np.ndarray:
        """The ops (and conditions) as an array of saehook_steer_item (for the C API)."""
        return self._build()[0]

    def stop_items(self) -> List[int]:
        """Index in items() of the condition item of each stop_when condition."""
        return self._build()[1]

    def position_mask(self, positions: Any, generated: Any) -> np.ndarray:
        """Which rows the `positions` setting steers, from their absolute positions and whether
        each is a generated token (the engines decide both)."""
        pos = np.asarray(positions).reshape(-1)
        gen = np.broadcast_to(np.asarray(generated, dtype=bool).reshape(-1) if np.ndim(generated) else
                              np.asarray(generated, dtype=bool), pos.shape)
        if isinstance(self.positions, tuple):
            start, end = self.positions
            return (pos >= start) & (pos < (end if end is not None else np.iinfo(np.int64).max))
        if self.positions == "prompt":
            return ~gen
        if self.positions == "generated":
            return gen.copy()
        return np.ones(pos.shape, dtype=bool)

    def vector(self) -> np.ndarray:
        """The summed additive direction (d_model,) of an add-only spec (a control vector)."""
        if not self.additive_only:
            raise ValueError("only an add-only Steering is a fixed vector; clamp/scale/ablate/cap/rescale, "
                             "conditions and stops depend on the input")
        v = np.zeros(self.sae.d_model, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for o in self.ops:
                v += o.value * self.sae.decoder_direction(o.feature, o.normalize)
        if not np.isfinite(v).all():
            raise OverflowError("the summed steering vector overflows float32; use smaller strengths")
        return v

    def apply(self, x: Any, *, mask: Any = None, threads: Optional[int] = None,
              state: Optional["SteeringState"] = None, slots: Any = None) -> Any:
        """Steers rows of x (..., d_model, float32) in place and returns x. `mask` (one bool per
        row) limits the rows changed. Latched conditions remember across calls in `state` (per
        sequence: row r is sequence `slots[r]`, default 0), else within this call. x's rows must
        not overlap and a torch x must not require grad (see _arrays.rows); x (and the state) is
        unchanged when the call fails (OverflowError when a steered row would overflow float32)."""
        self.apply_report(x, mask=mask, threads=threads, state=state, slots=slots)
        return x

    def apply_report(self, x: Any, *, mask: Any = None, threads: Optional[int] = None,
                     state: Optional["SteeringState"] = None, slots: Any = None) -> np.ndarray:
        """apply(), returning `fired` (n_rows, len(items())) bool: per row, whether each condition
        item held and each op item was applied (stop_items() index the stop conditions)."""
        r = rows(x, self.sae.d_model, writable=True)
        items = self.items() if state is None else state.items
        fired = np.zeros((r.n, len(items)), dtype=np.uint8)
        m = None
        if mask is not None:
            m = np.ascontiguousarray(np.asarray(mask, dtype=bool).reshape(-1)).view(np.uint8)
            if m.shape[0] != r.n:
                raise ValueError(f"mask has {m.shape[0]} entries for {r.n} rows")
        sl = None
        if slots is not None:
            sl = np.ascontiguousarray(np.asarray(slots).reshape(-1), dtype=np.int32)
            if sl.shape[0] != r.n:
                raise ValueError(f"slots has {sl.shape[0]} entries for {r.n} rows")
        if state is not None and state.steering is not self:
            raise ValueError("the SteeringState belongs to another Steering")
        latch = state.latch if state is not None else None
        # without a state, latches hold within this call, per slot
        n_slots = latch.shape[0] if latch is not None else (int(sl.max()) + 1 if sl is not None and len(sl) else 1)
        if sl is not None and len(sl) and int(sl.min()) < 0:
            raise ValueError(f"slots must be >= 0, got {int(sl.min())}")
        if r.n and len(items):
            _core.steer_ex(self.sae._handle, r.ptr, r.n, r.ld, items.ctypes.data, len(items),
                           0 if m is None else m.ctypes.data, 0, 0, 0,
                           0 if latch is None else latch.ctypes.data, 0 if sl is None else sl.ctypes.data,
                           n_slots, fired.ctypes.data, _threads(threads), 0)
            mark_written(r)
        return fired.view(bool)

    def __repr__(self) -> str:
        def one(o: SteerOp) -> str:
            if o.op == "cap":
                args = "".join(f", {n}={v:g}" for n, v in (("max", o.value), ("min", o.value2)) if np.isfinite(v))
            else:
                args = "" if o.op == "ablate" else ", " + format(o.value, "g")
            return f"{o.op}({o.feature}{args}{'' if o.when is None else f', when={o.when!r}'})"

        ops = ", ".join(one(o) for o in self.ops)
        stops = f", stop_when={self.stops!r}" if self.stops else ""
        return f"Steering(layer={self.layer}, positions={self.positions!r}, [{ops}]{stops})"


class SteeringState:
    """The latch memory of one Steering, per sequence slot (engines keep one per sequence id and
    reset a slot when its sequence is cleared). The Steering must not change while it is used."""

    def __init__(self, steering: Steering, n_slots: int = 1):
        self.steering = steering
        self.items = steering.items()
        self.latch = np.zeros((max(1, int(n_slots)), len(self.items)), dtype=np.uint8)

    def reset(self, slot: Optional[int] = None) -> None:
        if slot is None:
            self.latch[:] = 0
        else:
            self.latch[int(slot)] = 0


def _check_positions(positions: Any) -> Union[str, Tuple[int, Optional[int]]]:
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or a window (start, end), got {positions!r}")
        return positions
    if isinstance(positions, (tuple, list)) and len(positions) == 2:
        start, end = positions
        if isinstance(start, (int, np.integer)) and not isinstance(start, bool) and \
                (end is None or (isinstance(end, (int, np.integer)) and not isinstance(end, bool))):
            start, end = int(start), None if end is None else int(end)
            if start >= 0 and (end is None or end >= start):
                return (start, end)
    raise ValueError(f"positions must be one of {POSITIONS} or a window (start, end) with 0 <= start <= end, "
                     f"got {positions!r}")
