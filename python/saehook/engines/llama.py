"""llama.cpp integration: SAE capture and steering on GGUF models through llama-cpp-python.

    from saehook.llama import HookedLlama
    llm = HookedLlama("model-Q4_K_M.gguf", n_ctx=2048)          # same arguments as llama_cpp.Llama
    with llm.capture({12: sae}) as rec:
        llm("The capital of France is", max_tokens=8)
    rec[12].tokens, rec[12].indices, rec[12].values             # one row per evaluated token
    with llm.steer(saehook.Steering(sae, layer=12).clamp(1234, 8.0)):
        llm("Tell me a story", max_tokens=32)

The per-layer work runs in C++ (csrc/llama/hook.cpp) inside llama.cpp's eval callback; Python
only tells the hook which tokens each llama_decode evaluates (HookedLlama's context announces
every batch it decodes). Additive-only steering of all positions at layers >= 1 uses llama.cpp's
control vectors instead (no encode, no per-token cost).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# llama.cpp's CPU backend runs on OpenMP; after each graph split its worker threads spin-wait
# (libgomp's default spin count), and on a machine with as many threads as cores they compete
# with saehook's kernel threads while the callback runs: measured on 2 cores, capture at one
# layer cost 9.6 ms/token instead of 7.0 ms, with no change to the unhooked speed at 1000.
# libgomp reads this once, when it is loaded: set GOMP_SPINCOUNT yourself to override. torch
# ships a libgomp.so.1 of its own, and llama.cpp then uses that copy: if torch was imported
# first, the setting comes too late, which is worth a warning.
def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:  # not Linux
        return False


if "GOMP_SPINCOUNT" not in os.environ and _libgomp_loaded():
    warnings.warn("saehook.llama: libgomp is already loaded (was torch imported first?), so GOMP_SPINCOUNT=1000 "
                  "cannot take effect: llama.cpp's idle OpenMP threads will spin while saehook's kernels run in its "
                  "callback and slow hooked layers (by about a third on 2 cores). Import saehook.llama before torch, "
                  "or set GOMP_SPINCOUNT=1000 in the environment.", RuntimeWarning, stacklevel=2)
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import llama_cpp  # noqa: E402
from llama_cpp import _internals  # noqa: E402
from llama_cpp import llama_cpp as _llama_lib  # noqa: E402

from .. import get_library  # noqa: E402
from ..sae import SAE  # noqa: E402
from ..steering import POSITIONS, Steering  # noqa: E402

_POS_CODE = {p: i for i, p in enumerate(POSITIONS)}  # matches saehook_positions
_BATCH_GENERATED, _BATCH_OUTPUT_ALL = 1, 2  # SAEHOOK_BATCH_* flags


class _GgmlApi(ctypes.Structure):
    """saehook_ggml_api: the ggml functions the hook calls."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("get_name", "nelements", "nrows", "nbytes", "tensor_get", "tensor_set")]


_SYMBOLS = ("ggml_get_name", "ggml_nelements", "ggml_nrows", "ggml_nbytes", "ggml_backend_tensor_get",
            "ggml_backend_tensor_set")


def _ggml_api() -> _GgmlApi:
    """Addresses of the ggml functions in the very library libllama uses. They are looked up
    through llama_cpp's own handle of libllama (dlsym searches its dependencies): opening
    lib/libggml-base.so by name would load a second copy, since pip installs libggml-base.so,
    .so.0 and .so.0.x as separate files rather than symlinks."""
    lib = getattr(_llama_lib, "_lib", None)  # llama_cpp.llama_cpp's CDLL of libllama
    if lib is None:
        raise RuntimeError("cannot find llama_cpp's handle of libllama (llama_cpp.llama_cpp._lib)")
    try:
        return _GgmlApi(*[ctypes.cast(getattr(lib, s), ctypes.c_void_p).value for s in _SYMBOLS])
    except AttributeError as e:
        raise RuntimeError(f"llama_cpp's library does not export the ggml functions {_SYMBOLS}: {e}") from None


