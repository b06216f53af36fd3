"""Zero-copy plumbing between numpy arrays / torch tensors and the compiled kernels.

Everything reaches the C API as an address plus shape, so a contiguous float32 array, a torch
CPU tensor, or an mmapped file is used in place. bfloat16 has no numpy dtype: it travels as
uint16 with an explicit dtype tag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

# Byte alignment of the weight arrays saehook allocates (conversions, quantization, transposed
# copies) and of the tensors in the files it writes: a 64-byte row start is a whole cache line
# and a whole AMX tile row. numpy places large arrays 16 bytes past a page; with bf16 / int8
# weights there, the avx512_amx encode at 4096 x 65536 took 1.17x (bf16) / 1.13x (int8) the
# time at batch 256 and 1.09x (bf16) at batch 64 on the Sapphire Rapids-class VM (f32 and
# batch 1 unchanged).
WEIGHT_ALIGN = 64

# Codes of saehook_dtype in csrc/include/saehook.h.
DTYPE_CODES = {"f32": 0, "f16": 1, "bf16": 2, "int8": 3}
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}
_DTYPE_ALIASES = {
    "f32": "f32", "float32": "f32", "float": "f32", "fp32": "f32",
    "f16": "f16", "float16": "f16", "half": "f16", "fp16": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8", "i8": "int8", "q8": "int8",
}


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts at a multiple of WEIGHT_ALIGN bytes
    (a view into a slightly larger buffer, which it keeps alive)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    buf = np.empty(n + WEIGHT_ALIGN, np.uint8)
    off = -buf.ctypes.data % WEIGHT_ALIGN
    return buf[off:off + n].view(dt).reshape(shape)


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous copy of `a` (converted to `dtype` when given) at a WEIGHT_ALIGN boundary."""
    out = aligned_empty(np.shape(a), a.dtype if dtype is None else dtype)
    out[...] = a
    return out


def canonical_dtype(name: Any) -> str:
    """'float32', 'bf16', torch.bfloat16, np.float16, ... -> one of f32, f16, bf16, int8."""
    key = str(name).replace("torch.", "").lower()
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    try:
        key = np.dtype(name).name
    except TypeError:
        pass
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise ValueError(f"unknown dtype {name!r}; expected one of f32, f16, bf16, int8")


def is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "data_ptr")


def torch_to_numpy(t: Any) -> Tuple[np.ndarray, str]:
    """A CPU torch tensor as a numpy view (bf16 as uint16) and its dtype tag. No copy."""
    import torch

    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bf16"
    tag = {torch.float32: "f32", torch.float16: "f16", torch.int8: "int8"}.get(t.dtype)
    if tag is None:
        raise TypeError(f"unsupported tensor dtype {t.dtype}")
    return t.numpy(), tag


def as_weight(a: Any, name: str, dtype: Optional[str] = None) -> Tuple[np.ndarray, str]:
    """A weight matrix/vector as a C-contiguous numpy array and its dtype tag.

    Views stay views (mmapped files stay mmapped); only a non-contiguous input is copied.
    `dtype='bf16'` marks a uint16 array as bfloat16 bits.
    """
    if is_torch(a):
        arr, tag = torch_to_numpy(a)
    else:
        arr = np.asarray(a)
        if dtype is not None and canonical_dtype(dtype) == "bf16":
            if arr.dtype not in (np.uint16, np.int16):
                raise TypeError(f"{name}: bf16 weights must be given as uint16 bits, got {arr.dtype}")
            arr, tag = arr.view(np.uint16), "bf16"
        elif arr.dtype == np.float32:
            tag = "f32"
        elif arr.dtype == np.float16:
            tag = "f16"
        elif arr.dtype == np.int8:
            tag = "int8"
        elif arr.dtype == np.float64:
            arr, tag = aligned_copy(arr, np.float32), "f32"
        else:
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
    if not arr.flags.c_contiguous:
        arr = aligned_copy(arr)
    return arr, tag


def as_f32_vector(a: Any, n: int, name: str) -> Optional[np.ndarray]:
    """A small float32 vector (biases, thresholds, scales); converted if needed (cheap)."""
    if a is None:
        return None
    if is_torch(a):
        a = a.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.float32)).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} elements, expected {n}")
    return arr


def address(a: Optional[np.ndarray]) -> int:
    return 0 if a is None else int(a.ctypes.data)


@dataclass
class Rows:
    """A batch of activation rows as the kernels see them (n rows of d floats, row stride ld)."""

    ptr: int
    n: int
    ld: int
    batch_shape: Tuple[int, ...]
    torch: bool
    obj: Any  # the float32 array/tensor whose memory ptr points into (kept alive)


