"""Steering specifications shared by every engine integration (numpy, torch, transformers,
llama.cpp): which features of which SAE to add / clamp / scale / ablate at which layer."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from . import _core
from ._arrays import mark_written, rows
from .sae import SAE, _threads

_F32_MAX = float(np.finfo(np.float32).max)

OPS = {"add": 0, "clamp": 1, "scale": 2, "ablate": 3}
POSITIONS = ("all", "prompt", "generated")

# Mirrors saehook_steer_item in csrc/include/saehook.h.
ITEM_DTYPE = np.dtype([("feature", "<i4"), ("op", "<i4"), ("value", "<f4"), ("normalize", "<i4")])
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


class Steering:
    """Interventions on one SAE's features at one layer, applied with a single encode.

        Steering(sae, layer=12).add(f, 8.0).clamp(g, 0.0).scale(h, 2.0).ablate(i)

    add:    h += s * d_f                      (needs no encode)
    clamp:  h += (v - z_f) * d_f              (z_f: f's activation in the Top-K, else 0)
    scale:  h += (c - 1) * z_f * d_f
    ablate: clamp to 0
    Everything the SAE does not explain stays in h. `normalize=True` uses d_f / ||d_f||.
    `positions` chooses the tokens steered by engine hooks: 'all', 'prompt' or 'generated'.
    """

    def __init__(self, sae: SAE, layer: Optional[int] = None, *, positions: str = "all",
                 normalize: bool = False):
        if not isinstance(sae, SAE):
            raise TypeError(f"Steering needs an SAE, got {type(sae).__name__}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
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

    def _push(self, op: str, feature: int, value: float, normalize: Optional[bool]) -> "Steering":
        f = int(feature)
        if not 0 <= f < self.sae.d_sae:
            raise IndexError(f"feature {f} is out of range [0, {self.sae.d_sae})")
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
        self.ops.append(SteerOp(op, f, v, norm))
        return self

    def add(self, feature: int, strength: float, *, normalize: Optional[bool] = None) -> "Steering":
        return self._push("add", feature, strength, normalize)

    def clamp(self, feature: int, value: float, *, normalize: Optional[bool] = None) -> "Steering":
        return self._push("clamp", feature, value, normalize)

    def scale(self, feature: int, factor: float, *, normalize: Optional[bool] = None) -> "Steering":
        return self._push("scale", feature, factor, normalize)

    def ablate(self, feature: int, *, normalize: Optional[bool] = None) -> "Steering":
        return self._push("ablate", feature, 0.0, normalize)

    @property
    def additive_only(self) -> bool:
        """True when no op needs the encoder (the whole spec is one fixed vector)."""
        return all(o.op == "add" for o in self.ops)

    def items(self) -> np.ndarray:
        """The ops as an array of saehook_steer_item (for the C API)."""
        arr = np.zeros(len(self.ops), dtype=ITEM_DTYPE)
        for j, o in enumerate(self.ops):
            arr[j] = (o.feature, OPS[o.op], o.value, int(o.normalize))
        return arr

    def vector(self) -> np.ndarray:
        """The summed additive direction (d_model,) of an add-only spec (a control vector)."""
        if not self.additive_only:
            raise ValueError("only an add-only Steering is a fixed vector; clamp/scale/ablate depend on the input")
        v = np.zeros(self.sae.d_model, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for o in self.ops:
                v += o.value * self.sae.decoder_direction(o.feature, o.normalize)
        if not np.isfinite(v).all():
            raise OverflowError("the summed steering vector overflows float32; use smaller strengths")
        return v

    def apply(self, x: Any, *, mask: Any = None, threads: Optional[int] = None) -> Any:
        """Steers rows of x (..., d_model, float32) in place and returns x. `mask` (one bool per
        row) limits the rows changed. x's rows must not overlap and a torch x must not require
        grad (see _arrays.rows); x is unchanged when the call fails (OverflowError when a steered
        row would overflow float32)."""
        r = rows(x, self.sae.d_model, writable=True)
        items = self.items()
        m = None
        if mask is not None:
            m = np.ascontiguousarray(np.asarray(mask, dtype=bool).reshape(-1)).view(np.uint8)
            if m.shape[0] != r.n:
                raise ValueError(f"mask has {m.shape[0]} entries for {r.n} rows")
        if r.n and len(items):
            _core.steer(self.sae._handle, r.ptr, r.n, r.ld, items.ctypes.data, len(items),
                        0 if m is None else m.ctypes.data, 0, 0, 0, _threads(threads), 0)
            mark_written(r)
        return x

    def __repr__(self) -> str:
        ops = ", ".join(f"{o.op}({o.feature}{'' if o.op == 'ablate' else ', ' + format(o.value, 'g')})" for o in self.ops)
        return f"Steering(layer={self.layer}, positions={self.positions!r}, [{ops}])"
