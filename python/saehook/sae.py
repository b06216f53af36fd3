"""The SAE object: weights (borrowed or owned) plus the compiled kernels that use them."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from . import _core
from ._arrays import (
    DTYPE_BYTES,
    DTYPE_CODES,
    address,
    aligned_copy,
    aligned_empty,
    as_f32_vector,
    as_weight,
    buffer_address,
    canonical_dtype,
    empty_like_kind,
    feature_indices,
    mark_written,
    rows,
)

# handle -> live SAE, so code holding only a handle (torch ops, engine hooks) can reach the
# SAE's shapes and weights.
_LIVE: "weakref.WeakValueDictionary[int, SAE]" = weakref.WeakValueDictionary()


def live_sae(handle: int) -> "SAE":
    sae = _LIVE.get(handle)
    if sae is None:
        raise ValueError(f"no live saehook SAE with handle {handle:#x}; keep the SAE object alive")
    return sae


ACTIVATIONS = {"topk": 0, "topk_relu": 1, "relu": 2, "jumprelu": 3}
DEC_LAYOUTS = {"rows": 0, "cols": 1}


def _threads(threads: Optional[int]) -> int:
    return 0 if threads is None else int(threads)


class SAE:
    """A sparse autoencoder ready for the compiled kernels.

    W_enc is (d_sae, d_model) (one row per feature). W_dec is (d_sae, d_model) with
    dec_layout='rows' or (d_model, d_sae) with dec_layout='cols' (Qwen-Scope's layout).
    Weights may be numpy arrays (including np.memmap), or CPU torch tensors, in f32, f16,
    bf16 (uint16 bits in numpy, with enc_dtype/dec_dtype='bf16') or int8 (encoder only, with
    enc_scales). They are borrowed, not copied: the SAE keeps a reference to them.

    Encoding (see README "Semantics"):
        pre = (x - b_dec if subtract_b_dec else x) @ W_enc.T + b_enc
        topk:      the k largest pre, kept as they are
        topk_relu: the k largest of relu(pre); zeros are padding (index -1)
        relu:      relu(pre), at most k nonzero kept (largest first)
        jumprelu:  pre where pre > threshold (and > 0), at most k kept
        x_hat = sum_j values_j * d_{indices_j} + b_dec
    """

    def __init__(
        self,
        W_enc: Any,
        W_dec: Any,
        b_enc: Any = None,
        b_dec: Any = None,
        *,
        k: int,
        activation: str = "topk",
        subtract_b_dec: bool = False,
        threshold: Any = None,
        dec_layout: str = "rows",
        enc_scales: Any = None,
        enc_dtype: Optional[str] = None,
        dec_dtype: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        prefilter: Optional[str] = None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if dec_layout not in DEC_LAYOUTS:
            raise ValueError(f"unknown dec_layout {dec_layout!r}; expected 'rows' or 'cols'")
        W_enc, etag = as_weight(W_enc, "W_enc", enc_dtype)
        W_dec, dtag = as_weight(W_dec, "W_dec", dec_dtype)
        if W_enc.ndim != 2 or W_dec.ndim != 2:
            raise ValueError(f"W_enc and W_dec must be 2-D, got {W_enc.shape} and {W_dec.shape}")
        d_sae, d_model = W_enc.shape
        expect_dec = (d_sae, d_model) if dec_layout == "rows" else (d_model, d_sae)
        if tuple(W_dec.shape) != expect_dec:
            raise ValueError(
                f"W_dec has shape {tuple(W_dec.shape)} but W_enc {tuple(W_enc.shape)} with "
                f"dec_layout={dec_layout!r} needs {expect_dec}"
            )
        if dtag == "int8":
            raise TypeError("the decoder must be f32, f16 or bf16 (int8 is for the encoder)")
        if etag == "int8" and enc_scales is None:
            raise ValueError("an int8 encoder needs enc_scales (one float per feature)")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a jumprelu SAE needs a threshold vector")
        if not (1 <= int(k) <= d_sae):
            raise ValueError(f"k = {k} must be between 1 and d_sae = {d_sae}")

        self._W_enc, self._W_dec = W_enc, W_dec
        self._enc_scales = as_f32_vector(enc_scales, d_sae, "enc_scales") if etag == "int8" else None
        self._b_enc = as_f32_vector(b_enc, d_sae, "b_enc")
        self._b_dec = as_f32_vector(b_dec, d_model, "b_dec")
        self._threshold = as_f32_vector(threshold, d_sae, "threshold")
        if subtract_b_dec and self._b_dec is None:
            raise ValueError("subtract_b_dec=True needs b_dec")
        self.enc_dtype, self.dec_dtype = etag, dtag
        self.dec_layout = dec_layout
        self.activation = activation
        self.subtract_b_dec = bool(subtract_b_dec)
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self._handle = _core.create(
            d_model, d_sae, int(k), ACTIVATIONS[activation], self.subtract_b_dec,
            address(W_enc), DTYPE_CODES[etag], address(self._enc_scales), address(self._b_enc),
            address(W_dec), DTYPE_CODES[dtag], DEC_LAYOUTS[dec_layout], address(self._b_dec),
            address(self._threshold), False,
        )
        self.d_model, self.d_sae, self.k = int(d_model), int(d_sae), int(k)
        self._prefilter: Optional[str] = None
        _LIVE[self.handle] = self
        if prefilter is not None:
            self.set_prefilter(prefilter)

    # ---- description ----
    @property
    def handle(self) -> int:
        """Address of the underlying saehook_sae* (for the C API and the torch ops)."""
        return self._handle.address

    @property
    def layer(self) -> Optional[int]:
        return self.metadata.get("layer")

    @property
    def hook_point(self) -> Optional[str]:
        return self.metadata.get("hook_point")

    @property
    def labels(self):
        """The features' labels (saehook.labels.LabelStore: `sae.labels[f].label`), read on first
        use from beside the SAE's file; assign a LabelStore to use another file."""
        if getattr(self, "_labels", None) is None:
            from .labels import LabelStore

            self._labels = LabelStore.open(self)
        return self._labels

    @labels.setter
    def labels(self, store) -> None:
        self._labels = store

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the kernels read: W_enc + W_dec (+ scales and biases)."""
        n = self.d_model * self.d_sae
        small = 4 * (self.d_sae * (1 + (self._threshold is not None) + (self._enc_scales is not None)) + self.d_model)
        return n * (DTYPE_BYTES[self.enc_dtype] + DTYPE_BYTES[self.dec_dtype]) + small

    @property
    def encoder_bytes(self) -> int:
        return self.d_model * self.d_sae * DTYPE_BYTES[self.enc_dtype]

    # ---- the prefilter: exact f32 encodes at about bf16's cost ----
    @property
    def prefilter(self) -> Optional[str]:
        """'bf16' while encodes filter through a bf16 copy of W_enc (set_prefilter), else None."""
        return self._prefilter

    def set_prefilter(self, dtype: Optional[str] = "bf16", *, threads: Optional[int] = None) -> None:
        """Encode through a bf16 copy of a float32 W_enc ('bf16'), or drop the copy (None).

        Every encode on the CPU (and reconstruct, steer, the llama.cpp and transformers hooks) reads
        the copy first, bounds each pre-activation's error (Cauchy-Schwarz on the rounding of W_enc
        and of the input), keeps the features whose upper bound reaches the k-th largest lower bound
        and recomputes those from W_enc in float32: the results are the float32 encode's, at
        about the bf16 encode's time where bandwidth or the multiply rate bounds it (batch 1, a
        few rows). Memory: the copy holds half of W_enc's bytes plus 12 bytes per feature
        (`prefilter_stats()['bytes']`), and W_enc stays (the few recomputed rows are read from
        it). A call whose candidates do not fit its buffers, or that meets a non-finite value,
        takes the float32 encode (counted in `prefilter_stats()['fallbacks']`). Encodes running
        in other threads meanwhile finish with the copy they started with.
        """
        if dtype in (None, "none", "f32", "float32"):
            _core.set_prefilter(self._handle, DTYPE_CODES["f32"], _threads(threads))
            self._prefilter = None
            return
        if dtype not in ("bf16", "bfloat16"):
            raise ValueError(f"prefilter must be 'bf16' or None, not {dtype!r}")
        _core.set_prefilter(self._handle, DTYPE_CODES["bf16"], _threads(threads))
        self._prefilter = "bf16"

    def prefilter_stats(self) -> Dict[str, int]:
        """bytes (the copy and its norms; 0 without a prefilter), rows (encoded through it),
        recomputed (features recomputed in float32 for those rows) and fallbacks (calls that
        took the float32 encode instead)."""
        b, n, rc, fb = _core.prefilter_stats(self._handle)
        return {"bytes": int(b), "rows": int(n), "recomputed": int(rc), "fallbacks": int(fb)}

    def arrays(self) -> Dict[str, Optional[np.ndarray]]:
        """The weight arrays as stored (bf16 as uint16 bits)."""
        return {
            "W_enc": self._W_enc, "W_dec": self._W_dec, "b_enc": self._b_enc, "b_dec": self._b_dec,
            "threshold": self._threshold, "enc_scales": self._enc_scales,
        }

    def __repr__(self) -> str:
        where = f", layer={self.layer}" if self.layer is not None else ""
        return (
            f"SAE(d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, activation={self.activation!r}, "
            f"enc={self.enc_dtype}, dec={self.dec_dtype}/{self.dec_layout}{where}"
            + (f", prefilter={self._prefilter!r})" if self._prefilter else ")")
        )

    # ---- kernels ----
    def encode(self, x: Any, k: Optional[int] = None, *, threads: Optional[int] = None) -> Tuple[Any, Any]:
        """Top-K features of each row of x (..., d_model): (values, indices) of shape (..., k).

        Sorted by value descending (ties: lower index first). Index -1 marks padding (value 0)
        for the relu-family activations. numpy in -> numpy out, torch in -> torch out.
        OverflowError if a pre-activation overflows float32 (inputs near 3e38, or weights that
        hold Inf/NaN).
        """
        kk = self.k if k is None else int(k)
        if not (1 <= kk <= self.d_sae):
            raise ValueError(f"k = {kk} must be between 1 and d_sae = {self.d_sae}")
        r = rows(x, self.d_model)
        vals = empty_like_kind(r.torch, (r.n, kk), "f32")
        idx = empty_like_kind(r.torch, (r.n, kk), "i32")
        if r.n:
            _core.encode(self._handle, r.ptr, r.n, r.ld, kk, buffer_address(vals), buffer_address(idx), _threads(threads), 0)
        shape = r.batch_shape + (kk,)
        return vals.reshape(shape), idx.reshape(shape)

    def preacts(self, x: Any, *, threads: Optional[int] = None) -> Any:
        """Dense pre-activations (..., d_sae) before the activation function (for analysis)."""
        r = rows(x, self.d_model)
        out = empty_like_kind(r.torch, (r.n, self.d_sae), "f32")
        if r.n:
            _core.preacts(self._handle, r.ptr, r.n, r.ld, buffer_address(out), _threads(threads), 0)
        return out.reshape(r.batch_shape + (self.d_sae,))

    def decode(self, values: Any, indices: Any, *, threads: Optional[int] = None) -> Any:
        """x_hat = sum_j values_j * d_{indices_j} + b_dec from the sparse form (..., k).

        indices: any integer dtype, each in [0, d_sae) or -1 (padding, skipped); bool and float
        indices and values that would not fit are refused (TypeError / IndexError).
        OverflowError if a row of x_hat overflows float32."""
        from ._arrays import is_torch

        torch_kind = is_torch(values)
        if torch_kind:
            import torch

            v = values.detach().to(torch.float32).contiguous()
            i = feature_indices(indices, self.d_sae)
            vshape, ishape = tuple(v.shape), tuple(i.shape)
        else:
            v = np.ascontiguousarray(values, dtype=np.float32)
            i = feature_indices(indices, self.d_sae)
            vshape, ishape = v.shape, i.shape
        if vshape != ishape or len(vshape) == 0:
            raise ValueError(f"values {vshape} and indices {ishape} must have the same shape (..., k)")
        kk = vshape[-1]
        n = int(np.prod(vshape[:-1])) if len(vshape) > 1 else 1
        out = empty_like_kind(torch_kind, (n, self.d_model), "f32")
        if n and kk:
            _core.decode(self._handle, buffer_address(v), buffer_address(i), n, kk, buffer_address(out),
                         self.d_model, _threads(threads), 0)
        elif n:  # no entries: every row is b_dec
            out[:] = 0
            if self._b_dec is not None:
                out += self._b_dec if not torch_kind else torch.from_numpy(self._b_dec)
        return out.reshape(tuple(vshape[:-1]) + (self.d_model,))

    def reconstruct(self, x: Any, *, inplace: bool = False, threads: Optional[int] = None) -> Any:
        """decode(encode(x)); with inplace=True, x (float32) is overwritten and returned.

        In place, x's rows must not overlap and a torch x must not require grad (see
        _arrays.rows); x is unchanged when the call fails (NaN input, float32 overflow)."""
        if not inplace:
            from ._arrays import is_torch

            if is_torch(x):
                import torch

                x = x.detach().to(torch.float32).clone()
            else:
                x = np.array(x, dtype=np.float32)
        r = rows(x, self.d_model, writable=True)
        if r.n:
            _core.reconstruct(self._handle, r.ptr, r.n, r.ld, _threads(threads), 0)
            mark_written(r)
        return x

    def decoder_direction(self, feature: int, normalize: bool = False) -> np.ndarray:
        """Feature's decoder direction d_f as float32 (d_model,)."""
        out = np.empty(self.d_model, dtype=np.float32)
        _core.decoder_direction(self._handle, int(feature), bool(normalize), out.ctypes.data)
        return out

    # ---- conversion and saving ----
    def to_dtype(self, dtype: Optional[str] = None, *, dec_dtype: Optional[str] = None,
                 dec_layout: Optional[str] = None, threads: Optional[int] = None) -> "SAE":
        """A new SAE with converted weights (owned copies of what changes). `dtype` sets the
        encoder dtype (f32, f16, bf16 or int8: int8 quantizes symmetrically per feature); the
        decoder follows it for f16/bf16/f32 unless `dec_dtype` says otherwise, and stays as it is
        for int8. `dec_layout='rows'` stores a column-major decoder (Qwen-Scope's) feature-major:
        decode then reads k contiguous rows per token instead of k scattered columns."""
        enc = canonical_dtype(dtype) if dtype is not None else self.enc_dtype
        if dec_dtype is not None:
            dec = canonical_dtype(dec_dtype)
        else:
            dec = self.dec_dtype if enc == "int8" else enc
        if dec == "int8":
            raise ValueError("the decoder cannot be int8")
        W_enc, scales = self._W_enc, self._enc_scales
        if enc != self.enc_dtype:
            if self.enc_dtype == "int8":
                # Dequantize, then convert.
                f = aligned_copy(W_enc, np.float32)
                f *= scales[:, None]
                W_enc, scales = convert_array(f, "f32", enc, threads=threads), None
            elif enc == "int8":
                W_enc, scales = quantize_int8(W_enc, self.enc_dtype, threads=threads)
            else:
                W_enc = convert_array(W_enc, self.enc_dtype, enc, threads=threads)
        W_dec = self._W_dec if dec == self.dec_dtype else convert_array(self._W_dec, self.dec_dtype, dec, threads=threads)
        layout = dec_layout or self.dec_layout
        if layout not in DEC_LAYOUTS:
            raise ValueError(f"unknown dec_layout {layout!r}; expected 'rows' or 'cols'")
        if layout != self.dec_layout:
            W_dec = aligned_copy(W_dec.T)
        return SAE(
            W_enc, W_dec, self._b_enc, self._b_dec, k=self.k, activation=self.activation,
            subtract_b_dec=self.subtract_b_dec, threshold=self._threshold, dec_layout=layout,
            enc_scales=scales, enc_dtype=enc, dec_dtype=dec, metadata=self.metadata,
            prefilter=self._prefilter if enc == "f32" else None,
        )

    def save(self, path: str, dtype: Optional[str] = None, *, dec_dtype: Optional[str] = None,
             dec_layout: str = "rows") -> None:
        """Writes saehook's own format (one .safetensors file with metadata), which loads
        mmapped. The decoder is stored feature-major ('rows', fastest for decode) by default."""
        if _file_writer is None:
            raise RuntimeError("no SAE file writer is registered: import saehook (saehook.formats registers it)")
        sae = self if (dtype is None and dec_dtype is None) else self.to_dtype(dtype, dec_dtype=dec_dtype)
        _file_writer(sae, path, dec_layout=dec_layout)