def rows(x: Any, d_model: int, *, writable: bool = False, name: str = "x") -> Rows:
    """Views x (..., d_model) as float32 rows without copying when possible.

    With writable=True the rows are modified in place, so x itself must be float32 with a
    contiguous last dimension and rows the kernels can write one by one: a converted copy would
    silently drop the change, so rows that overlap (as_strided, broadcast), rows whose stride is
    not a whole number of floats, and a torch tensor that requires grad (the change would have
    no gradient) are refused. Call mark_written(rows) after writing.
    """
    if is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; this operation runs on CPU tensors")
        if x.dim() == 0 or x.shape[-1] != d_model:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (..., {d_model}) (d_model mismatch)")
        if writable:
            check_no_grad(x, name)
        if x.dtype != torch.float32 or (x.stride(-1) != 1 and d_model > 1):
            if writable:
                raise TypeError(f"{name} must be a float32 tensor with a contiguous last dimension to be changed in place")
            x = x.detach().to(torch.float32).contiguous()
        batch = tuple(x.shape[:-1])
        if x.dim() == 2:
            t2 = x
        else:
            try:
                t2 = x.view(-1, d_model)
            except RuntimeError:
                if writable:
                    raise TypeError(f"{name} cannot be viewed as rows in place; make it contiguous")
                t2 = x.reshape(-1, d_model).contiguous()
        n = t2.shape[0]
        ld = t2.stride(0) if n > 1 else d_model
        if ld < d_model:  # overlapping rows (as_strided, expand)
            if writable:
                raise ValueError(f"{name}: its rows overlap in memory (row stride {ld} < d_model {d_model}); "
                                 "steering them in place cannot be right; pass a contiguous tensor")
            t2 = t2.contiguous()
            ld = d_model
        return Rows(t2.data_ptr(), n, ld, batch, True, t2)
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[-1] != d_model:
        raise ValueError(f"{name} has shape {arr.shape}; expected (..., {d_model}) (d_model mismatch)")
    if arr.dtype != np.float32 or (arr.strides[-1] != 4 and d_model > 1):
        if writable:
            raise TypeError(f"{name} must be a float32 array with a contiguous last dimension to be changed in place")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} is read-only")
    batch = arr.shape[:-1]
    if arr.ndim == 2:
        a2 = arr
    else:
        a2 = _rows_view(arr, d_model)
        if a2 is None:
            if writable:
                raise TypeError(f"{name} cannot be viewed as rows in place; make it contiguous")
            a2 = np.ascontiguousarray(arr).reshape(-1, d_model)
    n = a2.shape[0]
    stride = a2.strides[0] if n > 1 else 4 * d_model
    if stride % 4 or stride < 4 * d_model:
        if writable:
            why = (f"its row stride of {stride} bytes is not a whole number of float32s" if stride % 4 else
                   f"its rows overlap in memory (row stride {stride} bytes < {4 * d_model})")
            raise ValueError(f"{name}: {why}; it cannot be changed in place; pass a contiguous array")
        a2 = np.ascontiguousarray(a2)
        stride = 4 * d_model
    return Rows(int(a2.ctypes.data) if n else 0, n, stride // 4, batch, False, a2)


def _rows_view(arr: np.ndarray, d_model: int) -> Optional[np.ndarray]:
    """arr (..., d_model) as a (rows, d_model) view of the same memory, or None if that needs a copy."""
    try:
        return arr.reshape((-1, d_model), copy=False)  # numpy >= 2.1: raises instead of copying
    except ValueError:
        return None
    except TypeError:  # older numpy: setting the shape of a view raises instead of copying
        v = arr.view()
        try:
            v.shape = (-1, d_model)
        except AttributeError:
            return None
        return v


def check_no_grad(t: Any, name: str) -> None:
    """Refuses an in-place kernel on a tensor autograd tracks: the kernel has no gradient, so the
    backward pass would treat the change as if it had not happened."""
    import torch

    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad: saehook's in-place kernels have no gradient; run them under "
            "torch.no_grad() on a tensor that does not require grad (saehook.hf.steer adds the change "
            "as a constant instead)")


def mark_written(r: Rows) -> None:
    """Tells autograd that r's tensor was changed in place (bumps its version counter), so a
    backward pass that saved it raises as for torch's own in-place ops instead of using the new
    values silently."""
    if r.torch:
        import torch

        torch.autograd.graph.increment_version(r.obj)


def feature_indices(indices: Any, d_sae: int, name: str = "indices") -> Any:
    """Feature indices (numpy or torch) as contiguous int32, refusing what would not convert
    exactly: bool and non-integer dtypes, and values outside [0, d_sae) other than the padding
    index -1 (int64 2**32 + 5 would wrap to 5 in int32). int32 arrays are range-checked by the
    kernels; other integer dtypes here, before the conversion (one pass over n x k values)."""
    if is_torch(indices):
        import torch

        t = indices.detach()
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.dtype != torch.int32 and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < -1 or hi >= d_sae:
                bad = lo if lo < -1 else hi
                raise IndexError(f"{name}: feature index {bad} is out of range [0, {d_sae}) (-1 is padding)")
        return t.to(torch.int32).contiguous()
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got {arr.dtype}")
    if arr.dtype != np.int32 and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -1 or hi >= d_sae:
            bad = lo if lo < -1 else hi
            raise IndexError(f"{name}: feature index {bad} is out of range [0, {d_sae}) (-1 is padding)")
    return np.ascontiguousarray(arr, dtype=np.int32)


def empty_like_kind(torch_kind: bool, shape, dtype: str):
    """A new output buffer of numpy or torch kind ('f32' or 'i32')."""
    if torch_kind:
        import torch

        return torch.empty(shape, dtype=torch.float32 if dtype == "f32" else torch.int32)
    return np.empty(shape, dtype=np.float32 if dtype == "f32" else np.int32)


def buffer_address(buf: Any) -> int:
    if is_torch(buf):
        return buf.data_ptr() if buf.numel() else 0
    return int(buf.ctypes.data) if buf.size else 0
