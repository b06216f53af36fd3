"""Commands that run a model with an SAE: features, steer, export-cvec, eval."""
from __future__ import annotations

import json
import os
import sys

from .common import add_steer_flags, load_one, model_flags, print_table, steering, steerings


def cmd_features(args) -> int:
    from ..engines import open_engine
    from ..workflows.report import features_html

    sae = load_one(args.sae, args.layer, args.k)
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
        print(json.dumps({"layer": sae.layer, "rows": rows}, indent=1))
    else:
        print_table(["pos", "token", "top features"],
                     [[row["position"], repr(row["text"]), "  ".join(f"#{i}={v:.2f}" for i, v in row["features"])]
                      for row in rows])
    if args.html:
        feature = args.feature
        if feature is None:  # the feature with the largest total activation over the text
            totals: dict = {}
            for row in rows:
                for i, v in row["features"]:
                    totals[i] = totals.get(i, 0.0) + v
            feature = max(totals, key=totals.get) if totals else 0
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(features_html(texts, rows, feature, title=f"{os.path.basename(args.model)}, layer {sae.layer}"))
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
    if args.json:
        print(json.dumps({"prompt": args.prompt, "steering": desc, "clean": text(clean), "steered": text(steered),
                          "clean_tokens": clean, "steered_tokens": steered, "stopped_by": stop}, indent=1))
    else:
        print(f"prompt:  {args.prompt!r}\n{desc}\nclean:   {text(clean)!r}\nsteered: {text(steered)!r}")
        if stop:
            print(f"stopped: {stop['condition']} at position {stop['position']}")
    return 0


def cmd_export_cvec(args) -> int:
    from ..engines.llama import export_control_vector

    sae = load_one(args.sae, args.layer, args.k)
    st = steering(sae, args)
    export_control_vector([st], args.out, model_hint=args.model_hint)
    print(f"wrote {args.out}: control vector for layer {st.layer} (llama.cpp: --control-vector {args.out})")
    return 0


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
    res = evaluate(eng, sae, sae.layer, texts, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for key, val in res.items():
            print(f"{key:>14}: {val:.4f}" if isinstance(val, float) else f"{key:>14}: {val}")
    return 0


def register(sub) -> None:
    f = sub.add_parser("features", help="top SAE features per token of a text (table, JSON, HTML page)")
    model_flags(f)
    f.add_argument("text")
    f.add_argument("--top", type=int, default=5, help="features shown per token")
    f.add_argument("--feature", type=int, help="feature that shades the HTML page (default: the most active)")
    f.add_argument("--html", help="write an HTML page of the text shaded by a feature")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=cmd_features)
    s = sub.add_parser("steer", help="generate with and without an intervention, greedy, side by side")
    model_flags(s)
    add_steer_flags(s)
    s.add_argument("--spec", metavar="FILE.json", help="steering ops, conditions and stops as JSON (see saehook.steering_spec)")
    s.add_argument("prompt")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_steer)
    e = sub.add_parser("export-cvec", help="write an additive steering as a llama.cpp control-vector GGUF")
    e.add_argument("sae")
    e.add_argument("out")
    e.add_argument("--layer", type=int)
    e.add_argument("--k", type=int)
    e.add_argument("--model-hint", default="")
    add_steer_flags(e)
    e.set_defaults(fn=cmd_export_cvec)
    v = sub.add_parser("eval", help="SAE quality on your model and text: FVE, L0, dead features, loss increase")
    model_flags(v)
    v.add_argument("text", nargs="*")
    v.add_argument("--data", help="a .txt (one document per line) or .jsonl (field text) file")
    v.add_argument("--max-tokens", type=int, default=256, help="tokens per document")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_eval)
