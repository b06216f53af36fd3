"""saehook's CUDA kernels over torch CUDA tensors.

    import saehook, saehook.cuda
    sae = saehook.load("...")                      # weights in host memory (mmapped)
    gpu = saehook.cuda.to_device(sae, "cuda:0")    # copied to the device once
    vals, idx = gpu.encode(x)                      # x: CUDA tensor (..., d_model)
    x_hat = gpu.decode(vals, idx)
    gpu.reconstruct(h, inplace=True)
    gpu.steer(saehook.Steering(sae).clamp(12, 0.0), h)   # in place

`CudaSAE` has the interface of `saehook.SAE` (encode / decode / reconstruct / preacts /
decoder_direction) plus `steer` (what `Steering.apply` does on the CPU). Every call runs on
torch's current stream of the SAE's device and takes and returns torch tensors on that device.
Weights already on the GPU (a torch SAE's parameters) are used without a copy through
`from_tensors`.

Numerics (see README, "CUDA"): the Top-K order, padding and activations are the CPU's. Which
matrix product runs depends on the weights and the number of rows n of a call:
- float32 weights, n <= 8: saehook's own kernel, float32 products and accumulation, as the CPU.
- float16/bfloat16 weights, n <= 16, and int8 weights, n <= 64: saehook's tensor-core kernel,
  the weights read once per 16 (int8: 32) rows; each row is split into two 16-bit halves
  (hi = round(x), lo = round(x - hi)) so the products carry 22 (f16, int8) or 16 (bf16)
  significant bits of x, with float32 accumulation: near float32, far closer than one rounding.
- more rows: cuBLAS (loaded at run time: the process's own libcublas, e.g. torch's;
  SAEHOOK_CUBLAS_LIBRARY=path picks one) with the rows rounded once to the weights' 16-bit type
  (float16 for int8 weights, whose integer values are exact in it), float32 accumulation.
SAEHOOK_CUBLAS=0 keeps larger batches on saehook's float32 kernels. Errors found on the device
(NaN input, bad decode index) make the call wait for its stream to report them;
SAEHOOK_CUDA_SYNC=0 skips that wait (and the report), and calls inside CUDA-graph capture never
wait.
"""
from __future__ import annotations

import ctypes
import warnings
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import _core
from .._arrays import DTYPE_BYTES, DTYPE_CODES, feature_indices
from ..sae import ACTIVATIONS, DEC_LAYOUTS, SAE

__all__ = ["CudaSAE", "to_device", "from_tensors", "cached", "for_tensor", "is_available", "describe"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency of this module's use
        raise ImportError("saehook.cuda needs torch (pip install torch)") from e
    return torch


def is_available() -> bool:
    """True when this saehook build has CUDA kernels and torch sees a CUDA device."""
    if not _core.cuda_available():
        return False
    try:
        return _torch().cuda.is_available()
    except ImportError:
        return False


def _require_cuda() -> None:
    if not _core.cuda_available():
        raise RuntimeError(
            "this saehook build has no CUDA kernels: it was built without a CUDA toolkit "
            "(reinstall where nvcc is on PATH, or with -Ccmake.define.SAEHOOK_CUDA=ON)"
        )
    if not _torch().cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")


def describe(device: Any = None, *, llm: Any = None) -> str:
    """One line about the CUDA path on a device: which GEMM runs (cuBLAS and its version, or
    saehook's own kernels and why). With `llm` (a saehook.llama.HookedLlama): which path each of
    its hooked layers took at its last micro-batch instead, "device N (CUDAN)" (the SAE on that
    GPU, on the residual's device memory) or "host (why)" (needs neither torch nor a GPU)."""
    if llm is not None:
        built = "with" if _core.cuda_available() else "without"
        paths = "; ".join(f"layer {L}: {p}" for L, p in llm.hook_paths().items()) or "no hooked layer"
        return f"llama.cpp hook (saehook built {built} CUDA): {paths}"
    _require_cuda()
    torch = _torch()
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    lib = ctypes.CDLL(_library_path())
    lib.saehook_cuda_describe.restype = ctypes.c_char_p
    lib.saehook_cuda_describe.argtypes = [ctypes.c_int32]
    return lib.saehook_cuda_describe(dev.index or 0).decode()


def _library_path() -> str:
    from .. import get_library

    return get_library()


def _tag_of(t) -> str:
    torch = _torch()
    tag = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int8: "int8"}.get(t.dtype)
    if tag is None:
        raise TypeError(f"unsupported weight dtype {t.dtype}; expected float32, float16, bfloat16 or int8")
    return tag