# The writer of saehook's file format. The formats live in saehook.formats, which depends on this
# module and never the reverse: saehook.formats.saehook_format registers its writer on import.
_file_writer: Optional[Callable[..., None]] = None


# ---- the commands' prefilter policy (saehook serve, saehook capture: --prefilter) ----
PREFILTER_MODES = ("auto", "bf16", "off")
# "auto" builds copies only while they take at most this share of the memory available then: a
# directory of many layers (a whole Qwen-Scope suite) must not be doubled into swap.
AUTO_PREFILTER_MEMORY_SHARE = 0.25


def prefilter_bytes(sae: "SAE") -> int:
    """What set_prefilter('bf16') holds for this SAE: half of a float32 W_enc plus 12 bytes per feature."""
    return 2 * sae.d_model * sae.d_sae + 12 * sae.d_sae


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_prefilter_mode(mode: Optional[str], flag: str = "--prefilter") -> Optional[str]:
    """mode itself if it is one of PREFILTER_MODES or None; else a ValueError naming the flag."""
    if mode not in PREFILTER_MODES + (None,):
        raise ValueError(f"{flag} must be one of {', '.join(PREFILTER_MODES)}, got {mode!r}")
    return mode


def apply_prefilter(saes: Mapping[Any, "SAE"], mode: Optional[str], *, on_cpu: bool = True,
                    name_of: Callable[[Any], str] = str, flag: str = "--prefilter",
                    available: Optional[int] = None) -> Tuple[list, Optional[str]]:
    """The prefilter policy of the commands: "bf16" gives every SAE the bf16 prefilter (a narrower
    encoder is refused, naming it with name_of); "off" or None, none; "auto" every SAE with a float32
    encoder when its encodes run on the CPU (on_cpu), in order, while the copies fit in
    AUTO_PREFILTER_MEMORY_SHARE of the memory available now (`available`, default: MemAvailable).
    Returns (the keys that got it, a sentence on what auto left out and why, or None)."""
    if check_prefilter_mode(mode, flag) in (None, "off"):
        return [], None
    if mode == "bf16":
        for key, sae in saes.items():
            if sae.enc_dtype != "f32":
                raise ValueError(f"{flag} bf16: {name_of(key)} has a {sae.enc_dtype} encoder (the prefilter makes "
                                 "float32 encoders fast; this one is narrow already)")
        for sae in saes.values():
            sae.set_prefilter("bf16")
        return list(saes), None
    wide = [key for key, sae in saes.items() if sae.enc_dtype == "f32"]
    if not wide or not on_cpu:
        return [], None
    room = available if available is not None else _available_memory()
    budget = None if room is None else AUTO_PREFILTER_MEMORY_SHARE * room
    done, used = [], 0
    for key in wide:
        need = prefilter_bytes(saes[key])
        if budget is not None and used + need > budget:
            break
        saes[key].set_prefilter("bf16")
        done.append(key)
        used += need
    left = len(wide) - len(done)
    if not left:
        return done, None
    total = sum(prefilter_bytes(saes[k]) for k in wide)
    return done, (f"{flag} auto: the bf16 prefilter on {len(done)} of {len(wide)} float32 SAEs; all would take "
                  f"{total / 2**20:.0f} MiB, more than {AUTO_PREFILTER_MEMORY_SHARE:.0%} of the "
                  f"{room / 2**20:.0f} MiB available ({flag} bf16 to build them all, off for none)")


