"""The explainer and scorer interfaces, and their implementation on a local GGUF model.

Anything with these methods can explain or score (tests use stand-ins behind the same interface):

    explainer.name                                   # recorded as the label's source
    explainer.explain(examples, max_activation) -> str
    scorer.name
    scorer.detect(explanation, texts) -> [bool]      # which texts match the explanation
"""
from __future__ import annotations

import os
from typing import List, Optional, Protocol, Sequence

import numpy as np

from .prompts import detection_messages, explanation_messages, parse_explanation, render_plain


class Explainer(Protocol):
    name: str

    def explain(self, examples: Sequence, max_activation: float) -> str: ...


class Scorer(Protocol):
    name: str

    def detect(self, explanation: str, texts: Sequence[str]) -> List[bool]: ...


class LlamaCppModel:
    """A GGUF model run by llama.cpp (saehook.llama.plain_llama), greedy, as explainer and as
    detection scorer. With a chat template in the GGUF the messages go through it; without one
    they are joined as plain text and the model continues after `[EXPLANATION]:` / `Answer:`.

    Every prompt is evaluated from an empty KV cache (llm.reset()), so an answer does not
    depend on what was asked before: an interrupted and resumed run gives the same labels.
    Examples that do not fit the context (n_ctx, at most the model's training context, minus
    max_new_tokens) are left out, last first; a prompt with one example that does not fit is
    an error. The detection answer is the likelier of Yes / No at the answer position (the
    first token where the two answers' tokenizations differ): a greedy one-word answer."""

    def __init__(self, path: str, *, n_ctx: int = 4096, threads: Optional[int] = None, style: str = "delphi",
                 max_new_tokens: int = 48):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from ..engines.llama import plain_llama

        self.path, self.name, self.style, self.max_new_tokens = path, os.path.basename(path), style, int(max_new_tokens)
        self.llm = plain_llama(path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), verbose=False, seed=0)
        self.n_ctx = min(int(n_ctx), int(self.llm._model.n_ctx_train()) or int(n_ctx))
        self._formatter = None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            tok = self.llm._model.token_get_text
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=tok(self.llm.token_eos()),
                                                  bos_token=tok(self.llm.token_bos()))

    # ---- prompt plumbing ----
    def render(self, messages, answer_prefix: str) -> str:
        if self._formatter is None:
            return render_plain(messages, answer_prefix)
        return self._formatter(messages=list(messages)).prompt

    def tokens(self, prompt: str) -> List[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=self._formatter is not None)

    def _complete(self, tokens: List[int]) -> str:
        self.llm.reset()
        out = self.llm.create_completion(tokens, max_tokens=self.max_new_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]

    def _last_logits(self, tokens: List[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),)).copy()

    # ---- explainer ----
    def explanation_prompt(self, examples: Sequence, max_activation: float) -> List[int]:
        budget = self.n_ctx - self.max_new_tokens
        for n in range(len(examples), 0, -1):
            toks = self.tokens(self.render(explanation_messages(examples[:n], max_activation, style=self.style),
                                           "[EXPLANATION]:"))
            if len(toks) <= budget:
                return toks
        raise ValueError(f"{self.name}: even one example does not fit the explainer's context of {self.n_ctx} tokens "
                         f"(with {self.max_new_tokens} for the answer); use shorter windows (--ctx-len) or "
                         "--prompt compact")

    def explain(self, examples: Sequence, max_activation: float) -> str:
        answer = self._complete(self.explanation_prompt(examples, max_activation))
        if self._formatter is None:  # a plain continuation of "[EXPLANATION]:": its first non-empty line
            answer = "[EXPLANATION]: " + next((ln for ln in answer.split("\n") if ln.strip()), "")
        return parse_explanation(answer) or "(no explanation)"

    # ---- detection scorer ----
    def _answer_tokens(self):
        lead = " " if self._formatter is None else ""
        yes, no = self.tokens(lead + "Yes"), self.tokens(lead + "No")
        common = 0
        while common < min(len(yes), len(no)) and yes[common] == no[common]:
            common += 1
        if common >= min(len(yes), len(no)):
            raise ValueError(f"{self.name}: cannot tell the answers Yes and No apart in its tokenizer")
        return yes[:common], yes[common], no[common]

    def detect(self, explanation: str, texts: Sequence[str]) -> List[bool]:
        shared, yes, no = self._answer_tokens()
        out = []
        for text in texts:
            toks = self.tokens(self.render(detection_messages(explanation, text), "Answer:")) + shared
            if len(toks) > self.n_ctx:
                raise ValueError(f"{self.name}: a detection prompt of {len(toks)} tokens exceeds its context of "
                                 f"{self.n_ctx}; use shorter windows (--ctx-len)")
            logits = self._last_logits(toks)
            out.append(bool(logits[yes] > logits[no]))
        return out

    def close(self) -> None:
        self.llm.close()