def _host_to_device(arr: Optional[np.ndarray], tag: str, device):
    """A host weight array (bf16 as uint16 bits) as a contiguous tensor on the device."""
    if arr is None:
        return None
    torch = _torch()
    a = np.ascontiguousarray(arr)
    if tag == "bf16":
        a = a.view(np.int16)
    with warnings.catch_warnings():  # read-only mmaps: the tensor is only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    if tag == "bf16":
        t = t.view(torch.bfloat16)
    return t.to(device).contiguous()


class CudaSAE:
    """An SAE whose weights live on one CUDA device, run by saehook's CUDA kernels.

    Build it with `to_device(sae)` (copies a host SAE's weights once) or `from_tensors(...)`
    (uses CUDA tensors in place). The tensors are kept alive by this object.
    """

    def __init__(self, W_enc, W_dec, b_enc=None, b_dec=None, *, k: int, activation: str = "topk",
                 subtract_b_dec: bool = False, threshold=None, dec_layout: str = "rows",
                 enc_scales=None, metadata: Optional[Dict[str, Any]] = None, source: Optional[SAE] = None):
        _require_cuda()
        torch = _torch()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if dec_layout not in DEC_LAYOUTS:
            raise ValueError(f"unknown dec_layout {dec_layout!r}; expected 'rows' or 'cols'")
        for name, t in (("W_enc", W_enc), ("W_dec", W_dec)):
            if not torch.is_tensor(t) or t.device.type != "cuda":
                raise ValueError(f"{name} must be a CUDA tensor (use saehook.cuda.to_device for a host SAE)")
        device = W_enc.device
        if W_dec.device != device:
            raise ValueError(f"W_enc is on {device} but W_dec on {W_dec.device}")
        W_enc = W_enc.detach().contiguous()
        W_dec = W_dec.detach().contiguous()
        if W_enc.dim() != 2 or W_dec.dim() != 2:
            raise ValueError(f"W_enc and W_dec must be 2-D, got {tuple(W_enc.shape)} and {tuple(W_dec.shape)}")
        etag, dtag = _tag_of(W_enc), _tag_of(W_dec)
        if dtag == "int8":
            raise TypeError("the decoder must be f32, f16 or bf16 (int8 is for the encoder)")
        d_sae, d_model = W_enc.shape
        expect = (d_sae, d_model) if dec_layout == "rows" else (d_model, d_sae)
        if tuple(W_dec.shape) != expect:
            raise ValueError(f"W_dec has shape {tuple(W_dec.shape)} but W_enc {tuple(W_enc.shape)} with "
                             f"dec_layout={dec_layout!r} needs {expect}")
        if not 1 <= int(k) <= d_sae:
            raise ValueError(f"k = {k} must be between 1 and d_sae = {d_sae}")
        if etag == "int8" and enc_scales is None:
            raise ValueError("an int8 encoder needs enc_scales (one float per feature)")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a jumprelu SAE needs a threshold vector")

        def vec(v, n, name):
            if v is None:
                return None
            t = torch.as_tensor(v, device=device).detach().to(torch.float32).reshape(-1).contiguous()
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
            return t

        self.W_enc, self.W_dec = W_enc, W_dec
        self.b_enc = vec(b_enc, d_sae, "b_enc")
        self.b_dec = vec(b_dec, d_model, "b_dec")
        self.threshold = vec(threshold, d_sae, "threshold") if activation == "jumprelu" else None
        self.enc_scales = vec(enc_scales, d_sae, "enc_scales") if etag == "int8" else None
        if subtract_b_dec and self.b_dec is None:
            raise ValueError("subtract_b_dec=True needs b_dec")
        self.device = device
        self.d_model, self.d_sae, self.k = int(d_model), int(d_sae), int(k)
        self.activation, self.dec_layout = activation, dec_layout
        self.enc_dtype, self.dec_dtype = etag, dtag
        self.subtract_b_dec = bool(subtract_b_dec)
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self.source = source

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        self._handle = _core.create(
            self.d_model, self.d_sae, self.k, ACTIVATIONS[activation], self.subtract_b_dec,
            ptr(W_enc), DTYPE_CODES[etag], ptr(self.enc_scales), ptr(self.b_enc),
            ptr(W_dec), DTYPE_CODES[dtag], DEC_LAYOUTS[dec_layout], ptr(self.b_dec), ptr(self.threshold),
            False, True, device.index if device.index is not None else torch.cuda.current_device(),
        )

    # ---- description ----
    @property
    def handle(self) -> int:
        """Address of the underlying saehook_sae* (a CUDA handle: device pointers)."""
        return self._handle.address

    @property
    def layer(self) -> Optional[int]:
        return self.metadata.get("layer")

    @property
    def weight_bytes(self) -> int:
        n = self.d_model * self.d_sae
        return n * (DTYPE_BYTES[self.enc_dtype] + DTYPE_BYTES[self.dec_dtype])

    @property
    def encoder_bytes(self) -> int:
        return self.d_model * self.d_sae * DTYPE_BYTES[self.enc_dtype]

    def __repr__(self) -> str:
        return (f"CudaSAE(d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, activation={self.activation!r}, "
                f"enc={self.enc_dtype}, dec={self.dec_dtype}/{self.dec_layout}, device={self.device})")

    # ---- plumbing ----
    def _stream(self) -> int:
        return _torch().cuda.current_stream(self.device).cuda_stream

    def _rows(self, x, *, writable: bool = False, name: str = "x"):
        """x (..., d_model) on this device as float32 rows: (tensor2d, n, ld, batch_shape)."""
        torch = _torch()
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch tensor on {self.device}, got {type(x).__name__}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}; this SAE is on {self.device}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (..., {self.d_model}) (d_model mismatch)")
        batch = tuple(x.shape[:-1])
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            if writable:
                raise TypeError(f"{name} must be a float32 tensor with a contiguous last dimension to be changed in place")
            x = x.detach().to(torch.float32).contiguous()
        x = x.detach()
        if x.dim() == 2:
            t2 = x
        else:
            try:
                t2 = x.view(-1, self.d_model)
            except RuntimeError:
                if writable:
                    raise TypeError(f"{name} cannot be viewed as rows in place; make it contiguous")
                t2 = x.reshape(-1, self.d_model).contiguous()
        n = t2.shape[0]
        ld = t2.stride(0) if n > 1 else self.d_model
        if ld < self.d_model:  # e.g. an expanded (stride 0) tensor
            if writable:
                raise TypeError(f"{name} rows overlap in memory; cannot change them in place")
            t2 = t2.contiguous()
            ld = self.d_model
        return t2, n, ld, batch

    # ---- kernels ----
    def encode(self, x, k: Optional[int] = None) -> Tuple[Any, Any]:
        """Top-K features of each row of x (..., d_model): (values float32, indices int32) of shape
        (..., k), sorted by value descending (ties: lower index first); index -1 / value 0 pad
        rows with fewer candidates (relu-family activations)."""
        torch = _torch()
        kk = self.k if k is None else int(k)
        if not 1 <= kk <= self.d_sae:
            raise ValueError(f"k = {kk} must be between 1 and d_sae = {self.d_sae}")
        t2, n, ld, batch = self._rows(x)
        vals = torch.empty((n, kk), dtype=torch.float32, device=self.device)
        idx = torch.empty((n, kk), dtype=torch.int32, device=self.device)
        if n:
            _core.encode(self._handle, t2.data_ptr(), n, ld, kk, vals.data_ptr(), idx.data_ptr(), 0, self._stream())
        return vals.reshape(batch + (kk,)), idx.reshape(batch + (kk,))

    def preacts(self, x):
        """Dense pre-activations (..., d_sae) before the activation function (for analysis)."""
        torch = _torch()
        t2, n, ld, batch = self._rows(x)
        out = torch.empty((n, self.d_sae), dtype=torch.float32, device=self.device)
        if n:
            _core.preacts(self._handle, t2.data_ptr(), n, ld, out.data_ptr(), 0, self._stream())
        return out.reshape(batch + (self.d_sae,))

    def decode(self, values, indices):
        """x_hat = sum_j values_j * d_{indices_j} + b_dec from the sparse form (..., k)."""
        torch = _torch()
        for name, t in (("values", values), ("indices", indices)):
            if not torch.is_tensor(t) or t.device != self.device:
                raise ValueError(f"{name} must be a tensor on {self.device}")
        v = values.detach().to(torch.float32).contiguous()
        i = feature_indices(indices, self.d_sae).contiguous()  # refuses what int32 would wrap or truncate
        if tuple(v.shape) != tuple(i.shape) or v.dim() == 0:
            raise ValueError(f"values {tuple(v.shape)} and indices {tuple(i.shape)} must have the same shape (..., k)")
        kk = v.shape[-1]
        n = int(np.prod(v.shape[:-1])) if v.dim() > 1 else 1
        out = torch.empty((n, self.d_model), dtype=torch.float32, device=self.device)
        if n and kk:
            _core.decode(self._handle, v.data_ptr(), i.data_ptr(), n, kk, out.data_ptr(), self.d_model, 0,
                         self._stream())
        elif n:  # no entries: every row is b_dec
            out.zero_()
            if self.b_dec is not None:
                out += self.b_dec
        return out.reshape(tuple(v.shape[:-1]) + (self.d_model,))

    def reconstruct(self, x, *, inplace: bool = False):
        """decode(encode(x)); with inplace=True, x (float32 CUDA tensor) is overwritten and returned."""
        torch = _torch()
        if not inplace:
            x = x.detach().to(torch.float32).clone()
        t2, n, ld, _ = self._rows(x, writable=True)
        if n:
            _core.reconstruct(self._handle, t2.data_ptr(), n, ld, 0, self._stream())
        return x

    def _items(self, steering) -> np.ndarray:
        from ..steering import ITEM_DTYPE, OPS, Steering

        if isinstance(steering, Steering):
            if steering.sae.d_sae != self.d_sae or steering.sae.d_model != self.d_model:
                raise ValueError("the steering was built for an SAE of another shape")
            return steering.items()
        if isinstance(steering, np.ndarray) and steering.dtype == ITEM_DTYPE:  # Steering.items() form
            return np.ascontiguousarray(steering)  # the kernels check features, ops and values
        ops = list(steering)
        items = np.zeros(len(ops), dtype=ITEM_DTYPE)
        for j, o in enumerate(ops):
            op, feature, value = o[0], int(o[1]), float(o[2])
            if op not in OPS or op == "cap":  # a cap has two bounds: build it with Steering.cap
                raise ValueError(f"unknown steering op {op!r} in the tuple form; expected one of "
                                 f"{sorted(set(OPS) - {'cap'})} (caps and conditions: pass a Steering)")
            if not 0 <= feature < self.d_sae:
                raise IndexError(f"feature {feature} is out of range [0, {self.d_sae})")
            if not np.isfinite(value):
                raise ValueError(f"steering value for feature {feature} is not finite: {value!r}")
            items[j]["feature"], items[j]["op"], items[j]["value"] = feature, OPS[op], value
            items[j]["normalize"] = int(bool(o[3])) if len(o) > 3 else 0
        return items

    def steer(self, steering, h, *, mask=None, k: Optional[int] = None, return_codes: bool = False,
              state=None, slots=None, fired: Optional[np.ndarray] = None):
        """Steers rows of h (..., d_model, float32, on this device) in place with one encode
        shared by all the ops, as Steering.apply does on the CPU. `steering` is a saehook.Steering
        (built for this SAE's host twin, or any SAE of the same shape) or a sequence of
        (op, feature, value[, normalize]) with op in add / clamp / scale / ablate. `mask` (one bool
        per row) limits the rows changed. Returns h, or (h, values, indices) with
        return_codes=True (the encode of the unsteered rows). Conditions and latches as in
        Steering.apply: `state` (a saehook.SteeringState), `slots` (one sequence slot per row) and
        `fired` (a host uint8 array (n, n_items) filled as Steering.apply_report's) are host
        memory; the conditions are evaluated on the host from a copy of the encode."""
        torch = _torch()
        items = self._items(steering)
        t2, n, ld, batch = self._rows(h, writable=True, name="h")
        m = None
        if mask is not None:
            m = torch.as_tensor(mask, device=self.device).reshape(-1).to(torch.bool).to(torch.uint8).contiguous()
            if m.numel() != n:
                raise ValueError(f"mask has {m.numel()} entries for {n} rows")
        kk = self.k if k is None else int(k)
        vals = idx = None
        if return_codes:
            vals = torch.empty((n, kk), dtype=torch.float32, device=self.device)
            idx = torch.empty((n, kk), dtype=torch.int32, device=self.device)
        latch = None if state is None else state.latch
        sl = None if slots is None else np.ascontiguousarray(np.asarray(slots).reshape(-1), dtype=np.int32)
        if sl is not None and sl.shape[0] != n:
            raise ValueError(f"slots has {sl.shape[0]} entries for {n} rows")
        if fired is not None and (fired.dtype != np.uint8 or fired.shape != (n, len(items)) or
                                  not fired.flags.c_contiguous):
            raise ValueError(f"fired must be a C-contiguous uint8 array of shape {(n, len(items))}")
        if n and (len(items) or return_codes):
            _core.steer_ex(self._handle, t2.data_ptr(), n, ld, items.ctypes.data, len(items),
                           0 if m is None else m.data_ptr(), kk,
                           0 if vals is None else vals.data_ptr(), 0 if idx is None else idx.data_ptr(),
                           0 if latch is None else latch.ctypes.data, 0 if sl is None else sl.ctypes.data,
                           0 if latch is None else latch.shape[0], 0 if fired is None else fired.ctypes.data,
                           0, self._stream())
        if return_codes:
            return h, vals.reshape(batch + (kk,)), idx.reshape(batch + (kk,))
        return h

    apply = steer

    def decoder_direction(self, feature: int, normalize: bool = False) -> np.ndarray:
        """Feature's decoder direction d_f as a host float32 array (d_model,), like SAE.decoder_direction."""
        out = np.empty(self.d_model, dtype=np.float32)
        _core.decoder_direction(self._handle, int(feature), bool(normalize), out.ctypes.data)
        return out