class _GgmlBackendApi(ctypes.Structure):
    """saehook_ggml_backend_api: where a tensor lives (for the device path on GPU offload)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("buffer_is_host", "buffer_get_type", "buft_name", "get_data", "tensor_buffer")]


_BACKEND_SYMBOLS = ("ggml_backend_buffer_is_host", "ggml_backend_buffer_get_type", "ggml_backend_buft_name",
                    "ggml_get_data")


def _ggml_backend_api() -> Optional[_GgmlBackendApi]:
    """The backend-buffer functions of libllama's ggml (in ggml-base, CPU-only builds included),
    or None where this llama.cpp lacks one (every layer then takes the host path)."""
    lib = getattr(_llama_lib, "_lib", None)
    try:
        return _GgmlBackendApi(*[ctypes.cast(getattr(lib, s), ctypes.c_void_p).value for s in _BACKEND_SYMBOLS], None)
    except AttributeError:
        return None


def _check_finite_f32(v: np.ndarray, what: str) -> None:
    if not np.isfinite(v).all():
        raise ValueError(f"{what} is not finite in float32 (a steering value or a sum of them overflows "
                         f"float32, whose largest value is 3.4e38)")


class _Lib:
    """ctypes bindings of the hook's C API in libsaehook (csrc/include/saehook_llama.h)."""

    def __init__(self):
        lib = ctypes.CDLL(get_library())
        c = ctypes
        P = c.c_void_p
        sig = {
            "saehook_llama_hook_create": (P, [c.POINTER(_GgmlApi), c.c_int32, c.c_int32]),
            "saehook_llama_hook_destroy": (None, [P]),
            "saehook_llama_hook_add": (c.c_int32, [P, c.c_int32, P, c.c_int32, c.c_int32, P, c.c_int32, c.c_int]),
            "saehook_llama_hook_add_for_seq": (c.c_int32, [P, c.c_int32, P, c.c_int32, c.c_int32, P, c.c_int32, c.c_int,
                                                           c.c_int32]),
            "saehook_llama_hook_entry_ids": (c.c_int32, [P, P, c.c_int32]),
            "saehook_llama_hook_clear_seq": (None, [P, c.c_int32]),
            "saehook_llama_hook_encode_count": (c.c_int64, [P, P]),
            "saehook_llama_hook_time_ns": (c.c_int64, [P]),
            "saehook_llama_hook_clear_captured": (None, [P, c.c_int32]),
            "saehook_llama_hook_add_reconstruct": (c.c_int32, [P, c.c_int32, P]),
            "saehook_llama_hook_remove": (c.c_int, [P, c.c_int32]),
            "saehook_llama_hook_announce": (c.c_int, [P, c.c_int32, P, P, c.c_int32, P, P, P, c.c_int32]),
            "saehook_llama_hook_announce_batch": (c.c_int, [P, c.c_int32, P, P, P, P, P, c.c_int32, c.c_int32]),
            "saehook_llama_hook_reset_queue": (None, [P]),
            "saehook_llama_hook_unannounced": (c.c_int64, [P]),
            "saehook_llama_hook_set_cvec": (c.c_int, [P, P, c.c_size_t, c.c_int32, c.c_int32, c.c_int32]),
            "saehook_llama_hook_captured": (c.c_int64, [P, c.c_int32]),
            "saehook_llama_hook_k": (c.c_int32, [P, c.c_int32]),
            "saehook_llama_hook_read": (c.c_int, [P, c.c_int32, P, P, P, P, P, P, P]),
            "saehook_llama_hook_keep_residuals": (None, [P, c.c_int32]),
            "saehook_llama_hook_error": (c.c_char_p, [P]),
            "saehook_llama_hook_clear_error": (None, [P]),
            "saehook_llama_hook_set_options": (c.c_int, [P, c.c_int32, c.c_int32, c.c_int32, c.c_int32]),
            "saehook_llama_hook_take_fired": (c.c_int64, [P, c.c_int32, P, P, P, P, c.c_int64]),
            "saehook_llama_hook_set_backend_api": (c.c_int, [P, c.POINTER(_GgmlBackendApi)]),
            "saehook_llama_hook_set_device_path": (None, [P, c.c_int32]),
            "saehook_llama_hook_path": (c.c_int32, [P, c.c_int32, c.c_char_p, c.c_size_t]),
            "saehook_llama_hook_device_copies": (c.c_int32, [P, P]),
            "saehook_llama_hook_emulate_device": (None, [P, c.c_int32]),
        }
        for name, (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
            setattr(self, name.replace("saehook_llama_hook_", ""), f)
        self.callback_address = ctypes.cast(lib.saehook_llama_callback, ctypes.c_void_p).value
        self.lib = lib


_LIB: Optional[_Lib] = None
_INIT_LOCK = threading.Lock()


def _llama_has_amx() -> bool:
    """Whether llama.cpp's CPU backend was built with its AMX code and runs on an AMX CPU."""
    info = llama_cpp.llama_print_system_info()
    return b"AMX_INT8 = 1" in (info if isinstance(info, bytes) else str(info).encode())


def _resolve_extra_bufts(use_extra_bufts: Optional[bool]) -> bool:
    """llama.cpp's extra buffer types (weights repacked for the CPU: AMX tiles, interleaved
    Q4_0/IQ4_NL). None: on, except where llama.cpp uses AMX: its AMX matrix product crashes on
    Sapphire Rapids (ggml-org/llama.cpp#20824; here every model, the demo's Q8_0 included,
    segfaulted in ggml_backend_amx_mul_mat with llama-cpp-python 0.3.36 built from source)."""
    return (not _llama_has_amx()) if use_extra_bufts is None else bool(use_extra_bufts)


@contextlib.contextmanager
def _constructing(owner, use_extra_bufts: bool, context_class=None):
    """While a Llama constructor runs (the caller holds _INIT_LOCK): llama_cpp's internal
    classes swapped so that the model it loads gets use_extra_bufts and, with `context_class`,
    its context is built by that. Llama has no argument for either. Only the owner's params are
    touched: a Llama another thread builds meanwhile gets the real classes' behaviour."""
    real_model, real_context = _internals.LlamaModel, _internals.LlamaContext

    def model(*, path_model, params, **kw):
        if params is getattr(owner, "model_params", None) and hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = use_extra_bufts
        return real_model(path_model=path_model, params=params, **kw)

    _internals.LlamaModel = model
    if context_class is not None:
        _internals.LlamaContext = context_class
    try:
        yield
    finally:
        _internals.LlamaModel, _internals.LlamaContext = real_model, real_context


class _PlainLlama(llama_cpp.Llama):
    def __init__(self, *args, use_extra_bufts: Optional[bool] = None, **kwargs):
        with _INIT_LOCK, _constructing(self, _resolve_extra_bufts(use_extra_bufts)):
            super().__init__(*args, **kwargs)


def plain_llama(*args, use_extra_bufts: Optional[bool] = None, **kwargs) -> "llama_cpp.Llama":
    """A llama_cpp.Llama (no hook) loaded as HookedLlama loads its model: the baseline to compare
    a HookedLlama with, and a way around the AMX crash for plain use."""
    return _PlainLlama(*args, use_extra_bufts=use_extra_bufts, **kwargs)


def _lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


def _ptr(a) -> Optional[int]:
    """Address of a numpy array or of a ctypes pointer's target (None for NULL / None)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return ctypes.cast(a, ctypes.c_void_p).value


@dataclass
class LlamaLayerRecord:
    """Features captured at one layer, one row per evaluated token, in evaluation order."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    generated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # sampled token (else prompt)
    indices: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    residuals: Optional[np.ndarray] = None  # (n, n_embd) with capture(..., residuals=True)


@dataclass
class TokenFeatures:
    """One evaluated token's features (HookedLlama.stream_features): per layer, the k feature
    indices and values of its row, sorted by value (the last block holds only output rows, so a
    prompt token other than the last has no entry for it)."""

    position: int
    token: int
    generated: bool
    features: Dict[int, Tuple[np.ndarray, np.ndarray]]


@dataclass
class _Entry:
    """What Python knows of one C hook entry."""

    layer: int
    seq: int  # -1: every row
    capture: bool
    # what the entry does to the residual (None: nothing), part of the prompt-cache key
    effect: Optional[tuple] = None
    positions: str = "all"
    wants_prompt: bool = False  # a capture that needs every prompt token evaluated


class _NotAliveRef:
    """Stands in for a weak reference to an object that cannot have one: equal only to itself."""

    def __call__(self):
        return None


def _ref(obj):
    """A weak reference to obj: equal to another reference to obj while obj lives, never after,
    so a key holding it cannot match a later object that reuses obj's address."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return _NotAliveRef()


_UNKNOWN_ROW = object()  # a cached row whose hook state is unknown (a state restored from elsewhere)


class _SigintHold:
    """A SIGINT handler that holds a Ctrl-C back while C and Python hook state change together.
    install() is the first call of a critical section: CPython runs pending signal handlers only
    between bytecodes at its check points (the start of a Python function, after a call, a
    backward jump) and signal.signal() itself runs the pending ones with the OLD handler before
    it swaps, so a Ctrl-C that arrives before the swap is raised by install() before anything
    changed, and one that arrives after it reaches this handler. A section that must run to the
    end (a cleanup) therefore installs twice:

        try:
            hold.install()      # may raise a Ctrl-C that was already pending
        finally:
            hold.install()      # now installed, whatever the first one did
            try: ... finally: hold.release()

    release() puts the previous handler back and, once the state is consistent, hands it the
    Ctrl-C held back: Python's default handler raises KeyboardInterrupt, a program's own handler
    is called, SIG_DFL is re-raised (the process ends as it would have). A process that ignores
    SIGINT (SIG_IGN: a background job of a non-interactive shell inherits that) or whose SIGINT
    handler was not set from Python (None: an embedding program's C handler, which
    signal.signal() could not put back) is left alone: install() then changes nothing."""

    __slots__ = ("prev", "pending")

    def __init__(self):
        self.prev, self.pending = None, False

    def __call__(self, signum, frame):
        self.pending = True

    def install(self) -> None:
        try:
            current = signal.getsignal(signal.SIGINT)
            if current is None or current == signal.SIG_IGN:
                return
            self.adopt(signal.signal(signal.SIGINT, self))
        except ValueError:  # not the main thread: Python signal handlers never run there
            pass

    def adopt(self, prev) -> None:
        """Records the handler signal.signal() replaced (not this hold itself, when re-installed)."""
        if prev is not self:
            self.prev = prev

    def release(self) -> None:
        prev, self.prev = self.prev, None
        if prev is not None:
            signal.signal(signal.SIGINT, prev)
        if self.pending:
            self.pending = False
            if callable(prev):
                prev(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif prev == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


class _Generation:
    """State of one generate() call while it runs: how many evals it made (the first evaluates
    the prompt, later ones sampled tokens) and a sampled token evaluated ahead for the features."""

    def __init__(self):
        self.evals = 0
        self.pre_evaluated: Optional[int] = None


class _HookedContext(_internals.LlamaContext):
    """llama-cpp-python's context wrapper whose decode() first tells the hook which tokens the
    batch holds, so every path into llama_decode (eval, generate, embed) is covered."""

    def __init__(self, *, owner: "HookedLlama", **kw):
        self._owner = weakref.ref(owner)  # the Llama owns the context: no cycle
        super().__init__(**kw)

    def decode(self, batch: _internals.LlamaBatch):
        owner = self._owner()
        if owner is not None and owner._dirty:  # an interrupted steer/capture: make C match Python first
            owner._reconcile()
        if owner is None or not owner._entries:
            return super().decode(batch)
        owner.announce_batch(batch.batch, generated=owner._decode_generated)
        try:
            super().decode(batch)
        except Exception:
            owner._reset_queue()
            raise
        owner.raise_hook_error()


class HookedLlama(llama_cpp.Llama):
    """llama_cpp.Llama whose context carries saehook's eval callback. Same arguments, plus
    `context_overrides`: llama_context_params fields Llama has no argument for (e.g.
    {"n_seq_max": 4, "kv_unified": True} to decode several sequences in one batch), and
    `use_extra_bufts`: llama.cpp's repacked CPU weight buffers (None: on, except on CPUs where
    llama.cpp uses AMX, whose matrix product crashes there; see `plain_llama`)."""

    def __init__(self, *args, context_overrides: Optional[Mapping[str, object]] = None,
                 use_extra_bufts: Optional[bool] = None, **kwargs):
        self._hook = None
        self._closed = False
        self._entries: Dict[int, _Entry] = {}  # the live C entries, in the order added
        self._cvec: Dict[int, List[np.ndarray]] = {}  # the active control-vector steerings per layer
        self._cvec_applied: Optional[tuple] = ()  # the control vector llama.cpp holds (None: unknown)
        self._dirty = False  # C state may differ from the above (an interrupted enter/exit)
        self._streams: List["FeatureStream"] = []
        # Prompt cache: the hook state that produced each cached row (by position), so a prefix
        # computed under other steering is evaluated again (see _prepare_cache).
        self._row_keys: List[object] = []
        self._state_version, self._keys_cache = 0, (-1, None, None)
        self._gen: Optional[_Generation] = None  # the generate() call running right now
        self._epoch = 0  # bumped by every call that starts from the model's state; stale streams stop
        self._stop_entries: Dict[int, tuple] = {}  # entry id -> (Steering, its stop items, seq), for stop_when
        self._stop_event: Optional["StopEvent"] = None  # the first stop of the running generate()
        self.last_stop: Optional["StopEvent"] = None    # the stop that ended the last generate(), if any
        self._decode_generated = False
        self._cb = None
        self._device_hook = os.environ.get("SAEHOOK_LLAMA_DEVICE", "1") != "0"
        kwargs.setdefault("verbose", False)  # llama.cpp's load log only when asked for
        real_context = _internals.LlamaContext
        owner = self

        def hooked_context(*, model, params, **kw):
            # Runs inside Llama.__init__ once the model is loaded: create the hook and put the
            # callback into the params the context is created from.
            if params is not getattr(owner, "context_params", None):  # another Llama, another thread
                return real_context(model=model, params=params, **kw)
            lib = _lib()
            owner._n_embd = llama_cpp.llama_model_n_embd(model.model)
            owner._n_layer = llama_cpp.llama_model_n_layer(model.model)
            api = _ggml_api()
            owner._hook = lib.create(ctypes.byref(api), owner._n_embd, owner._n_layer)
            if not owner._hook:
                raise RuntimeError("saehook: cannot create the llama.cpp hook")
            bapi = _ggml_backend_api()  # lets layers on a CUDA device run there (device path)
            if bapi is not None:
                lib.set_backend_api(owner._hook, ctypes.byref(bapi))
            # A ctypes function pointer to the C++ callback (no Python on the per-layer path);
            # kept on the Llama, which outlives its context.
            owner._cb = ctypes.cast(lib.callback_address, llama_cpp.ggml_backend_sched_eval_callback)
            params.cb_eval = owner._cb
            params.cb_eval_user_data = owner._hook
            for name, value in (context_overrides or {}).items():
                if not hasattr(params, name):
                    raise TypeError(f"llama_context_params has no field {name!r}")
                setattr(params, name, value)
            return _HookedContext(owner=owner, model=model, params=params, **kw)

        # Llama creates its context in __init__ with no way to pass a callback: swap the context
        # class for the duration of this constructor only (serialised across HookedLlamas; a
        # plain Llama built meanwhile in another thread is handed the real class).
        with _INIT_LOCK, _constructing(self, _resolve_extra_bufts(use_extra_bufts), hooked_context):
            super().__init__(*args, **kwargs)

    # ---- model facts ----
    @property
    def n_layer(self) -> int:
        return self._n_layer

    @property
    def n_embd_model(self) -> int:
        return self._n_embd

    # ---- where the hook runs (host or CUDA device) ----
    def hook_paths(self) -> Dict[int, str]:
        """Per hooked layer, the path its last micro-batch took: "device N (CUDAN)" (the SAE on
        that GPU, run on the residual's device memory) or "host (why)" (the residual copied to
        the host and back), or "not run yet"."""
        if not self._hook:
            return {}
        lib, out = _lib(), {}
        why = ctypes.create_string_buffer(512)
        for L in sorted({e.layer for e in self._entries.values()}):
            lib.path(self._hook, L, why, len(why))
            out[L] = why.value.decode()
        return out

    @property
    def device_hook(self) -> bool:
        """Whether layers whose residual is on a CUDA device run there (default True, unless the
        environment has SAEHOOK_LLAMA_DEVICE=0); False forces the host path everywhere."""
        return self._device_hook

    @device_hook.setter
    def device_hook(self, on: bool) -> None:
        self._device_hook = bool(on)
        if self._hook:
            _lib().set_device_path(self._hook, int(self._device_hook))

    def device_sae_copies(self) -> Tuple[int, int]:
        """(copies, bytes) of the SAEs the hook holds on CUDA devices (one per SAE and device)."""
        if not self._hook:
            return 0, 0
        b = ctypes.c_int64(0)
        n = _lib().device_copies(self._hook, ctypes.byref(b))
        return int(n), int(b.value)

    def __repr__(self) -> str:
        paths = "; ".join(f"layer {L}: {p}" for L, p in self.hook_paths().items()) or "no hooked layer"
        name = os.path.basename(str(getattr(self, "model_path", "?")))
        return f"HookedLlama({name!r}, n_layer={getattr(self, '_n_layer', '?')}, hook: {paths})"

    @property
    def unannounced_rows(self) -> int:
        """Rows the hook saw at hooked layers without knowing their token (not captured)."""
        return int(_lib().unannounced(self._hook)) if self._hook else 0

    def _check(self, layer: int, sae: SAE) -> None:
        if not 0 <= int(layer) < self._n_layer:
            raise ValueError(f"layer {layer} is outside the model (it has {self._n_layer} layers)")
        if sae.d_model != self._n_embd:
            raise ValueError(f"d_model mismatch: the SAE for layer {layer} has d_model={sae.d_model}, "
                             f"the model's n_embd is {self._n_embd}")

    def _check_steering(self, st) -> None:
        if not isinstance(st, Steering):
            raise TypeError(f"steer() takes Steering objects, got {type(st).__name__}")
        if st.layer is None:
            raise ValueError("Steering has no layer: pass layer= or use an SAE with a layer")
        self._check(st.layer, st.sae)
        for o in st.ops:
            if o.op == "cap" and o.value == float("inf"):  # cap(min=...) alone: no upper bound
                continue
            with np.errstate(over="ignore"):
                value = np.float32(o.value)
            if not np.isfinite(value):
                raise ValueError(f"steering value {o.value!r} for feature {o.feature} is not finite in float32")
        if st.additive_only and st.ops:
            with np.errstate(over="ignore"):
                _check_finite_f32(st.vector(), f"the steering vector at layer {st.layer}")

    # ---- token bookkeeping ----
    def _rows_may_be_grouped_by_sequence(self) -> bool:
        """llama.cpp keeps batch order only with a single KV stream and no recurrent state; else
        its micro-batches may group rows by sequence (llama_batch_allocr::split_equal)."""
        p = self.context_params
        return (p.n_seq_max > 1 and not p.kv_unified) or self._recurrent_memory()

    def _recurrent_memory(self) -> bool:
        return bool(getattr(self, "_is_recurrent", False)) or bool(getattr(self, "_is_hybrid", False))

    def _check_row_order(self, seqs: np.ndarray) -> None:
        """Refuses a multi-sequence batch whose rows llama.cpp may compute out of batch order
        (see saehook_llama.h). On a context that groups rows by sequence (split_equal) the batch
        must hold each sequence as one run of consecutive tokens, every run of the same length,
        and, when the runs are longer than one token, all of it in one micro-batch (n_ubatch);
        sequence ids increase along the batch unless split_equal is non-sequential (a hybrid
        model with kv_unified). split_equal then takes every run whole, in batch order."""
        if len(seqs) < 2 or not self._rows_may_be_grouped_by_sequence():
            return
        if (seqs == seqs[0]).all():
            return
        what = "one KV stream per sequence" if not self._recurrent_memory() else "a recurrent/hybrid model"
        starts = np.flatnonzero(np.r_[True, seqs[1:] != seqs[:-1]])
        run_ids, lengths = seqs[starts], np.diff(np.r_[starts, len(seqs)])
        fix = ("Decode the chunks in batches of their own, or give every sequence the same number of tokens "
               "(equal prompt chunks), or use kv_unified=True on a transformer model")
        if len(np.unique(run_ids)) != len(run_ids):
            raise ValueError(f"a sequence's tokens are not consecutive in the batch: on this context ({what}) "
                             f"llama.cpp groups a micro-batch's rows by sequence, so the hook could not tell which "
                             f"row is which token. {fix}")
        if (lengths != lengths[0]).any():
            raise ValueError(f"sequences with different numbers of tokens in one batch ({lengths.tolist()}): on this "
                             f"context ({what}) llama.cpp's split_equal interleaves them (the same number of tokens "
                             f"of each per micro-batch), so the hook could not tell which row is which token. {fix}")
        n_ubatch = int(llama_cpp.llama_n_ubatch(self._ctx.ctx))  # as llama.cpp clamped it (<= n_batch)
        if lengths[0] > 1 and len(seqs) > n_ubatch:
            raise ValueError(f"{len(run_ids)} sequences of {lengths[0]} tokens ({len(seqs)} rows) span more than one "
                             f"micro-batch (n_ubatch {n_ubatch}): on this context ({what}) llama.cpp's split_equal "
                             f"would then take part of every sequence per micro-batch, out of batch order. Decode at "
                             f"most n_ubatch rows of equal chunks at once")
        p = self.context_params
        sequential = bool(getattr(self, "_is_recurrent", False)) or (p.n_seq_max > 1 and not p.kv_unified)
        if sequential and (np.diff(run_ids) <= 0).any():
            raise ValueError(f"sequences on this context ({what}, no kv_unified) keep batch order only with sequence "
                             f"ids increasing in the batch (llama.cpp's sequential split_equal would take [0, 2, 1] "
                             f"as [0, 1] then [2]); got {run_ids.tolist()}: sort the batch by sequence id")

    def _flags(self, generated: bool) -> int:
        # With embeddings on, llama.cpp makes every token an output whatever the batch says.
        return (_BATCH_GENERATED if generated else 0) | (_BATCH_OUTPUT_ALL if self.context_params.embeddings else 0)

    @staticmethod
    def _generated_array(generated, n: int):
        """(batch flag, per-token int8 array or None) from a bool or one bool per token."""
        if isinstance(generated, (bool, np.bool_)):
            return bool(generated), None
        g = np.ascontiguousarray(np.asarray(generated, dtype=bool), dtype=np.int8)
        if g.shape != (n,):
            raise ValueError(f"generated has {g.size} flags for {n} tokens")
        return False, g

    def announce_batch(self, batch: "llama_cpp.llama_batch", *, generated=False) -> None:
        """Tells the hook which tokens the next llama_decode of `batch` (a llama_cpp.llama_batch)
        evaluates. HookedLlama's own decodes do this; call it before decoding a batch you built.
        generated: the batch's tokens were sampled (True) or are prompt (False), or one flag per
        token. A token in several sequences counts as its first sequence's."""
        if self._hook is None or batch.n_tokens <= 0:
            return
        n = int(batch.n_tokens)
        if batch.seq_id:
            seqs = np.fromiter((batch.seq_id[i][0] for i in range(n)), np.int32, n)
            self._check_row_order(seqs)
        flag, g = self._generated_array(generated, n)
        if batch.pos:
            pos0 = 0
        else:  # llama.cpp continues the sequence
            pos0 = self.n_tokens
        rc = _lib().announce_batch(self._hook, n, _ptr(batch.token), _ptr(batch.pos), _ptr(batch.seq_id),
                                   _ptr(batch.logits), _ptr(g), pos0, self._flags(flag))
        if rc != 0:
            raise RuntimeError(f"saehook_llama_hook_announce_batch failed ({rc})")

    def announce(self, tokens: Sequence[int], positions: Sequence[int], *, seq_ids: Optional[Sequence[int]] = None,
                 outputs: Optional[Sequence[bool]] = None, generated=False) -> None:
        """Like announce_batch, from lists: the tokens of the next llama_decode, in batch order.
        outputs: whose logits are requested (default: the last token only, llama.cpp's default);
        generated: True/False for the whole batch, or one flag per token."""
        n = len(tokens)
        if n == 0 or self._hook is None:
            return
        t = np.ascontiguousarray(tokens, dtype=np.int32)
        p = np.ascontiguousarray(positions, dtype=np.int32)
        s = None if seq_ids is None else np.ascontiguousarray(seq_ids, dtype=np.int32)
        o = None if outputs is None else np.ascontiguousarray(outputs, dtype=np.int8)
        if len(p) != n or (o is not None and len(o) != n) or (s is not None and len(s) != n):
            raise ValueError("tokens, positions, seq_ids and outputs must have the same length")
        if s is not None:
            self._check_row_order(s)
        flag, g = self._generated_array(generated, n)
        rc = _lib().announce(self._hook, n, _ptr(t), _ptr(p), 0, _ptr(s), _ptr(o), _ptr(g), self._flags(flag))
        if rc != 0:
            raise RuntimeError(f"saehook_llama_hook_announce failed ({rc})")

    @property
    def encode_count(self) -> int:
        """SAE encodes the hook's callback has run so far (one per (SAE, k) group, layer and
        micro-batch when entries share their encode)."""
        return int(_lib().encode_count(self._hook, None)) if self._hook else 0

    @property
    def hook_seconds(self) -> float:
        """Seconds the hook's callback has spent so far on hooked blocks (reading their rows,
        SAE encodes, steering write-back): the hook's own share of the decodes, timed where it
        runs (on the GPU path the host's side: kernels launched, not awaited)."""
        return int(_lib().time_ns(self._hook)) * 1e-9 if self._hook else 0.0

    def live_entry_ids(self) -> List[int]:
        """The ids of the entries live on the C side (for checks: it equals what Python holds)."""
        if not self._hook:
            return []
        lib = _lib()
        n = lib.entry_ids(self._hook, None, 0)
        ids = np.zeros(max(n, 1), np.int32)
        n = lib.entry_ids(self._hook, _ptr(ids), len(ids))
        return ids[:n].tolist()

    def _reset_queue(self) -> None:
        if self._hook:
            _lib().reset_queue(self._hook)

    def raise_hook_error(self) -> None:
        """Raises the first error the callback met (it cannot raise inside llama.cpp)."""
        err = _lib().error(self._hook) if self._hook else None
        if err:
            _lib().clear_error(self._hook)
            raise RuntimeError(f"saehook llama.cpp hook: {err.decode()}")

    # ---- the model's state across calls ----
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this HookedLlama was closed (close() freed its model and context); "
                               "create a new HookedLlama to generate again")

    def _supersede(self) -> None:
        """A call that starts from the model's state: a generation suspended earlier (an
        abandoned stream) can no longer continue and raises if resumed."""
        if self._gen is None:
            self._epoch += 1

    def _changed(self) -> None:
        self._state_version += 1

    def _keys(self):
        """The hook state that changes the residual of a prompt row and of a generated row now:
        the entries that steer or splice (for the high-level path's sequence 0) and the control
        vector. A cached row is reused only under the key it was evaluated with."""
        if self._keys_cache[0] != self._state_version:
            effects = [(e.effect, e.positions) for e in self._entries.values()
                       if e.effect is not None and e.seq in (-1, 0)]
            cv = tuple((layer, np.sum(vs, axis=0).tobytes()) for layer, vs in sorted(self._cvec.items()) if vs)
            prompt = (tuple(f for f, p in effects if p != "generated"), cv)
            generated = (tuple(f for f, p in effects if p != "prompt"), cv)
            self._keys_cache = (self._state_version, prompt, generated)
        return self._keys_cache[1], self._keys_cache[2]

    def _set_row_keys(self, start: int, stop: int, key) -> None:
        if len(self._row_keys) < stop:
            self._row_keys.extend([_UNKNOWN_ROW] * (stop - len(self._row_keys)))
        self._row_keys[start:stop] = [key] * (stop - start)

    def _wants_prompt(self) -> bool:
        return any(e.wants_prompt for e in self._entries.values())

    def _prepare_cache(self, reset: bool) -> None:
        """Before generate() reuses a cached prefix (llama-cpp-python keeps the longest common
        prefix of the new prompt in the KV cache): keep only the rows evaluated under the hook
        state in force now for a prompt row, and none when a capture wants the prompt's
        features (it gets them by evaluating the prompt again)."""
        n = self.n_tokens
        if n == 0:
            return
        if not reset:
            if self._wants_prompt():
                warnings.warn(f"saehook: generate(reset=False) continues from {n} cached tokens, which are not "
                              f"re-evaluated, so not captured", stacklevel=4)
            return
        if self._wants_prompt():
            keep = 0
        else:
            now = self._keys()[0]
            keys = self._row_keys
            keep = 0
            while keep < n and keep < len(keys) and keys[keep] == now:
                keep += 1
        if keep >= n:
            return
        if keep > 0 and self._ctx.kv_cache_seq_rm(-1, keep, -1):
            self.n_tokens = keep
            self._requires_eval = True
        else:  # nothing to keep, or a recurrent memory that cannot drop a suffix
            llama_cpp.Llama.reset(self)

    def save_state(self):
        self._check_open()
        state = super().save_state()
        state.saehook_row_keys = list(self._row_keys[: state.n_tokens])
        return state

    def load_state(self, state) -> None:
        """Also restores the hook state the saved rows were computed under (a state saved by
        another program or model is treated as unknown: re-evaluated before reuse)."""
        self._check_open()
        self._supersede()
        super().load_state(state)
        keys = getattr(state, "saehook_row_keys", None)
        if keys is None or len(keys) != state.n_tokens:
            keys = [_UNKNOWN_ROW] * state.n_tokens
        self._row_keys = list(keys)

    def reset(self):
        self._check_open()
        self._supersede()
        super().reset()

    def eval(self, tokens: Sequence[int]):
        self._check_open()
        g = self._gen
        self._supersede()
        tokens = list(tokens)
        # Inside generate(), the first eval is the (uncached part of the) prompt and later ones
        # evaluate sampled tokens: that is how positions='prompt'|'generated' are told apart.
        generated = g is not None and g.evals > 0
        if g is not None:
            if g.pre_evaluated is not None and tokens[:1] == [g.pre_evaluated]:
                tokens = tokens[1:]  # evaluated already, for its features (stream_features)
            g.pre_evaluated = None
            g.evals += 1
            if not tokens:
                return
        key = self._keys()[1 if generated else 0]
        start = self.n_tokens
        self._decode_generated = generated
        try:
            super().eval(tokens)
        finally:
            self._decode_generated = False
            self._set_row_keys(start, self.n_tokens, key)
            for fs in self._streams:
                fs._pull()
        unbound = [i for i, (_, _, seq) in self._stop_entries.items() if seq < 0]
        if unbound:
            for ev in self.take_stops(unbound):
                if ev.generated and ev.seq_id == 0 and g is not None and self._stop_event is None:
                    self._stop_event = ev

    def generate(self, tokens, *args, **kwargs):
        """llama_cpp.Llama.generate, plus: a cached prefix is reused only when the hook state that
        produced it is the one in force now (else it is evaluated again; a capture of the prompt
        always gets it evaluated), a suspended generation stops with an error once another call
        used the model, and with stream_features() active each sampled token is evaluated before
        it is yielded, so its features (the last token's included) are there with it. With
        stop_when conditions steering, it ends after the first generated token on which one holds
        (the token it held on is the last one yielded) and sets last_stop (a StopEvent)."""
        self._check_open()
        reset = kwargs.get("reset", args[6] if len(args) > 6 else True)
        self._supersede()
        epoch = self._epoch
        g = _Generation()
        self._stop_event = self.last_stop = None
        self._prepare_cache(reset)
        inner = super().generate(tokens, *args, **kwargs)
        sent = None
        try:
            while True:
                if self._epoch != epoch:
                    raise RuntimeError("this generation was superseded: another call on the model (generate, a "
                                       "completion, eval, reset, ...) started after it; finish or close a stream "
                                       "before the next call")
                if self._stop_event is not None:  # the token yielded last (evaluated ahead) held a stop
                    self.last_stop = self._stop_event
                    return
                self._gen = g
                try:
                    token = inner.send(sent)
                    if self._stop_event is not None:  # the eval of the previous token held a stop
                        self.last_stop = self._stop_event
                        return
                    if self._streams and not self._closed:  # evaluate it now, for its features
                        self.eval([token])
                        g.pre_evaluated = token
                except StopIteration:
                    return
                finally:
                    self._gen = None
                sent = yield token
        finally:
            inner.close()

    def create_completion(self, *args, **kwargs):
        """llama_cpp.Llama.create_completion (create_chat_completion goes through it); a completion
        ended by stop_when has finish_reason "stop_when" and choices[0]["saehook"] =
        {"stop_when": the condition's report}."""
        self._check_open()
        out = super().create_completion(*args, **kwargs)
        if not kwargs.get("stream", False):
            self._mark_stop(out["choices"][0])
            return out

        def chunks():
            for chunk in out:
                if chunk["choices"] and chunk["choices"][0].get("finish_reason") is not None:
                    self._mark_stop(chunk["choices"][0])
                yield chunk

        return chunks()

    def _mark_stop(self, choice: dict) -> None:
        if self.last_stop is not None:
            choice["finish_reason"] = "stop_when"
            choice["saehook"] = {"stop_when": self.last_stop.report()}

    def take_stops(self, entries: Optional[Iterable[int]] = None) -> List["StopEvent"]:
        """The stop_when conditions that held on rows decoded since the last call (of the given
        entry ids, default all), per entry and row in evaluation order (each row once, its first
        stop condition). generate() takes those of the entries not bound to a sequence itself."""
        lib, out = _lib(), []
        for i in list(self._stop_entries) if entries is None else entries:
            if i not in self._stop_entries:
                continue
            st, stop_items, _ = self._stop_entries[i]
            n = int(lib.take_fired(self._hook, i, None, None, None, None, 0))
            if n <= 0:
                continue
            width = len(st.items())
            seq, pos = np.zeros(n, np.int32), np.zeros(n, np.int32)
            gen, fired = np.zeros(n, np.int8), np.zeros((n, width), np.uint8)
            n = int(lib.take_fired(self._hook, i, _ptr(seq), _ptr(pos), _ptr(gen), _ptr(fired), n))
            for r in range(n):
                hit = [j for j, t in enumerate(stop_items) if fired[r, t]]
                if hit:
                    out.append(StopEvent(st, st.stops[hit[0]], hit[0], int(seq[r]), int(pos[r]), bool(gen[r])))
        return out

    def _add(self, layer: int, sae: SAE, *, capture: bool = False, k: int = 0, items: Optional[np.ndarray] = None,
             positions="all", reconstruct: bool = False, seq: int = -1, wants_prompt: bool = False) -> int:
        """Adds a C entry and records it in self._entries at once (with SIGINT held back by the
        callers, nothing runs between the two; an id lost to an exception in between is an
        orphan that _reconcile removes)."""
        self._check_open()
        lib = _lib()
        n = 0 if items is None else len(items)
        if reconstruct:
            i = lib.add_reconstruct(self._hook, int(layer), sae.handle)
        else:
            # a window (start, end) is set on the entry afterwards (_add_steering); the code is "all"
            code = _POS_CODE[positions] if isinstance(positions, str) else _POS_CODE["all"]
            i = lib.add_for_seq(self._hook, int(layer), sae.handle, int(capture), int(k), _ptr(items) if n else None, n,
                                code, int(seq))
        if i < 0:  # _check and Steering validate first, so this is unexpected
            raise ValueError(f"saehook: cannot hook layer {layer} with this SAE")
        effect = None
        if reconstruct:
            effect = (int(layer), "reconstruct", _ref(sae))
        elif n:
            effect = (int(layer), "steer", _ref(sae), int(k), items.tobytes())
        self._entries[i] = _Entry(int(layer), int(seq), bool(capture), effect, positions, wants_prompt)
        if effect is not None:
            self._changed()
        return i

    def _add_steering(self, st: Steering, seq: int = -1) -> int:
        """One callback entry for a Steering: its items, its position window, and its stop_when
        conditions recorded for take_stops()."""
        i = self._add(st.layer, st.sae, items=st.items(), positions=st.positions, seq=seq)
        window = st.positions if isinstance(st.positions, tuple) else (0, None)
        lo, hi = window[0], -1 if window[1] is None else window[1]
        if (lo, hi) != (0, -1) or st.stops:
            if _lib().set_options(self._hook, i, int(lo), int(hi), int(bool(st.stops))) != 0:
                self._remove(i)
                raise ValueError(f"saehook: bad position window {st.positions!r}")
        if st.stops:
            self._stop_entries[i] = (st, st.stop_items(), int(seq))
        return i

    def _forget(self, ids: Iterable[int]) -> None:
        """Python forgets the entries first (so what it believes is what must hold), then C is
        made to match."""
        for i in ids:
            self._stop_entries.pop(i, None)
            e = self._entries.pop(i, None)
            if e is not None and e.effect is not None:
                self._changed()

    def _remove(self, i: int) -> None:
        self._forget([i])
        if self._hook:
            _lib().remove(self._hook, i)

    def _reconcile(self) -> None:
        """Makes the C side match Python's records: removes C entries Python does not hold (an
        interrupted add or remove) and loads the control vector Python's steerings sum to."""
        self._dirty = True
        if self._hook:
            for i in self.live_entry_ids():
                if i not in self._entries:
                    _lib().remove(self._hook, i)
            live = set(self.live_entry_ids())
            for i in [i for i in self._entries if i not in live]:
                self._forget([i])
        if self._cvec_applied != self._cvec_key():
            self._apply_cvec()
        self._dirty = False

    def _settle(self) -> None:
        """_reconcile, retried when an exception (an injected or second interrupt) stops it; the
        first exception is raised once C and Python agree."""
        first = None
        for _ in range(3):
            try:
                self._reconcile()
                break
            except BaseException as e:  # noqa: B902 - KeyboardInterrupt too: it is re-raised below
                first = first or e
        if first is not None:
            raise first

    @contextlib.contextmanager
    def _entered(self, setup: Callable[[List[int], List[Tuple[int, np.ndarray]]], None], result=None,
                 teardown: Optional[Callable[[], None]] = None):
        """The context manager capture()/splice()/steer()/stream_features() return: setup(ids,
        cvecs) adds the block's entries (their ids into `ids`) and control vectors (into `cvecs`),
        then the block yields `result`; on exit, teardown() (e.g. reading the records), then
        Python forgets the block and _settle makes the C side match. Setup and cleanup run with
        a Ctrl-C held back (_SigintHold); one that came during setup is raised when the hold
        ends, inside the try, so the cleanup still runs. A with statement whose __exit__ is
        interrupted before it starts leaves this generator suspended: closing it (when the
        context manager is freed) runs the same cleanup."""
        ids: List[int] = []
        cvecs: List[Tuple[int, np.ndarray]] = []
        hold = _SigintHold()
        try:
            hold.install()  # the first call: see _SigintHold
            self._dirty = True
            setup(ids, cvecs)
            self._settle()
            hold.release()
            yield result
        finally:
            try:
                hold.install()  # may raise a Ctrl-C pending since before the swap ...
            finally:
                hold.install()  # ... so the cleanup installs again and runs whatever the first did
                try:
                    self._dirty = True
                    try:
                        if teardown is not None:
                            teardown()
                    finally:
                        self._forget(ids)
                        for layer, v in cvecs:
                            lst = self._cvec.get(layer, [])
                            for j, x in enumerate(lst):
                                if x is v:
                                    del lst[j]
                                    self._changed()
                                    break
                        self._settle()
                finally:
                    hold.release()

    # ---- capture ----
    def _read_into(self, r: LlamaLayerRecord, i: int, residuals: bool) -> None:
        """Fills r with the rows entry i captured so far."""
        lib = _lib()
        n, kk = lib.captured(self._hook, i), lib.k(self._hook, i)
        if n < 0:  # the entry is gone (an interrupted exit): nothing to read
            return
        r.tokens, r.positions, r.seq_ids = (np.empty(n, np.int32) for _ in range(3))
        gen = np.empty(n, np.int8)
        r.values, r.indices = np.empty((n, kk), np.float32), np.empty((n, kk), np.int32)
        r.residuals = np.empty((n, self._n_embd), np.float32) if residuals else None
        lib.read(self._hook, i, _ptr(r.tokens), _ptr(r.positions), _ptr(r.seq_ids), _ptr(gen),
                 _ptr(r.values), _ptr(r.indices), _ptr(r.residuals))
        r.generated = gen.astype(bool)

    def capture(self, saes: Mapping[int, SAE], *, k: Optional[int] = None,
                residuals: bool = False) -> ContextManager[Dict[int, LlamaLayerRecord]]:
        """Records the Top-K features at each layer for every token evaluated inside the block;
        the records are filled when the block exits. A generation inside the block evaluates
        its whole prompt, even a prefix llama-cpp-python has cached (that is what a capture of
        the prompt asks for; the cost is one prompt evaluation), except generate(reset=False),
        which keeps the cache and warns that those tokens are not captured. At a steered layer
        the records hold the residual before the steering. residuals=True also keeps the raw
        residual rows."""
        self._check_open()
        for layer, sae in saes.items():
            self._check(layer, sae)
        lib = _lib()
        rec: Dict[int, LlamaLayerRecord] = {int(layer): LlamaLayerRecord() for layer in saes}
        ids: Dict[int, int] = {}
        unannounced = self.unannounced_rows

        def setup(block_ids, _):
            if residuals:
                lib.keep_residuals(self._hook, 1)
            for layer, sae in saes.items():
                i = self._add(layer, sae, capture=True, k=int(k or 0), wants_prompt=True)
                block_ids.append(i)
                ids[int(layer)] = i

        def teardown():
            try:
                for layer, i in ids.items():
                    self._read_into(rec[layer], i, residuals)
            finally:
                if residuals:
                    lib.keep_residuals(self._hook, 0)
            missed = self.unannounced_rows - unannounced
            if missed:
                warnings.warn(f"saehook: {missed} rows were decoded without an announcement and not captured "
                              "(call announce_batch() before a llama_decode you issue yourself)", stacklevel=5)

        return self._entered(setup, rec, teardown)

    # ---- splicing ----
    def splice(self, saes: Mapping[int, SAE]) -> ContextManager[None]:
        """Replaces the residual after each given layer by its SAE reconstruction in every decode
        inside the block (for evaluation: the loss with the SAE spliced in)."""
        self._check_open()
        for layer, sae in saes.items():
            self._check(layer, sae)

        def setup(ids, _):
            for layer, sae in saes.items():
                ids.append(self._add(layer, sae, reconstruct=True))

        return self._entered(setup)

    # ---- steering ----
    def _uses_cvec(self, st: Steering) -> bool:
        # llama.cpp's control vector has no row for block 0 and steers every position. It is
        # added before the callback sees the block's output, so it must not follow a callback
        # change at that layer (steerings apply in the order they are given and entered).
        return (st.additive_only and st.positions == "all" and st.layer >= 1
                and not any(e.layer == st.layer and e.effect is not None for e in self._entries.values()))

    def _cvec_key(self) -> tuple:
        return tuple((layer, np.sum(vs, axis=0).tobytes()) for layer, vs in sorted(self._cvec.items()) if vs)

    def _apply_cvec(self) -> None:
        """Loads the sum of the active additive steerings as llama.cpp's control vector (and
        tells the hook, so captures at those layers still read the residual before it)."""
        ctx = self._ctx.ctx
        key = self._cvec_key()
        active = {layer: np.sum(vs, axis=0) for layer, vs in self._cvec.items() if vs}
        self._cvec_applied = None  # unknown until both calls below are done
        if not active:
            rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self._n_embd, -1, -1)
            _lib().set_cvec(self._hook, None, 0, self._n_embd, -1, -1)
        else:
            # Row j of the buffer is added to the output of block j + 1.
            buf = np.zeros((self._n_layer - 1, self._n_embd), np.float32)
            for layer, v in active.items():
                buf[layer - 1] = v
            _check_finite_f32(buf, "the control vector")
            # Only the steered range: llama.cpp adds one graph node per layer in it.
            lo, hi = min(active), max(active)
            rc = llama_cpp.llama_set_adapter_cvec(ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                  buf.size, self._n_embd, lo, hi)
            if rc == 0:
                _lib().set_cvec(self._hook, buf.ctypes.data, buf.size, self._n_embd, lo, hi)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")
        self._cvec_applied = key

    def steer(self, *steerings: Steering, control_vectors: bool = True) -> ContextManager[None]:
        """Applies the steerings to every decode inside the block, in order (after those of
        enclosing blocks). Add-only steerings of all positions at layers >= 1 become llama.cpp
        control vectors (control_vectors=False forces the callback) unless a callback change at
        that layer comes before them; the others run in the callback with one encode per layer.
        A prompt prefix llama-cpp-python cached under other steering is evaluated again."""
        self._check_open()
        for st in steerings:
            self._check_steering(st)

        def setup(ids, cvecs):
            for st in steerings:
                if control_vectors and self._uses_cvec(st):
                    v = st.vector()
                    self._cvec.setdefault(st.layer, []).append(v)
                    cvecs.append((st.layer, v))
                    self._changed()
                    continue
                ids.append(self._add_steering(st))

        return self._entered(setup)

    # ---- streaming features ----
    def stream_features(self, saes: Mapping[int, SAE], *, k: Optional[int] = None, prompt: bool = False,
                        on_token: Optional[Callable[[TokenFeatures], None]] = None) -> ContextManager["FeatureStream"]:
        """Delivers each token's features as it is evaluated, for streaming (create_completion /
        create_chat_completion with stream=True inside the block):

            with llm.stream_features({12: sae}, k=5) as fs:
                for chunk in llm.create_chat_completion(messages, stream=True):
                    for tf in fs.take():   # TokenFeatures: position, token, generated, features
                        ...

        Inside the block each sampled token is evaluated before generate() yields it (one
        decode that llama-cpp-python would make anyway before sampling the next token, plus one
        for the last token, which it never evaluates), so by the time a token reaches the
        stream its features are in fs.take() and on_token(tf) has been called. prompt=True also
        delivers the prompt's tokens (the prompt is then evaluated whole, as for capture());
        prompt=False leaves the prompt cache alone. k: features per token (default the SAE's)."""
        self._check_open()
        for layer, sae in saes.items():
            self._check(layer, sae)
        fs = FeatureStream(bool(prompt), on_token)

        def setup(ids, _):
            for layer, sae in saes.items():
                i = self._add(layer, sae, capture=True, k=int(k or 0), wants_prompt=bool(prompt))
                ids.append(i)
                fs._ids[int(layer)] = i
            fs._llm = self
            self._streams.append(fs)

        def teardown():
            try:
                fs._pull()
            finally:
                if fs in self._streams:
                    self._streams.remove(fs)
                fs._llm = None

        return self._entered(setup, fs, teardown)

    # ---- per-sequence entries (continuous batching) ----
    def hook_sequence(self, seq_id: int, steerings: Iterable[Steering] = (),
                      capture: Optional[Mapping[int, SAE]] = None, k: Optional[int] = None) -> "SequenceHook":
        """Steering and capture bound to one sequence id: they touch only the rows announced
        with seq_id (announce/announce_batch with seq_ids), so one llama_decode can serve
        several sequences with different steering. Steerings all run in the callback (a control
        vector would steer every sequence); at one layer, entries with the same SAE and k share
        one encode per micro-batch. capture: {layer: SAE}, k: features kept per row (default
        the SAE's k). Returns a SequenceHook; close it (or use `with`) when the sequence ends."""
        return SequenceHook(self, seq_id, steerings, capture, k)

    def embed(self, *args, **kwargs):
        self._check_open()
        self._supersede()
        return super().embed(*args, **kwargs)

    def close(self) -> None:
        """Frees the model, its context and the hook; any later use raises RuntimeError."""
        self._closed = True
        self._streams = []
        super().close()  # frees the context first: the hook must outlive it
        if getattr(self, "_hook", None):
            _lib().destroy(self._hook)
            self._hook = None
        self._entries = {}


