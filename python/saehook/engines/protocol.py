"""The model engines behind the command line: a GGUF file through llama.cpp (default) or a
transformers model directory, with the same operations and the same output."""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..sae import SAE
from ..steering import Steering


class Engine:
    """tokenize / token_text / features / generate over one model."""

    # After generate(): the stop_when condition that ended it ({"condition", "when", "index",
    # "position"}), or None.
    last_stop: Optional[dict] = None

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        raise NotImplementedError

    def features(self, tokens: Sequence[int], saes: Mapping[int, SAE]) -> Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{layer: (positions, values, indices)}, one row per captured token (llama.cpp keeps, on
        the model's last layer, only the rows whose logits it computes: there, the last token)."""
        raise NotImplementedError

    def generate(self, tokens: Sequence[int], max_tokens: int, steerings: Sequence[Steering] = ()) -> List[int]:
        """Greedy continuation (deterministic, so runs with and without steering compare)."""
        raise NotImplementedError

    def residuals(self, tokens: Sequence[int], layer: int) -> np.ndarray:
        """The residual stream after `layer` for every token (n, d_model) float32."""
        raise NotImplementedError

    def token_losses(self, tokens: Sequence[int], splice: Optional[Mapping[int, SAE]] = None) -> np.ndarray:
        """Cross-entropy (nats) of each next token, tokens[1:], optionally with SAEs spliced in."""
        raise NotImplementedError

    @property
    def n_layer(self) -> int:
        raise NotImplementedError

    @property
    def d_model(self) -> int:
        """Width of the residual stream (what an SAE's d_model must be)."""
        raise NotImplementedError


def _next_token_losses(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


# GGUF value types (gguf.GGUFValueType) -> size in bytes of a scalar; 8 = string, 9 = array
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_model_facts(path: str) -> dict:
    """{"architecture", "n_layer", "n_embd", "n_ctx_train"} from a GGUF file's key-value header
    (None where a key is absent). Reads the keys in order and stops once it has these four, which
    writers put before the tokenizer's arrays: about a millisecond, where gguf.GGUFReader, which
    builds every field, took 27 s on a header with a 151k-token vocabulary. Arrays met on the way
    are skipped without being read. Not a validator: llama.cpp checks the file when it loads it."""
    import struct

    want = {"n_layer": "block_count", "n_embd": "embedding_length", "n_ctx_train": "context_length"}
    facts: dict = {"architecture": None, **{k: None for k in want}}
    found: dict = {}

    def read(f, n):
        b = f.read(n)
        if len(b) != n:
            raise ValueError(f"{path}: truncated GGUF header")
        return b

    def string(f) -> bytes:
        (n,) = struct.unpack("<Q", read(f, 8))
        return read(f, n)

    def skip(f, vtype: int) -> None:
        if vtype in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[vtype], 1)
        elif vtype == 8:
            (n,) = struct.unpack("<Q", read(f, 8))
            f.seek(n, 1)
        elif vtype == 9:
            etype, count = struct.unpack("<IQ", read(f, 12))
            if etype in _GGUF_SCALAR:
                f.seek(_GGUF_SCALAR[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        version, _, n_kv = struct.unpack("<IQQ", read(f, 20))
        if version < 2 or version > 255:
            raise ValueError(f"{path}: GGUF version {version} is not supported here (2 or 3 expected)")
        for _ in range(n_kv):
            key = string(f).decode("utf-8", errors="replace")
            (vtype,) = struct.unpack("<I", read(f, 4))
            if key == "general.architecture" and vtype == 8:
                facts["architecture"] = string(f).decode("utf-8", errors="replace")
            elif key.count(".") == 1 and key.split(".")[1] in want.values() and vtype in _GGUF_FORMAT:
                found[key] = struct.unpack(_GGUF_FORMAT[vtype], read(f, _GGUF_SCALAR[vtype]))[0]
            else:
                skip(f, vtype)
            arch = facts["architecture"]
            if arch and all(f"{arch}.{k}" in found for k in want.values()):
                break
    arch = facts["architecture"]
    for name, key in want.items():
        if arch and f"{arch}.{key}" in found:
            facts[name] = int(found[f"{arch}.{key}"])
    return facts


_LOG_CALLBACK = None  # the ctypes callback llama.cpp holds (kept alive here)


def quiet_llama_log() -> None:
    """Makes verbose=False quiet. llama-cpp-python 0.3.36 maps ggml's log levels with an older
    enum (its WARN = 2; ggml now has DEBUG 1, INFO 2, WARN 3, ERROR 4), so with verbose=False
    llama.cpp's warnings still print, as errors. This callback prints errors only, unless the
    last Llama was made with verbose=True (llama-cpp-python's logger at DEBUG): then everything."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import ctypes
    import logging
    import sys

    import llama_cpp

    try:
        from llama_cpp._logger import logger as llama_logger  # what Llama(verbose=...) sets
    except ImportError:
        llama_logger = logging.getLogger("llama-cpp-python")
    last = [0]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous message
            last[0] = level
        if last[0] >= 4 or llama_logger.level <= logging.DEBUG:
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _LOG_CALLBACK = callback


DEFAULT_N_CTX = 2048


def model_keeps_recurrent_state(path: str) -> bool:
    """Whether llama.cpp holds per-sequence recurrent state for this GGUF's architecture
    (llama_model_is_recurrent / _is_hybrid: mamba, rwkv, qwen35, ...): llama.cpp's own answer,
    from a vocab-only load (hyperparameters and vocabulary, no weights)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_default_params()
    p.vocab_only = True
    m = llama_cpp.llama_model_load_from_file(path.encode(), p)
    if not m:
        raise ValueError(f"{path}: llama.cpp cannot load this GGUF")
    try:
        return bool(llama_cpp.llama_model_is_recurrent(m) or llama_cpp.llama_model_is_hybrid(m))
    finally:
        llama_cpp.llama_model_free(m)


def default_context(default: int, n_ctx_train: Optional[int]) -> int:
    """The context to use when none was asked for: `default`, or the model's training context
    when that is shorter (llama-server's default is the training context; llama.cpp warns on
    every load past it). Shared by LlamaEngine and the server (serve.load_server)."""
    return min(default, n_ctx_train) if n_ctx_train else default


class LlamaEngine(Engine):
    """A GGUF model through llama.cpp (`HookedLlama`), its log quiet (verbose=False).

    n_ctx: None means DEFAULT_N_CTX tokens, or the model's training context when that is
    shorter (llama.cpp warns on every load when n_ctx exceeds it); a number is used as given."""

    def __init__(self, path: str, n_ctx: Optional[int] = None, threads: Optional[int] = None, logits_all: bool = False,
                 verbose: bool = False):
        from .llama import HookedLlama

        quiet_llama_log()
        if n_ctx is None:
            n_ctx = default_context(DEFAULT_N_CTX, gguf_model_facts(path)["n_ctx_train"])
        self.llm = HookedLlama(path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), verbose=verbose, seed=0,
                               logits_all=logits_all)

    def residuals(self, tokens, layer):
        self.llm.reset()
        probe = _probe_sae(self.llm.n_embd_model)
        with self.llm.capture({layer: probe}, residuals=True) as rec:
            self.llm.eval(list(tokens))
        return rec[layer].residuals

    def token_losses(self, tokens, splice=None):
        if not self.llm._logits_all:
            raise ValueError("token losses need every position's logits: open the engine with logits_all=True")
        self.llm.reset()
        with (self.llm.splice(splice) if splice else contextlib.nullcontext()):
            self.llm.eval(list(tokens))
        return _next_token_losses(np.asarray(self.llm.scores[: len(tokens)]), tokens)

    @property
    def n_layer(self) -> int:
        return self.llm.n_layer

    @property
    def d_model(self) -> int:
        return self.llm.n_embd_model

    def tokenize(self, text: str) -> List[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([int(token)]).decode("utf-8", errors="replace")

    def features(self, tokens, saes):
        self.llm.reset()
        with self.llm.capture(saes) as rec:
            self.llm.eval(list(tokens))
        return {layer: (r.positions, r.values, r.indices) for layer, r in rec.items()}

    def generate(self, tokens, max_tokens, steerings=()):
        self.llm.reset()
        out: List[int] = []
        with self.llm.steer(*steerings):
            for tok in self.llm.generate(list(tokens), top_k=1, temp=0.0, reset=True):
                if tok == self.llm.token_eos() or len(out) >= max_tokens:
                    break
                out.append(int(tok))
        stop = self.llm.last_stop
        self.last_stop = stop.report() if stop is not None else None
        return out


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars (loading / writing shards) on the command line's stderr."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


class HFEngine(Engine):
    """A transformers causal LM directory (local files only). Without a tokenizer in the
    directory, text is read as bytes (token id = byte value)."""

    def __init__(self, path: str):
        import torch
        import transformers

        self.torch = torch
        with quiet_transformers():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in
                            ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
        self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None

    @property
    def n_layer(self) -> int:
        from .hf import decoder_layers

        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        from .hf import _hidden_size

        return _hidden_size(self.model)

    def tokenize(self, text: str) -> List[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token: int) -> str:
        if self.tok is None:
            return bytes([token]).decode("utf-8", errors="replace") if token < 256 else f"<{token}>"
        return self.tok.decode([int(token)])

    def features(self, tokens, saes):
        from . import hf

        with self.torch.no_grad(), hf.capture(self.model, saes) as rec:
            self.model(self.torch.tensor([list(tokens)]))
        return {layer: (np.arange(len(tokens)), r.values, r.indices) for layer, r in rec.items()}

    def residuals(self, tokens, layer):
        from . import hf

        with self.torch.no_grad(), hf.capture(self.model, {layer: _probe_sae(hf._hidden_size(self.model))},
                                              residuals=True) as rec:
            self.model(self.torch.tensor([list(tokens)]))
        return rec[layer].residuals

    def token_losses(self, tokens, splice=None):
        from . import hf

        with self.torch.no_grad(), (hf.splice(self.model, splice) if splice else contextlib.nullcontext()):
            logits = self.model(self.torch.tensor([list(tokens)])).logits[0].float().numpy()
        return _next_token_losses(logits, tokens)

    def generate(self, tokens, max_tokens, steerings=()):
        from . import hf

        ids = self.torch.tensor([list(tokens)])
        eos = getattr(self.model.config, "eos_token_id", None)
        self.last_stop = None
        with self.torch.no_grad(), hf.steer(self.model, *steerings) as session:
            kw = {"stopping_criteria": session.stopping_criteria()} if any(st.stops for st in steerings) else {}
            out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos or 0,
                                      attention_mask=self.torch.ones_like(ids), **kw)
        new = out[0, ids.shape[1]:].tolist()
        ev = session.stops[0] if session.stops else None
        if ev is not None:  # generate sampled past the token the condition held on
            new = new[: ev.position + 1 - ids.shape[1]]
            self.last_stop = stop_report(ev.condition, ev.index, ev.position)
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        return new[: next((i for i, t in enumerate(new) if t in eos_ids), len(new))]  # as llama: EOS not shown


def stop_report(condition, index: int, position: int) -> dict:
    """The JSON-able record of a stop_when condition that fired (CLI, server)."""
    return {"condition": repr(condition), "when": condition.to_json(), "index": int(index), "position": int(position)}


def _probe_sae(d_model: int) -> SAE:
    """A one-feature SAE: capturing with it records the raw residual rows at almost no cost."""
    z = np.zeros((1, d_model), np.float32)
    return SAE(z, z, k=1)


def open_engine(model: str, engine: Optional[str] = None, **kw) -> Engine:
    """A GGUF file -> llama.cpp; a directory with config.json -> transformers (or force one)."""
    if engine is None:
        engine = "hf" if os.path.isdir(model) else "llama"
    if engine == "llama":
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model}: not a GGUF file (use --engine hf for a transformers directory)")
        return LlamaEngine(model, **kw)
    if engine == "hf":
        if not os.path.exists(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"{model}: not a transformers model directory (no config.json)")
        return HFEngine(model)
    raise ValueError(f"unknown engine {engine!r}; expected 'llama' or 'hf'")
