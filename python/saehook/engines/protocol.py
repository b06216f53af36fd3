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


def gguf_model_facts(path: str) -> dict:
    """{"architecture", "n_layer", "n_embd", "n_ctx_train"} from a GGUF file's header (the gguf
    package reads the key-value section and the tensor table; no weights are read)."""
    import gguf

    try:
        r = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/struct errors on anything that is not GGUF
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

    def value(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    facts = {"architecture": arch}
    for name, key in (("n_layer", "block_count"), ("n_embd", "embedding_length"), ("n_ctx_train", "context_length")):
        v = value(f"{arch}.{key}")
        facts[name] = None if v is None else int(v)
    return facts


DEFAULT_N_CTX = 2048


class LlamaEngine(Engine):
    """A GGUF model through llama.cpp (`HookedLlama`), its log quiet (verbose=False).

    n_ctx: None means DEFAULT_N_CTX tokens, or the model's training context when that is
    shorter (llama.cpp warns on every load when n_ctx exceeds it); a number is used as given."""

    def __init__(self, path: str, n_ctx: Optional[int] = None, threads: Optional[int] = None, logits_all: bool = False,
                 verbose: bool = False):
        from .llama import HookedLlama

        if n_ctx is None:
            n_ctx_train = gguf_model_facts(path)["n_ctx_train"]
            n_ctx = min(DEFAULT_N_CTX, n_ctx_train) if n_ctx_train else DEFAULT_N_CTX
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
        with self.torch.no_grad(), hf.steer(self.model, *steerings):
            out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos or 0)
        new = out[0, ids.shape[1]:].tolist()
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        return new[: next((i for i, t in enumerate(new) if t in eos_ids), len(new))]  # as llama: EOS not shown


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
