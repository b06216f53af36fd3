"""Commands that run a model with an SAE: features, steer, export-cvec, eval."""
from __future__ import annotations

import json
import os
import sys

from .common import (
    Progress, add_steer_flags, feature_arg, feature_labels, load_one, model_flags,
    nonnegative_int, positive_int, print_table, steering, steerings,
)


def cmd_features(args) -> int:
    from ..engines import open_engine
    from ..workflows.report import features_html

    sae = load_one(args.sae, args.layer, args.k)
    feature = None if args.feature is None else feature_arg(args.feature, sae, "--feature")
    label = feature_labels(sae)
    eng = open_engine(args.model, args.engine)
    tokens = eng.tokenize(args.text)
    if not tokens:
        raise ValueError("the text has no tokens")
    pos, vals, idx = eng.features(tokens, {sae.layer: sae})[sae.layer]
    texts = [eng.token_text(t) for t in tokens]
    rows = [{"position": int(p), "token": int(tokens[p]), "text": texts[p],
             "features": [[int(i), float(v)] for v, i in zip(vals[r], idx[r]) if i >= 0][: args.top]}
            for r, p in enumerate(pos)]
    if args.json:
        labels = {str(i): label(i) for row in rows for i, _ in row["features"] if label(i)}
        print(json.dumps({"layer": sae.layer, "rows": rows, "labels": labels}, indent=1))
    else:
        def shown(i, v):
            return f"#{i}={v:.2f}" + (f" ({label(i)})" if label(i) else "")

        print_table(["pos", "token", "top features"],
                    [[row["position"], repr(row["text"]), "  ".join(shown(i, v) for i, v in row["features"])]
                     for row in rows])
    if args.html:
        if feature is None:  # the feature with the largest total activation over the text
            totals: dict = {}
            for row in rows:
                for i, v in row["features"]:
                    totals[i] = totals.get(i, 0.0) + v
            feature = max(totals, key=totals.get) if totals else 0
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(features_html(texts, rows, feature, title=f"{os.path.basename(args.model)}, layer {sae.layer}",
                                  d_sae=sae.d_sae, label=label(feature)))
        print(f"wrote {args.html} (shaded by feature {feature})", file=sys.stderr)
    return 0


def cmd_steer(args) -> int:
    from ..engines import open_engine

    sae = load_one(args.sae, args.layer, args.k)
    sts = steerings(sae, args)
    eng = open_engine(args.model, args.engine)
    tokens = eng.tokenize(args.prompt)
    clean = eng.generate(tokens, args.max_tokens)
    steered = eng.generate(tokens, args.max_tokens, sts)
    stop = getattr(eng, "last_stop", None)  # the stop_when condition that ended the steered run
    text = lambda ids: "".join(eng.token_text(t) for t in ids)  # noqa: E731
    desc = "; ".join(repr(st) for st in sts)
    label = feature_labels(sae)
    labels = {str(o.feature): label(o.feature) for st in sts for o in st.ops if label(o.feature)}
    if labels:
        desc += "  [" + ", ".join(f"#{f}: {t}" for f, t in labels.items()) + "]"
    if args.json:
        print(json.dumps({"prompt": args.prompt, "steering": desc, "clean": text(clean), "steered": text(steered),
                          "clean_tokens": clean, "steered_tokens": steered, "stopped_by": stop,
                          "labels": labels}, indent=1))
    else:
        print(f"prompt:  {args.prompt!r}\n{desc}\nclean:   {text(clean)!r}\nsteered: {text(steered)!r}")
        if stop:
            print(f"stopped: {stop['condition']} at position {stop['position']}")
    return 0


def cmd_export_cvec(args) -> int:
    from ..engines.llama import export_control_vector
    from ..engines.protocol import gguf_model_facts

    if args.positions != "all":
        raise ValueError(f"--positions {args.positions}: a llama.cpp control vector is added at every position "
                         "(prompt and generated); steer only some positions with `saehook steer` or HookedLlama.steer")
    sae = load_one(args.sae, args.layer, args.k)
    st = steering(sae, args)
    hint = args.model_hint
    if hint and os.path.isfile(hint):  # a model file given as the hint: check against it, write its architecture
        args.model, hint = hint, None
    if args.model:
        facts = gguf_model_facts(args.model)
        n_layer, n_embd = facts["n_layer"], facts["n_embd"]
        if n_layer is not None and not 1 <= st.layer < n_layer:
            raise ValueError(f"--layer {st.layer}: {os.path.basename(args.model)} has {n_layer} blocks; a control vector "
                             f"can steer the output of blocks 1 to {n_layer - 1}")
        if n_embd is not None and n_embd != sae.d_model:
            raise ValueError(f"the SAE has d_model = {sae.d_model}, {os.path.basename(args.model)} has n_embd = {n_embd}")
        hint = hint or facts["architecture"] or ""
    export_control_vector([st], args.out, model_hint=hint or "")
    print(f"wrote {args.out}: control vector for layer {st.layer}" + (f", model hint {hint!r}" if hint else "") +
          f" (llama.cpp: --control-vector {args.out})")
    return 0