def register_file_writer(writer: Callable[..., None]) -> None:
    """Sets the function SAE.save calls: writer(sae, path, dec_layout=...)."""
    global _file_writer
    _file_writer = writer


def convert_array(a: np.ndarray, src: str, dst: str, *, threads: Optional[int] = None) -> np.ndarray:
    """Converts an f32/f16/bf16 array (bf16 as uint16) with the compiled converter."""
    out = aligned_empty(a.shape, {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dst])
    a = np.ascontiguousarray(a)
    if a.size:
        _core.convert(a.ctypes.data, DTYPE_CODES[src], out.ctypes.data, DTYPE_CODES[dst], a.size, _threads(threads))
    return out


def quantize_int8(W: np.ndarray, src: str, *, threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: W[f] ~= q[f] * scale[f], scale = max|W[f]| / 127."""
    W = np.ascontiguousarray(W)
    rows_, cols = W.shape
    q = aligned_empty((rows_, cols), np.int8)
    s = np.empty(rows_, dtype=np.float32)
    _core.quantize_int8(W.ctypes.data, DTYPE_CODES[src], rows_, cols, q.ctypes.data, s.ctypes.data, _threads(threads))
    return q, s


def set_num_threads(n: int) -> None:
    """Default thread count of the kernels (0 = all CPUs)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def set_isa(name: str) -> None:
    """Forces a CPU kernel path: 'auto', 'baseline', 'avx2' or 'avx512'."""
    _core.set_isa(name)


def get_isa() -> str:
    return _core.get_isa()


def available_isas() -> list:
    return [s for s in _core.available_isas().split(",") if s]


def cpu_info() -> dict:
    """The CPU as cpuid reports it (vendor, family, model, stepping), the class its kernel
    parameters come from (detected_class, class in use) and those parameters (params), plus the
    kernel path in use (isa)."""
    import json

    info = json.loads(_core.cpu_info())
    info["isa"] = _core.get_isa()
    return info


def set_cpu_class(spec: str) -> None:
    """Kernel parameters of another CPU class ('zen5', 'zen4', 'spr', 'zen3', 'generic', 'auto'), with
    optional ',key=value' overrides ('zen5,stream_prefetch=512'); for measurement and tests
    (SAEHOOK_CPU_CLASS does the same at start-up). Results stay equal up to float rounding."""
    _core.set_cpu_class(spec)
