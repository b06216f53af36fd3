"""Prompts of the explainer and the detection scorer, in delphi's format: each example with the
tokens where the feature fires between << >>, followed by a line of those tokens with their
activations scaled to 0..10 (ceil(10 * a / the feature's max)); the explainer answers with a
last line `[EXPLANATION]: ...`. The detection scorer sees the explanation and one unmarked
example and answers Yes or No. The wording is saehook's own."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence

HIGHLIGHT_THRESHOLD = 0.3   # a token is marked when its activation > 0.3 x the example's max (delphi's default)
MAX_LISTED_ACTIVATIONS = 10

EXPLAIN_SYSTEM = """You study the features of a language model. A feature is a direction inside the model that becomes active on some tokens of a text. You are shown text examples; in each, the tokens where the feature is active are put between << and >>, and a line after the example lists those tokens with their activation on a scale from 0 to 10.

Find what the marked tokens have in common (the words themselves, their meaning, or the context around them) and describe it.
- Give one short, specific description; no list of alternatives.
- Do not mention the << >> markers or the numbers.
- End your answer with a last line of the form
[EXPLANATION]: <description>"""

COMPACT_INSTRUCTION = "Text examples; the tokens where one feature of a language model is active are marked <<like this>>."

DETECT_SYSTEM = """You check descriptions of features of a language model. You are given the description of a feature and one text example. Answer Yes if the feature, as described, would be active somewhere in the example, and No if it would not. Answer with Yes or No only."""


def _show(token: str) -> str:
    return token.replace("\n", "\\n")


def highlight(tokens: Sequence[str], acts: Sequence[float], threshold: float = HIGHLIGHT_THRESHOLD) -> str:
    """The example's text with runs of active tokens between << >>."""
    peak = max(acts) if len(acts) else 0.0
    cut = peak * threshold
    out, inside = [], False
    for tok, a in zip(tokens, acts):
        on = peak > 0 and a > cut
        if on and not inside:
            out.append("<<")
        if not on and inside:
            out.append(">>")
        inside = on
        out.append(_show(tok))
    if inside:
        out.append(">>")
    return "".join(out)


def activation_line(tokens: Sequence[str], acts: Sequence[float], max_activation: float,
                    threshold: float = HIGHLIGHT_THRESHOLD) -> str:
    """'Activations: ("tok", 7), ...' for the marked tokens (the first ten), scaled to 0..10."""
    peak = max(acts) if len(acts) else 0.0
    scale = max(max_activation, 1e-6)
    pairs = [f'("{_show(t)}", {min(10, max(0, math.ceil(10 * a / scale)))})'
             for t, a in zip(tokens, acts) if peak > 0 and a > peak * threshold]
    return "Activations: " + ", ".join(pairs[:MAX_LISTED_ACTIVATIONS])


def explanation_messages(examples: Sequence, max_activation: float, *, style: str = "delphi") -> List[Dict[str, str]]:
    """Chat messages asking for an explanation of the examples (contexts.Example objects).
    style 'delphi': the system prompt and activation lines; 'compact': one instruction line and
    the marked examples only, for models with a short context (the demo model's is 512)."""
    if style not in ("delphi", "compact"):
        raise ValueError(f"unknown prompt style {style!r}; expected 'delphi' or 'compact'")
    lines = []
    for i, ex in enumerate(examples, 1):
        lines.append(f"Example {i}: {highlight(ex.tokens, ex.acts)}")
        if style == "delphi":
            lines.append(activation_line(ex.tokens, ex.acts, max_activation))
    body = "\n".join(lines)
    if style == "compact":
        return [{"role": "user", "content": f"{COMPACT_INSTRUCTION}\n{body}"}]
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": body}]


def detection_messages(explanation: str, text: str) -> List[Dict[str, str]]:
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Feature description: {explanation}\n\nText example: {_show(text)}\n\n"
                                        "Is the feature active in this example?"}]


def render_plain(messages: Sequence[Dict[str, str]], answer_prefix: str) -> str:
    """Messages as plain text for a model without a chat template, ending with `answer_prefix`
    for the model to continue."""
    return "\n\n".join(m["content"] for m in messages) + "\n" + answer_prefix


_EXPLANATION = re.compile(r"\[EXPLANATION\]:\s*(.*)", re.DOTALL)


def parse_explanation(text: str) -> str:
    """The description in a model's answer: what follows the last `[EXPLANATION]:`, else the
    answer's last non-empty line; one line, whitespace collapsed ('' when there is nothing)."""
    found = _EXPLANATION.findall(text)
    part = found[-1] if found else text
    lines = [ln.strip() for ln in part.strip().split("\n") if ln.strip()]
    if not lines:
        return ""
    return " ".join((lines[0] if found else lines[-1]).split())
