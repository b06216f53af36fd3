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


def _next_token_losses(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


class LlamaEngine(Engine):
    def __init__(self, path: str, n_ctx: int = 2048, threads: Optional[int] = None, logits_all: bool = False):
        from .llama import HookedLlama

        self.llm = HookedLlama(path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), verbose=False, seed=0,
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


class HFEngine(Engine):
    """A transformers causal LM directory (local files only). Without a tokenizer in the
    directory, text is read as bytes (token id = byte value)."""

    def __init__(self, path: str):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in
                            ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
        self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None

    @property
    def n_layer(self) -> int:
        from .hf import decoder_layers

        return len(decoder_layers(self.model))

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
