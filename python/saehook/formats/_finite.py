"""The load-time check that an SAE's weights hold no NaN or Inf.

A NaN in W_enc or b_enc makes a feature's pre-activation NaN (it never ranks, or poisons the
Top-K); one in W_dec or b_dec reaches the residual stream. The check reads every weight once,
in chunks of _CHUNK elements, so it needs no full-size temporary whatever the file's size:

- f32: the chunk's min and max (NaN propagates through both; +-Inf is one of them), no temporary;
- f16 / bf16: on the raw 16 bits, no float conversion: a value is NaN or Inf exactly when its
  exponent bits are all ones, i.e. (bits & 0x7fff) >= 0x7c00 (f16) or >= 0x7f80 (bf16); one
  reused uint16 buffer per chunk;
- int8 encoders: the codes are finite by construction; their f32 scales are checked.

Cost: one sequential read of the weights (README "Memory"); on a mapped file that also brings
it into the page cache, which the first encode would do anyway.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_CHUNK = 1 << 20  # elements per step: 4 MiB of f32, small enough to stay in cache for min+max
_EXP_ALL_ONES = {"f16": 0x7C00, "bf16": 0x7F80}


class NonFiniteError(ValueError):
    pass


def first_non_finite(arr: np.ndarray, tag: str) -> Optional[int]:
    """Flat index of the first NaN/Inf in `arr` (stored as tag f32/f16/bf16/int8), or None."""
    if tag == "int8" or arr.size == 0:
        return None
    flat = arr.reshape(-1)  # a view: the SAE's arrays are C-contiguous
    if tag == "f32":
        flat = flat.view(np.float32)
        with np.errstate(invalid="ignore"):
            for start in range(0, flat.size, _CHUNK):
                part = flat[start:start + _CHUNK]
                lo, hi = np.minimum.reduce(part), np.maximum.reduce(part)
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    return start + int(np.flatnonzero(~np.isfinite(part))[0])
        return None
    limit = _EXP_ALL_ONES[tag]
    bits = flat.view(np.uint16)
    buf = np.empty(min(_CHUNK, bits.size), dtype=np.uint16)
    for start in range(0, bits.size, _CHUNK):
        part = bits[start:start + _CHUNK]
        out = np.bitwise_and(part, 0x7FFF, out=buf[:part.size])
        if np.maximum.reduce(out) >= limit:
            return start + int(np.flatnonzero(out >= limit)[0])
    return None


def check_sae(sae, source: str) -> None:
    """Raises NonFiniteError naming the file, the tensor and the position of the first NaN/Inf
    in any of the SAE's weights, biases, thresholds or int8 scales."""
    tags = {"W_enc": sae.enc_dtype, "W_dec": sae.dec_dtype}
    for name, arr in sae.arrays().items():
        if arr is None:
            continue
        tag = tags.get(name, "f32")  # biases, thresholds and scales are float32 vectors
        at = first_non_finite(arr, tag)
        if at is None:
            continue
        where = np.unravel_index(at, arr.shape)
        if name == "W_dec" and sae.dec_layout == "cols":
            what = f"feature {where[1]}, dimension {where[0]}"
        elif arr.ndim == 2:
            what = f"feature {where[0]}, dimension {where[1]}"
        else:
            what = f"index {where[0]}"
        value = _value(arr.reshape(-1)[at], tag)
        raise NonFiniteError(f"{source}: {name} holds a non-finite value ({value} at {what}); the SAE would "
                             f"produce NaN (pass check_finite=False to load it anyway)")


def _value(v, tag: str) -> str:
    if tag == "bf16":
        v = (np.asarray(v, dtype=np.uint32) << 16).view(np.float32)
    return str(float(v))