def from_tensors(W_enc, W_dec, b_enc=None, b_dec=None, **kw) -> CudaSAE:
    """A CudaSAE over CUDA tensors used in place (no copy when they are contiguous):
    W_enc (d_sae, d_model) f32/f16/bf16/int8, W_dec (d_sae, d_model) or (d_model, d_sae) with
    dec_layout='cols'; keyword arguments as saehook.SAE."""
    return CudaSAE(W_enc, W_dec, b_enc, b_dec, **kw)


def to_device(sae: SAE, device: Any = "cuda", *, dec_layout: Optional[str] = None) -> CudaSAE:
    """Copies a host SAE's weights to a CUDA device once and returns the CudaSAE using them.
    `dec_layout='rows'` stores a column-major decoder (Qwen-Scope's) feature-major on the device,
    so decode reads k contiguous rows per token instead of k strided columns."""
    if not isinstance(sae, SAE):
        raise TypeError(f"to_device takes a saehook.SAE, got {type(sae).__name__}")
    _require_cuda()
    torch = _torch()
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"{device!r} is not a CUDA device")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    a = sae.arrays()
    W_enc = _host_to_device(a["W_enc"], sae.enc_dtype, dev)
    W_dec = _host_to_device(a["W_dec"], sae.dec_dtype, dev)
    layout = dec_layout or sae.dec_layout
    if layout not in DEC_LAYOUTS:
        raise ValueError(f"unknown dec_layout {layout!r}; expected 'rows' or 'cols'")
    if layout != sae.dec_layout:
        W_dec = W_dec.t().contiguous()

    def vec(v):
        return None if v is None else torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dev)

    return CudaSAE(W_enc, W_dec, vec(a["b_enc"]), vec(a["b_dec"]), k=sae.k, activation=sae.activation,
                   subtract_b_dec=sae.subtract_b_dec, threshold=vec(a["threshold"]), dec_layout=layout,
                   enc_scales=vec(a["enc_scales"]), metadata=sae.metadata, source=sae)


# SAE -> {device: CudaSAE}: one device copy per SAE and device, for code that holds only the host
# SAE (torch ops, engine hooks) and meets CUDA tensors.
_CACHE: "weakref.WeakKeyDictionary[SAE, Dict[str, CudaSAE]]" = weakref.WeakKeyDictionary()


def for_tensor(sae: SAE, t):
    """What runs `sae` where tensor t lives: `sae` itself for CPU tensors, else cached(sae, t.device)."""
    if t.device.type == "cpu":
        return sae
    if t.device.type != "cuda":
        raise ValueError(f"saehook runs on CPU and CUDA tensors, not on {t.device}")
    return cached(sae, t.device)


def cached(sae: SAE, device: Any = "cuda") -> CudaSAE:
    """The CudaSAE of `sae` on `device`, copied on first use and kept as long as `sae` lives."""
    torch = _torch()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    per = _CACHE.setdefault(sae, {})
    key = str(dev)
    if key not in per:
        per[key] = to_device(sae, dev)
    return per[key]
