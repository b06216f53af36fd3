"""llama.cpp integration: SAE capture and steering on GGUF models through llama-cpp-python.

    from saehook.llama import HookedLlama
    llm = HookedLlama("model-Q4_K_M.gguf", n_ctx=2048)          # same arguments as llama_cpp.Llama
    with llm.capture({12: sae}) as rec:
        llm("The capital of France is", max_tokens=8)
    rec[12].tokens, rec[12].indices, rec[12].values             # one row per evaluated token
    with llm.steer(saehook.Steering(sae, layer=12).clamp(1234, 8.0)):
        llm("Tell me a story", max_tokens=32)

The per-layer work runs in C++ (csrc/llama/hook.cpp) inside llama.cpp's eval callback; Python
only announces which tokens each decode evaluates. Additive-only steering of all positions at
layers >= 1 uses llama.cpp's control vectors instead (no encode, no per-token cost).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np

# llama.cpp's CPU backend runs on OpenMP; after each graph split its worker threads spin-wait
# (libgomp's default spin count), and on a machine with as many threads as cores they compete
# with saehook's kernel threads while the callback runs: measured on 2 cores, capture at one
# layer cost 9.6 ms/token instead of 7.0 ms, with no change to the unhooked speed at 1000.
# libgomp reads this once, when llama_cpp loads it: set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import llama_cpp  # noqa: E402
import llama_cpp.llama as _llama_mod  # noqa: E402

from . import get_library
from .sae import SAE
from .steering import POSITIONS, Steering

_POS_CODE = {p: i for i, p in enumerate(POSITIONS)}  # matches saehook_positions


class _GgmlApi(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("get_name", "nelements", "nrows", "nbytes", "tensor_get", "tensor_set")]


_SYMBOLS = ("ggml_get_name", "ggml_nelements", "ggml_nrows", "ggml_nbytes", "ggml_backend_tensor_get",
            "ggml_backend_tensor_set")


def _ggml_api() -> _GgmlApi:
    """Addresses of the ggml functions in the libraries llama-cpp-python itself loaded."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    candidates = [os.path.join(libdir, n) for n in sorted(os.listdir(libdir)) if n.startswith(("libggml-base", "ggml-base", "libggml."))]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            return _GgmlApi(*[ctypes.cast(getattr(lib, s), ctypes.c_void_p).value for s in _SYMBOLS])
        except (OSError, AttributeError):
            continue
    raise RuntimeError(f"cannot find the ggml functions {_SYMBOLS} in {libdir}")


