"""The `saehook` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _print_table(columns: List[str], rows: List[list]) -> None:
    """A rich table on a terminal, aligned plain text otherwise (pipes, files)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            t = Table(*columns)
            for r in rows:
                t.add_row(*[str(c) for c in r])
            Console().print(t)
            return
    widths = [max(len(str(c)) for c in [col] + [r[i] for r in rows]) for i, col in enumerate(columns)]
    for r in [columns] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


class _Progress:
    """A progress bar on stderr (rich on a terminal, a counter line otherwise)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.bar = label, total, None
        if sys.stderr.isatty():
            try:
                from rich.progress import Progress

                self.bar = Progress(transient=True)
                self.task = self.bar.add_task(label, total=total)
                self.bar.start()
            except ImportError:
                self.bar = None

    def __call__(self, done: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=f"{self.label} {note}")
        else:
            print(f"\r{self.label}: {done}/{self.total} {note}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            print(file=sys.stderr)


def _cmd_demo(args) -> int:
    from . import demo

    demo.run(prompt=args.prompt, max_tokens=args.max_new_tokens, strength=args.strength)
    return 0


def _describe(sae) -> dict:
    return {
        "d_model": sae.d_model, "d_sae": sae.d_sae, "k": sae.k, "activation": sae.activation,
        "subtract_b_dec": sae.subtract_b_dec, "enc_dtype": sae.enc_dtype, "dec_dtype": sae.dec_dtype,
        "dec_layout": sae.dec_layout, "weight_bytes": sae.weight_bytes, **{
            k: v for k, v in sae.metadata.items() if isinstance(v, (str, int, float, bool))},
    }


def _cmd_info(args) -> int:
    from . import load
    from .formats import SAESet

    obj = load(args.sae, k=args.k, layer=args.layer)
    saes = dict(obj.items()) if isinstance(obj, SAESet) else {obj.layer: obj}
    info = {str(layer): _describe(s) for layer, s in saes.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for layer, d in info.items():
            print(f"layer {layer}:")
            for key, val in d.items():
                if key == "weight_bytes":
                    val = f"{val / 2**20:.1f} MiB"
                print(f"  {key:>15}: {val}")
    return 0


def _cmd_convert(args) -> int:
    from . import load
    from .formats import SAESet

    obj = load(args.sae, k=args.k, layer=args.layer)
    if isinstance(obj, SAESet):
        raise SystemExit("convert takes one layer: pass --layer N")
    obj.save(args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({args.dtype or obj.enc_dtype} encoder)")
    return 0


def _load_one(path: str, layer: Optional[int], k: Optional[int]):
    from . import load
    from .formats import SAESet

    obj = load(path, k=k, layer=layer)
    if isinstance(obj, SAESet):
        raise ValueError(f"{path} holds layers {obj.layers}: pass --layer")
    if layer is not None:
        obj.metadata["layer"] = layer
    if obj.layer is None:
        raise ValueError(f"{path} does not say which layer it reads: pass --layer")
    return obj


def _pairs(specs: List[str], flag: str, value_type=float):
    out = []
    for spec in specs or []:
        f, sep, v = spec.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects FEATURE=VALUE, got {spec!r}")
        out.append((int(f), value_type(v)))
    return out


def _steering(sae, args):
    from .steering import Steering

    st = Steering(sae, layer=sae.layer, positions=args.positions, normalize=args.normalize)
    for f, v in _pairs(args.add, "--add"):
        st.add(f, v)
    for f, v in _pairs(args.clamp, "--clamp"):
        st.clamp(f, v)
    for f, v in _pairs(args.scale, "--scale"):
        st.scale(f, v)
    for f in args.ablate or []:
        st.ablate(int(f))
    if not st.ops:
        raise ValueError("no intervention given: use --add/--clamp/--scale/--ablate")
    return st


def _add_steer_flags(p):
    p.add_argument("--add", action="append", metavar="F=S", help="h += S * d_F")
    p.add_argument("--clamp", action="append", metavar="F=V", help="set feature F's activation to V")
    p.add_argument("--scale", action="append", metavar="F=C", help="multiply feature F's activation by C")
    p.add_argument("--ablate", action="append", metavar="F", help="remove feature F")
    p.add_argument("--normalize", action="store_true", help="use unit-norm decoder directions")
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])


def _model_flags(p):
    p.add_argument("model", help="a GGUF file (llama.cpp) or a transformers model directory")
    p.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a file, hf for a directory")
    p.add_argument("--sae", required=True)
    p.add_argument("--layer", type=int)
    p.add_argument("--k", type=int)


def _cmd_features(args) -> int:
    from .engines import open_engine
    from .report import features_html

    sae = _load_one(args.sae, args.layer, args.k)
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
        _print_table(["pos", "token", "top features"],
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


def _cmd_steer(args) -> int:
    from .engines import open_engine

    sae = _load_one(args.sae, args.layer, args.k)
    st = _steering(sae, args)
    eng = open_engine(args.model, args.engine)
    tokens = eng.tokenize(args.prompt)
    clean = eng.generate(tokens, args.max_tokens)
    steered = eng.generate(tokens, args.max_tokens, [st])
    text = lambda ids: "".join(eng.token_text(t) for t in ids)  # noqa: E731
    if args.json:
        print(json.dumps({"prompt": args.prompt, "steering": repr(st), "clean": text(clean), "steered": text(steered),
                          "clean_tokens": clean, "steered_tokens": steered}, indent=1))
    else:
        print(f"prompt:  {args.prompt!r}\n{st!r}\nclean:   {text(clean)!r}\nsteered: {text(steered)!r}")
    return 0


def _cmd_export_cvec(args) -> int:
    from .llama import export_control_vector

    sae = _load_one(args.sae, args.layer, args.k)
    st = _steering(sae, args)
    export_control_vector([st], args.out, model_hint=args.model_hint)
    print(f"wrote {args.out}: control vector for layer {st.layer} (llama.cpp: --control-vector {args.out})")
    return 0


def _cmd_eval(args) -> int:
    from .engines import open_engine
    from .evaluate import evaluate, read_texts

    sae = _load_one(args.sae, args.layer, args.k)
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


def _load_layers(path: str, layers: Optional[str], k: Optional[int]) -> dict:
    from . import load
    from .formats import SAESet

    obj = load(path, k=k)
    wanted = [int(x) for x in layers.split(",")] if layers else None
    if isinstance(obj, SAESet):
        return {L: obj[L] for L in (wanted or obj.layers)}
    layer = wanted[0] if wanted else obj.layer
    if layer is None or (wanted and len(wanted) > 1):
        raise ValueError(f"{path} is one SAE: pass the one --layers it reads")
    return {layer: obj}


def _cmd_capture(args) -> int:
    from .datasets import capture, read_documents
    from .engines import open_engine

    saes = _load_layers(args.sae, args.layers, args.k)
    docs = read_documents(args.data)
    eng = open_engine(args.model, args.engine)

    bar = _Progress("capturing documents", len(docs))
    try:
        res = capture(eng, saes, docs, args.out, shard_docs=args.shard_docs, max_tokens=args.max_tokens,
                      manifest_extra={"model": os.path.abspath(args.model), "sae": os.path.abspath(args.sae),
                                      "data": os.path.abspath(args.data)}, progress=lambda done, total: bar(done))
    finally:
        bar.close()
    print(json.dumps(res) if args.json else f"{args.out}: {res['written']} shards written, {res['skipped']} already there")
    return 0


def _cmd_stats(args) -> int:
    import numpy as np

    from .datasets import FeatureData, feature_stats, write_json
    from .report import histogram_svg, table_html

    data = FeatureData(args.dir, args.layer)
    stats = feature_stats(data, top=args.top)
    live = sorted((s for s in stats if not s["dead"]), key=lambda s: -s["frequency"])
    summary = {"layer": data.layer, "tokens": data.n_tokens, "features": data.d_sae,
               "dead_fraction": sum(s["dead"] for s in stats) / data.d_sae}
    write_json(os.path.join(args.dir, f"stats-layer{data.layer}.json"), {"summary": summary, "features": stats})
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ("feature", "frequency", "count", "mean", "max", "dead")
    pq.write_table(pa.table({c: [s[c] for s in stats] for c in cols} |
                            {"top_contexts": [[c["context"] for c in s["top_contexts"]] for s in stats]}),
                   os.path.join(args.dir, f"stats-layer{data.layer}.parquet"))
    rows = [[s["feature"], s["frequency"], s["mean"], s["max"], s["top_contexts"][0]["context"] if s["top_contexts"] else ""]
            for s in live[: args.report_rows]]
    with open(os.path.join(args.dir, f"stats-layer{data.layer}.html"), "w", encoding="utf-8") as f:
        f.write(table_html(f"Feature statistics, layer {data.layer}",
                           f"{data.n_tokens} tokens; {summary['dead_fraction']:.1%} of {data.d_sae} features never fired.",
                           ["feature", "frequency", "mean", "max", "top context"], rows, bars=["frequency", "max"],
                           figures=[histogram_svg([np.log10(s["frequency"]) for s in live],
                                                  "log10 firing frequency of the live features"),
                                    histogram_svg([s["mean"] for s in live], "mean activation when firing")]))
    if args.json:
        print(json.dumps({"summary": summary, "features": live[: args.report_rows]}, indent=1))
    else:
        print(json.dumps(summary))
        _print_table(["feature", "frequency", "mean", "max", "top context"],
                     [[f"#{s['feature']}", f"{s['frequency']:.4f}", f"{s['mean']:.3f}", f"{s['max']:.3f}",
                       repr(s["top_contexts"][0]["context"] if s["top_contexts"] else "")] for s in live[: args.report_rows]])
    return 0


def _cmd_compare(args) -> int:
    from .datasets import FeatureData, compare
    from .report import table_html

    a, b = FeatureData(args.a, args.layer), FeatureData(args.b, args.layer)
    res = compare(a, b, top=args.top, redundancy=args.redundancy)
    if args.html:
        rows = [[s["feature"], s["freq_a"], s["freq_b"], s["log_ratio"]] for s in res["separating_features"]]
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(table_html(f"{os.path.basename(args.a)} vs {os.path.basename(args.b)}, layer {res['layer']}",
                               f"coverage of B by A {res['coverage_of_b_by_a']:.1%}, of A by B {res['coverage_of_a_by_b']:.1%}; "
                               f"{len(res['redundant_docs_b'])} documents of B nearly duplicate one of A.",
                               ["feature", "freq A", "freq B", "log(A/B)"], rows, bars=["freq A", "freq B"]))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"active features: A {res['active_a']}, B {res['active_b']}, both {res['active_both']} "
              f"(Jaccard {res['jaccard']:.3f})")
        _print_table(["feature", "freq A", "freq B", "log(A/B)"],
                     [[f"#{s['feature']}", f"{s['freq_a']:.4f}", f"{s['freq_b']:.4f}", f"{s['log_ratio']:+.2f}"]
                      for s in res["separating_features"]])
    return 0


def _cmd_classify(args) -> int:
    from .datasets import FeatureData
    from .probe import LinearProbe, document_matrix, train

    data = FeatureData(args.dir, args.layer)
    if args.action == "train":
        res = train(data, test_fraction=args.test_fraction, seed=args.seed)
        res.pop("probe").save(args.probe)
        print(json.dumps(res, indent=1) if args.json else
              f"held-out accuracy {res['accuracy']:.3f}, macro F1 {res['macro_f1']:.3f} "
              f"({res['n_train']} train / {res['n_test']} test documents); probe written to {args.probe}")
        return 0
    probe = LinearProbe.load(args.probe)
    if probe.layer != data.layer:
        raise ValueError(f"the probe reads layer {probe.layer}, the capture's layer is {data.layer}")
    ids, X = document_matrix(data)
    rows = [{"doc_id": int(i), "label": p} for i, p in zip(ids, probe.predict(X))]
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def _cmd_train(args) -> int:
    from .datasets import read_documents
    from .engines import open_engine
    from .evaluate import evaluate
    from .train import shuffled_batches, train_sae

    docs = [d["text"] for d in read_documents(args.data)]
    held_out = docs[-max(1, len(docs) // 10):] if len(docs) > 1 else docs
    train_docs = docs[: len(docs) - len(held_out)] or docs
    engine = args.engine or ("hf" if os.path.isdir(args.model) else "llama")
    eng = open_engine(args.model, engine, **({"logits_all": True, "n_ctx": args.max_tokens + 8} if engine == "llama" else {}))
    d_model = eng.residuals(eng.tokenize(train_docs[0])[:2] or [0], args.layer).shape[1]

    def rows():  # residuals of the training documents, cycling until training ends
        while True:
            for text in train_docs:
                tokens = eng.tokenize(text)[: args.max_tokens]
                if tokens:
                    yield eng.residuals(tokens, args.layer)

    bar = _Progress("training", args.steps)
    sae = train_sae(shuffled_batches(rows(), args.batch, buffer=max(4 * args.batch, 4096), seed=args.seed),
                    d_model, args.d_sae, args.k, steps=args.steps, lr=args.lr, seed=args.seed,
                    checkpoint=args.checkpoint, metadata={"layer": args.layer, "hook_point": "resid_post",
                                                          "model": os.path.basename(args.model)},
                    progress=lambda step, loss: bar(step, f"loss {loss:.4f}"))
    bar.close()
    sae.save(args.out)
    res = evaluate(eng, sae, args.layer, held_out, max_tokens=args.max_tokens)
    print(json.dumps(res, indent=1) if args.json else f"wrote {args.out}; held-out " +
          ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
    return 0


def _cmd_bench(args) -> int:
    import runpy

    script = "bench_llama.py" if args.llama else "bench_kernels.py"
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("SAEHOOK_BENCH_DIR"), "bench", os.path.join(here, "..", "..", "bench")):
        if d and os.path.exists(os.path.join(d, script)):
            path = os.path.abspath(os.path.join(d, script))
            break
    else:
        raise FileNotFoundError(f"{script} not found: run from a saehook source checkout (it lives in bench/) "
                                "or set SAEHOOK_BENCH_DIR")
    sys.argv = [path] + args.args
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="saehook", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="features and steering on the shipped tiny model, offline")
    d.add_argument("--prompt", default="The with statement is used to")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--strength", type=float, help="clamp value (default: twice the feature's largest activation)")
    d.set_defaults(fn=_cmd_demo)

    i = sub.add_parser("info", help="format, shapes, k, activation, dtypes and memory of an SAE")
    i.add_argument("sae")
    i.add_argument("--k", type=int)
    i.add_argument("--layer", type=int)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)

    c = sub.add_parser("convert", help="write an SAE in saehook's own mmappable format")
    c.add_argument("sae")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["f32", "f16", "bf16", "int8"])
    c.add_argument("--k", type=int)
    c.add_argument("--layer", type=int)
    c.set_defaults(fn=_cmd_convert)

    f = sub.add_parser("features", help="top SAE features per token of a text (table, JSON, HTML page)")
    _model_flags(f)
    f.add_argument("text")
    f.add_argument("--top", type=int, default=5, help="features shown per token")
    f.add_argument("--feature", type=int, help="feature that shades the HTML page (default: the most active)")
    f.add_argument("--html", help="write an HTML page of the text shaded by a feature")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=_cmd_features)

    s = sub.add_parser("steer", help="generate with and without an intervention, greedy, side by side")
    _model_flags(s)
    _add_steer_flags(s)
    s.add_argument("prompt")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_steer)

    e = sub.add_parser("export-cvec", help="write an additive steering as a llama.cpp control-vector GGUF")
    e.add_argument("sae")
    e.add_argument("out")
    e.add_argument("--layer", type=int)
    e.add_argument("--k", type=int)
    e.add_argument("--model-hint", default="")
    _add_steer_flags(e)
    e.set_defaults(fn=_cmd_export_cvec)

    v = sub.add_parser("eval", help="SAE quality on your model and text: FVE, L0, dead features, loss increase")
    _model_flags(v)
    v.add_argument("text", nargs="*")
    v.add_argument("--data", help="a .txt (one document per line) or .jsonl (field text) file")
    v.add_argument("--max-tokens", type=int, default=256, help="tokens per document")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=_cmd_eval)

    cp = sub.add_parser("capture", help="run a dataset through the model and store per-token features (Parquet)")
    cp.add_argument("model")
    cp.add_argument("--engine", choices=["llama", "hf"])
    cp.add_argument("--sae", required=True, help="an SAE file or a directory of layers")
    cp.add_argument("--layers", help="comma-separated layers (default: the SAE's)")
    cp.add_argument("--k", type=int)
    cp.add_argument("--data", required=True, help=".txt, .jsonl or .parquet (text, optional label)")
    cp.add_argument("--out", required=True)
    cp.add_argument("--shard-docs", type=int, default=64)
    cp.add_argument("--max-tokens", type=int, default=512)
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=_cmd_capture)

    sp = sub.add_parser("stats", help="per-feature frequency, activations, top contexts, dead features")
    sp.add_argument("dir")
    sp.add_argument("--layer", type=int)
    sp.add_argument("--top", type=int, default=5, help="contexts kept per feature")
    sp.add_argument("--report-rows", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=_cmd_stats)

    cm = sub.add_parser("compare", help="evaluation analysis between two captured datasets")
    cm.add_argument("a")
    cm.add_argument("b")
    cm.add_argument("--layer", type=int)
    cm.add_argument("--top", type=int, default=20)
    cm.add_argument("--redundancy", type=float, default=0.95, help="profile cosine above which documents count as redundant")
    cm.add_argument("--html")
    cm.add_argument("--json", action="store_true")
    cm.set_defaults(fn=_cmd_compare)

    cl = sub.add_parser("classify", help="a linear probe on pooled features: train (held-out metrics) or predict")
    cl.add_argument("action", choices=["train", "predict"])
    cl.add_argument("dir", help="a capture directory (labels from the captured data file)")
    cl.add_argument("--probe", required=True, help="probe file (.npz) written by train, read by predict")
    cl.add_argument("--out", help="predict: JSONL of doc_id, label")
    cl.add_argument("--layer", type=int)
    cl.add_argument("--test-fraction", type=float, default=0.25)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(fn=_cmd_classify)

    t = sub.add_parser("train", help="train a Top-K SAE on the model's residual stream after a layer")
    t.add_argument("model")
    t.add_argument("--engine", choices=["llama", "hf"])
    t.add_argument("--layer", type=int, required=True)
    t.add_argument("--data", required=True, help=".txt, .jsonl or .parquet documents (the last 10%% are held out)")
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float)
    t.add_argument("--max-tokens", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint", help="resume from / save to this file")
    t.add_argument("--out", required=True)
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_cmd_train)

    b = sub.add_parser("bench", help="run the kernel benchmark (or --llama: the llama.cpp hook benchmark)")
    b.add_argument("--llama", action="store_true")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (see its --help)")
    b.set_defaults(fn=_cmd_bench)

    args, extra = p.parse_known_args(argv)
    if args.cmd == "bench":  # everything else belongs to the benchmark script
        args.args = extra + args.args
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, IndexError, TypeError) as e:
        print(f"saehook {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