EVAL_METRICS = """\
  fve            fraction of the residual's variance the SAE's reconstruction explains (1 = exact; the shipped
                 demo SAE: 0.87; near 0 or negative: the SAE does not fit this model or layer)
  l0             mean number of active features per token (at most k)
  dead_fraction  share of the SAE's features that never fired on these tokens (high on few tokens)
  ce_clean       the model's mean next-token cross-entropy (nats)
  ce_spliced     the same with the layer's residual replaced by the reconstruction
  ce_increase    ce_spliced - ce_clean: what the SAE loses of the model's predictions (small is good)"""


def cmd_eval(args) -> int:
    from ..engines import open_engine
    from ..workflows.evaluate import evaluate, read_texts

    sae = load_one(args.sae, args.layer, args.k)
    texts = list(args.text or []) + (read_texts(args.data) if args.data else [])
    if not texts:
        raise ValueError("give texts or --data FILE")
    engine = args.engine or ("hf" if os.path.isdir(args.model) else "llama")
    # llama.cpp keeps every position's logits only when asked to (and only n_ctx of them)
    kw = {"logits_all": True, "n_ctx": args.max_tokens + 8} if engine == "llama" else {}
    eng = open_engine(args.model, engine, **kw)
    bar = Progress("evaluating documents", len(texts))
    try:
        res = evaluate(eng, sae, sae.layer, texts, max_tokens=args.max_tokens, progress=lambda done: bar(done))
    finally:
        bar.close()
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for key, val in res.items():
            print(f"{key:>14}: {val:.4f}" if isinstance(val, float) else f"{key:>14}: {val}")
        print("\n" + EVAL_METRICS)
    return 0


def register(sub) -> None:
    f = sub.add_parser("features", help="top SAE features per token of a text (table, JSON, HTML page)")
    model_flags(f)
    f.add_argument("text", help="the text to analyse")
    f.add_argument("--top", type=positive_int, default=5, help="features shown per token")
    f.add_argument("--feature", help="feature that shades the HTML page: an index or label:TEXT (default: the most active)")
    f.add_argument("--html", help="write an HTML page of the text shaded by a feature")
    f.add_argument("--json", action="store_true", help="print the rows as JSON")
    f.set_defaults(fn=cmd_features)
    s = sub.add_parser("steer", help="generate with and without an intervention, greedy, side by side")
    model_flags(s)
    add_steer_flags(s)
    s.add_argument("--spec", metavar="FILE.json",
                   help="steering ops, conditions and stop_when as JSON (see saehook.steering_spec), instead of the op flags")
    s.add_argument("prompt", help="the prompt both generations continue")
    s.add_argument("--max-tokens", type=positive_int, default=32, help="tokens generated per continuation")
    s.add_argument("--json", action="store_true", help="print both continuations as JSON")
    s.set_defaults(fn=cmd_steer)
    e = sub.add_parser("export-cvec", help="write an additive steering as a llama.cpp control-vector GGUF")
    e.add_argument("sae", help="an SAE file or directory")
    e.add_argument("out", help="the control-vector GGUF to write")
    e.add_argument("--layer", type=nonnegative_int,
                   help="the layer the SAE reads (default: from its metadata): direction.L is added to block L's output")
    e.add_argument("--k", type=positive_int, help="features kept per token (default: the SAE's own k)")
    e.add_argument("--model", help="the GGUF model the vector is for: the layer and width are checked against it "
                                   "and its architecture becomes the hint")
    e.add_argument("--model-hint", default="",
                   help="controlvector.model_hint, the architecture name llama.cpp's cvector-generator writes "
                        "(e.g. qwen3; llama.cpp's loader ignores it, other GGUF readers take it as the architecture) "
                        "(default: the --model's architecture)")
    add_steer_flags(e)
    e.set_defaults(fn=cmd_export_cvec)
    v = sub.add_parser("eval", help="SAE quality on your model and text: FVE, L0, dead features, loss increase",
                       epilog="metrics:\n" + EVAL_METRICS)
    model_flags(v)
    v.add_argument("text", nargs="*", help="texts to evaluate on (and/or --data)")
    v.add_argument("--data", help="a .txt (one document per line), .jsonl (field text), .csv or .parquet file")
    v.add_argument("--max-tokens", type=positive_int, default=256, help="tokens per document")
    v.add_argument("--json", action="store_true", help="print the metrics as JSON")
    v.set_defaults(fn=cmd_eval, texts_after_options="text")