def _refuse_after_close(name: str):
    """A llama_cpp.Llama method that uses the freed model or context after close() (a SIGSEGV in
    llama.cpp): HookedLlama raises a RuntimeError instead."""
    base = getattr(llama_cpp.Llama, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        self._check_open()
        return base(self, *args, **kwargs)
    return method


for _name in ("tokenize", "detokenize", "create_chat_completion", "create_embedding",
              "create_chat_completion_openai_v1", "__call__", "n_ctx", "n_embd", "n_vocab", "token_bos", "token_eos",
              "token_nl", "tokenizer", "sample", "set_cache"):
    if hasattr(llama_cpp.Llama, _name):
        setattr(HookedLlama, _name, _refuse_after_close(_name))
del _name


class FeatureStream:
    """Features of the tokens evaluated inside a HookedLlama.stream_features block. take()
    returns the TokenFeatures delivered since the last take, in position order."""

    def __init__(self, prompt: bool, on_token: Optional[Callable[[TokenFeatures], None]]):
        self.prompt = prompt
        self._on_token = on_token
        self._ids: Dict[int, int] = {}
        self._llm: Optional[HookedLlama] = None
        self._ready: List[TokenFeatures] = []

    def _pull(self) -> None:
        """Moves the rows the hook captured since the last pull into TokenFeatures."""
        llm = self._llm
        if llm is None or not llm._hook:
            return
        lib = _lib()
        by_pos: Dict[int, TokenFeatures] = {}
        for layer, i in self._ids.items():
            r = LlamaLayerRecord()
            llm._read_into(r, i, False)
            lib.clear_captured(llm._hook, i)
            for j in range(len(r.tokens)):
                if not (r.generated[j] or self.prompt):
                    continue
                p = int(r.positions[j])
                tf = by_pos.get(p)
                if tf is None:
                    tf = by_pos[p] = TokenFeatures(p, int(r.tokens[j]), bool(r.generated[j]), {})
                tf.features[layer] = (r.indices[j].copy(), r.values[j].copy())
        for p in sorted(by_pos):
            tf = by_pos[p]
            self._ready.append(tf)
            if self._on_token is not None:
                self._on_token(tf)

    def take(self) -> List[TokenFeatures]:
        out, self._ready = self._ready, []
        return out


@dataclass
class StopEvent:
    """A stop_when condition that held on a decoded row."""

    steering: Steering
    condition: object  # the saehook.When (an element of steering.stops)
    index: int         # its index in steering.stops
    seq_id: int
    position: int      # the absolute position of the token it held on
    generated: bool

    def report(self) -> dict:
        from .protocol import stop_report

        return stop_report(self.condition, self.index, self.position)


class SequenceHook:
    """The entries of one sequence (HookedLlama.hook_sequence). take() returns the rows captured
    since the last take, in evaluation order; close() removes the entries (idempotent)."""

    def __init__(self, llm: HookedLlama, seq_id: int, steerings: Iterable[Steering],
                 capture: Optional[Mapping[int, SAE]], k: Optional[int]):
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)) or int(seq_id) < 0:
            raise ValueError(f"seq_id must be an integer >= 0, got {seq_id!r}")
        if llm._hook is None:
            raise RuntimeError("this HookedLlama was closed (close()); create a new one")
        steerings = list(steerings)
        for st in steerings:
            llm._check_steering(st)
        capture = dict(capture or {})
        for layer, sae in capture.items():
            llm._check(layer, sae)
        if k is not None and int(k) <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.seq_id = int(seq_id)
        self._llm = llm
        self._ids: List[int] = []
        self._captures: Dict[int, int] = {}
        hold = _SigintHold()  # a Ctrl-C between an add and its record here would orphan the entry
        try:
            hold.install()
            for st in steerings:
                self._ids.append(llm._add_steering(st, seq=self.seq_id))
            for layer, sae in capture.items():
                i = llm._add(layer, sae, capture=True, k=int(k or 0), seq=self.seq_id)
                self._ids.append(i)
                self._captures[int(layer)] = i
        except BaseException:
            self.close()
            raise
        finally:
            hold.release()

    def take_stops(self) -> List["StopEvent"]:
        """The stop_when conditions of this sequence's steerings that held since the last call."""
        if self._llm is None:
            raise RuntimeError("this SequenceHook was closed")
        return self._llm.take_stops([i for i in self._ids if i in self._llm._stop_entries])

    def take(self) -> Dict[int, LlamaLayerRecord]:
        """The rows captured for this sequence since the last take, per layer, then forgotten."""
        if self._llm is None:
            raise RuntimeError("this SequenceHook was closed")
        out = {}
        for layer, i in self._captures.items():
            r = LlamaLayerRecord()
            self._llm._read_into(r, i, False)
            _lib().clear_captured(self._llm._hook, i)
            out[layer] = r
        return out

    def close(self) -> None:
        if self._llm is None:
            return
        hold = _SigintHold()  # made first: a Ctrl-C in its __init__ leaves the sequence untouched
        try:
            hold.install()  # may raise a Ctrl-C pending since before the swap (see _SigintHold) ...
        finally:
            hold.install()  # ... so install again: this sequence's entries go whatever happens
            try:
                llm, self._llm = self._llm, None
                if llm is None:
                    return
                llm._dirty = True
                llm._forget(self._ids)
                self._ids, self._captures = [], {}
                if llm._hook:
                    llm._settle()
                    _lib().clear_seq(llm._hook, self.seq_id)
            finally:
                hold.release()

    def __enter__(self) -> "SequenceHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        with np.errstate(over="ignore"):
            per_layer[st.layer] = per_layer.get(st.layer, 0) + st.vector()
            _check_finite_f32(np.asarray(per_layer[st.layer], np.float32), f"the control vector of layer {st.layer}")
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