class _Lib:
    """ctypes bindings of the hook's C API in libsaehook."""

    def __init__(self):
        lib = ctypes.CDLL(get_library())
        c = ctypes
        P = c.c_void_p
        sig = {
            "saehook_llama_hook_create": (P, [c.POINTER(_GgmlApi), c.c_int32, c.c_int32]),
            "saehook_llama_hook_destroy": (None, [P]),
            "saehook_llama_hook_add": (c.c_int32, [P, c.c_int32, P, c.c_int32, c.c_int32, P, c.c_int32, c.c_int]),
            "saehook_llama_hook_add_reconstruct": (c.c_int32, [P, c.c_int32, P]),
            "saehook_llama_hook_remove": (c.c_int, [P, c.c_int32]),
            "saehook_llama_hook_announce": (c.c_int, [P, P, P, P, P, P, c.c_int32]),
            "saehook_llama_hook_reset_queue": (None, [P]),
            "saehook_llama_hook_captured": (c.c_int64, [P, c.c_int32]),
            "saehook_llama_hook_k": (c.c_int32, [P, c.c_int32]),
            "saehook_llama_hook_read": (c.c_int, [P, c.c_int32, P, P, P, P, P, P]),
            "saehook_llama_hook_keep_residuals": (None, [P, c.c_int32]),
            "saehook_llama_hook_error": (c.c_char_p, [P]),
            "saehook_llama_hook_clear_error": (None, [P]),
        }
        for name, (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
            setattr(self, name.replace("saehook_llama_hook_", ""), f)
        self.callback_address = ctypes.cast(lib.saehook_llama_callback, ctypes.c_void_p).value
        self.lib = lib


_LIB: Optional[_Lib] = None
_INIT_LOCK = threading.Lock()


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def _ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


@dataclass
class LlamaLayerRecord:
    """Features captured at one layer, one row per evaluated token, in evaluation order."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    indices: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    residuals: Optional[np.ndarray] = None


class HookedLlama(llama_cpp.Llama):
    """llama_cpp.Llama whose context carries saehook's eval callback. Same arguments, plus
    `context_overrides`: llama_context_params fields Llama has no argument for (e.g.
    {"n_seq_max": 4, "kv_unified": True} to decode several sequences in one batch)."""

    def __init__(self, *args, context_overrides: Optional[Mapping[str, object]] = None, **kwargs):
        self._hook = None
        self._entries: List[int] = []
        self._cvec: Dict[int, List[np.ndarray]] = {}
        self._in_generate = False
        self._generate_evals = 0
        self._cb = None
        real_context = _llama_mod.internals.LlamaContext
        owner = self

        def hooked_context(*, model, params, **kw):
            # Runs inside Llama.__init__ once the model is loaded: create the hook and put the
            # callback into the params the context is created from.
            lib = _lib()
            owner._n_embd = llama_cpp.llama_model_n_embd(model.model)
            owner._n_layer = llama_cpp.llama_model_n_layer(model.model)
            api = _ggml_api()
            owner._hook = lib.create(ctypes.byref(api), owner._n_embd, owner._n_layer)
            if not owner._hook:
                raise RuntimeError("saehook: cannot create the llama.cpp hook")
            owner._cb = ctypes.cast(lib.callback_address, llama_cpp.ggml_backend_sched_eval_callback)
            params.cb_eval = owner._cb
            params.cb_eval_user_data = owner._hook
            for name, value in (context_overrides or {}).items():
                setattr(params, name, value)
            return real_context(model=model, params=params, **kw)

        # Llama creates its context in __init__ with no way to pass a callback: swap the context
        # class for the duration of this constructor only (serialised across threads).
        with _INIT_LOCK:
            _llama_mod.internals.LlamaContext = hooked_context
            try:
                super().__init__(*args, **kwargs)
            finally:
                _llama_mod.internals.LlamaContext = real_context

    # ---- model facts ----
    @property
    def n_layer(self) -> int:
        return self._n_layer

    @property
    def n_embd_model(self) -> int:
        return self._n_embd

    def _check(self, layer: int, sae: SAE) -> None:
        if not 0 <= int(layer) < self._n_layer:
            raise ValueError(f"layer {layer} is outside the model (it has {self._n_layer} layers)")
        if sae.d_model != self._n_embd:
            raise ValueError(f"d_model mismatch: the SAE for layer {layer} has d_model={sae.d_model}, "
                             f"the model's n_embd is {self._n_embd}")

    # ---- token bookkeeping ----
    def announce(self, tokens: Sequence[int], positions: Sequence[int], *, seq_ids: Optional[Sequence[int]] = None,
                 outputs: Optional[Sequence[bool]] = None, generated: bool = False) -> None:
        """Tells the hook which tokens the next llama_decode evaluates, in batch order. HookedLlama
        does this itself in eval(); call it before decoding a hand-built llama_batch."""
        n = len(tokens)
        if n == 0 or self._hook is None:
            return
        t = np.ascontiguousarray(tokens, dtype=np.int32)
        p = np.ascontiguousarray(positions, dtype=np.int32)
        s = None if seq_ids is None else np.ascontiguousarray(seq_ids, dtype=np.int32)
        o = np.ones(n, np.int8) if outputs is None else np.ascontiguousarray(outputs, dtype=np.int8)
        g = np.full(n, int(generated), np.int8)
        if len(p) != n or len(o) != n or (s is not None and len(s) != n):
            raise ValueError("tokens, positions, seq_ids and outputs must have the same length")
        _lib().announce(self._hook, _ptr(t), _ptr(p), _ptr(s), _ptr(o), _ptr(g), n)

    def raise_hook_error(self) -> None:
        """Raises the first error the callback met (it cannot raise inside llama.cpp)."""
        err = _lib().error(self._hook) if self._hook else None
        if err:
            _lib().clear_error(self._hook)
            raise RuntimeError(f"saehook llama.cpp hook: {err.decode()}")

    def eval(self, tokens: Sequence[int]):
        if self._entries:
            tokens = list(tokens)
            n = len(tokens)
            outputs = np.zeros(n, np.int8)
            if self._logits_all:
                outputs[:] = 1
            else:  # Llama.eval decodes n_batch tokens at a time, requesting the last one's logits
                outputs[np.minimum(np.arange(self.n_batch - 1, n + self.n_batch - 1, self.n_batch), n - 1)] = 1
            generated = self._in_generate and self._generate_evals > 0
            self.announce(tokens, np.arange(self.n_tokens, self.n_tokens + n), outputs=outputs, generated=generated)
        if self._in_generate:
            self._generate_evals += 1
        try:
            super().eval(tokens)
        except Exception:
            if self._hook:
                _lib().reset_queue(self._hook)
            raise
        self.raise_hook_error()

    def generate(self, tokens, *args, **kwargs):
        # The first eval of a generate() call is the (uncached part of the) prompt, later ones
        # evaluate sampled tokens: that is how positions='prompt'|'generated' are told apart.
        self._in_generate, self._generate_evals = True, 0
        try:
            yield from super().generate(tokens, *args, **kwargs)
        finally:
            self._in_generate = False

    # ---- capture ----
    @contextlib.contextmanager
    def capture(self, saes: Mapping[int, SAE], *, k: Optional[int] = None,
                residuals: bool = False) -> Iterator[Dict[int, LlamaLayerRecord]]:
        """Records the Top-K features at each layer for every token evaluated inside the block;
        the records are filled when the block exits."""
        for layer, sae in saes.items():
            self._check(layer, sae)
        lib = _lib()
        rec: Dict[int, LlamaLayerRecord] = {}
        ids = {}
        if residuals:
            lib.keep_residuals(self._hook, 1)
        try:
            for layer, sae in saes.items():
                i = lib.add(self._hook, int(layer), sae.handle, 1, int(k or 0), None, 0, 0)
                if i < 0:
                    raise ValueError(f"saehook: cannot hook layer {layer}")
                ids[int(layer)] = (i, sae)
                self._entries.append(i)
                rec[int(layer)] = LlamaLayerRecord()
            yield rec
        finally:
            for layer, (i, sae) in ids.items():
                n, kk = lib.captured(self._hook, i), lib.k(self._hook, i)
                r = rec[layer]
                r.tokens, r.positions, r.seq_ids = (np.empty(n, np.int32) for _ in range(3))
                r.values, r.indices = np.empty((n, kk), np.float32), np.empty((n, kk), np.int32)
                r.residuals = np.empty((n, self._n_embd), np.float32) if residuals else None
                lib.read(self._hook, i, _ptr(r.tokens), _ptr(r.positions), _ptr(r.seq_ids), _ptr(r.values),
                         _ptr(r.indices), _ptr(r.residuals))
                lib.remove(self._hook, i)
                self._entries.remove(i)
            if residuals:
                lib.keep_residuals(self._hook, 0)

    # ---- splicing ----
    @contextlib.contextmanager
    def splice(self, saes: Mapping[int, SAE]) -> Iterator[None]:
        """Replaces the residual after each given layer by its SAE reconstruction in every decode
        inside the block (for evaluation: the loss with the SAE spliced in)."""
        for layer, sae in saes.items():
            self._check(layer, sae)
        lib = _lib()
        ids = []
        try:
            for layer, sae in saes.items():
                i = lib.add_reconstruct(self._hook, int(layer), sae.handle)
                if i < 0:
                    raise ValueError(f"saehook: cannot hook layer {layer}")
                ids.append(i)
                self._entries.append(i)
            yield
        finally:
            for i in ids:
                lib.remove(self._hook, i)
                self._entries.remove(i)

    # ---- steering ----
    def _uses_cvec(self, st: Steering) -> bool:
        return st.additive_only and st.positions == "all" and st.layer >= 1

    def _apply_cvec(self) -> None:
        """Loads the sum of the active additive steerings as llama.cpp's control vector."""
        ctx = self._ctx.ctx
        active = {layer: sum(vs) for layer, vs in self._cvec.items() if vs}
        if not active:
            rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self._n_embd, -1, -1)
        else:
            # Row j of the buffer is added to the output of block j + 1.
            buf = np.zeros((self._n_layer, self._n_embd), np.float32)
            for layer, v in active.items():
                buf[layer - 1] = v
            data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            # Only the steered range: llama.cpp adds one graph node per layer in it.
            rc = llama_cpp.llama_set_adapter_cvec(ctx, data, buf.size, self._n_embd, min(active), max(active))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")

    @contextlib.contextmanager
    def steer(self, *steerings: Steering, control_vectors: bool = True) -> Iterator[None]:
        """Applies the steerings to every decode inside the block. Add-only steerings of all
        positions at layers >= 1 become llama.cpp control vectors (control_vectors=False forces
        the callback); the others run in the callback with one encode per layer."""
        for st in steerings:
            if st.layer is None:
                raise ValueError("Steering has no layer: pass layer= or use an SAE with a layer")
            self._check(st.layer, st.sae)
        lib = _lib()
        ids, cvecs = [], []
        try:
            for st in steerings:
                if control_vectors and self._uses_cvec(st):
                    v = st.vector()
                    self._cvec.setdefault(st.layer, []).append(v)
                    cvecs.append((st.layer, v))
                    continue
                items = st.items()
                i = lib.add(self._hook, st.layer, st.sae.handle, 0, 0, _ptr(items), len(items), _POS_CODE[st.positions])
                if i < 0:
                    raise ValueError(f"saehook: cannot hook layer {st.layer}")
                ids.append(i)
                self._entries.append(i)
            if cvecs:
                self._apply_cvec()
            yield
        finally:
            for i in ids:
                lib.remove(self._hook, i)
                self._entries.remove(i)
            if cvecs:
                for layer, v in cvecs:
                    lst = self._cvec[layer]
                    lst.pop(next(j for j, x in enumerate(lst) if x is v))
                self._apply_cvec()

    def close(self) -> None:
        super().close()
        if getattr(self, "_hook", None):
            _lib().destroy(self._hook)
            self._hook = None


def export_control_vector(steerings: Iterable[Steering], path: str, *, model_hint: str = "") -> None:
    """Writes the add-only steerings as a llama.cpp control-vector GGUF (for llama-cli /
    llama-server --control-vector). Tensor direction.N is added to the output of block N, the
    residual a layer-N SAE reads (no shift, unlike cvector-generator's own files)."""
    import gguf

    per_layer: Dict[int, np.ndarray] = {}
    for st in steerings:
        if st.layer is None:
            raise ValueError("Steering has no layer")
        if not st.additive_only:
            raise ValueError("only add-only steering is a control vector; clamp/scale/ablate need the hook")
        if st.layer < 1:
            raise ValueError("llama.cpp control vectors cannot steer block 0's output; use the hook")
        per_layer[st.layer] = per_layer.get(st.layer, 0) + st.vector()
    if not per_layer:
        raise ValueError("no steering to export")
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", model_hint)
    w.add_uint32("controlvector.layer_count", len(per_layer))
    for layer in sorted(per_layer):
        w.add_tensor(f"direction.{layer}", np.asarray(per_layer[layer], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
