"""Dataset workflows: capture per-token features, then stats, compare and classify over captures."""
from __future__ import annotations

import json
import os

from .common import Optional, Progress, print_table


def load_layers(path: str, layers: Optional[str], k: Optional[int]) -> dict:
    from .. import load
    from ..formats import SAESet

    obj = load(path, k=k)
    wanted = [int(x) for x in layers.split(",")] if layers else None
    if isinstance(obj, SAESet):
        return {L: obj[L] for L in (wanted or obj.layers)}
    layer = wanted[0] if wanted else obj.layer
    if layer is None or (wanted and len(wanted) > 1):
        raise ValueError(f"{path} is one SAE: pass the one --layers it reads")
    return {layer: obj}


def cmd_capture(args) -> int:
    from ..workflows.datasets import capture, read_documents
    from ..engines import open_engine

    saes = load_layers(args.sae, args.layers, args.k)
    docs = read_documents(args.data)
    eng = open_engine(args.model, args.engine)

    bar = Progress("capturing documents", len(docs))
    try:
        res = capture(eng, saes, docs, args.out, shard_docs=args.shard_docs, max_tokens=args.max_tokens,
                      manifest_extra={"model": os.path.abspath(args.model), "sae": os.path.abspath(args.sae),
                                      "data": os.path.abspath(args.data)}, progress=lambda done, total: bar(done))
    finally:
        bar.close()
    print(json.dumps(res) if args.json else f"{args.out}: {res['written']} shards written, {res['skipped']} already there")
    return 0


def cmd_stats(args) -> int:
    import numpy as np

    from ..workflows.datasets import FeatureData, feature_stats, write_json
    from ..workflows.report import histogram_svg, table_html

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
        print_table(["feature", "frequency", "mean", "max", "top context"],
                     [[f"#{s['feature']}", f"{s['frequency']:.4f}", f"{s['mean']:.3f}", f"{s['max']:.3f}",
                       repr(s["top_contexts"][0]["context"] if s["top_contexts"] else "")] for s in live[: args.report_rows]])
    return 0


def cmd_compare(args) -> int:
    from ..workflows.datasets import FeatureData, compare
    from ..workflows.report import table_html

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
        print_table(["feature", "freq A", "freq B", "log(A/B)"],
                     [[f"#{s['feature']}", f"{s['freq_a']:.4f}", f"{s['freq_b']:.4f}", f"{s['log_ratio']:+.2f}"]
                      for s in res["separating_features"]])
    return 0


def cmd_classify(args) -> int:
    from ..workflows.datasets import FeatureData
    from ..workflows.probe import LinearProbe, document_matrix, train

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


def register(sub) -> None:
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
    cp.set_defaults(fn=cmd_capture)
    sp = sub.add_parser("stats", help="per-feature frequency, activations, top contexts, dead features")
    sp.add_argument("dir")
    sp.add_argument("--layer", type=int)
    sp.add_argument("--top", type=int, default=5, help="contexts kept per feature")
    sp.add_argument("--report-rows", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_stats)
    cm = sub.add_parser("compare", help="evaluation analysis between two captured datasets")
    cm.add_argument("a")
    cm.add_argument("b")
    cm.add_argument("--layer", type=int)
    cm.add_argument("--top", type=int, default=20)
    cm.add_argument("--redundancy", type=float, default=0.95, help="profile cosine above which documents count as redundant")
    cm.add_argument("--html")
    cm.add_argument("--json", action="store_true")
    cm.set_defaults(fn=cmd_compare)
    cl = sub.add_parser("classify", help="a linear probe on pooled features: train (held-out metrics) or predict")
    cl.add_argument("action", choices=["train", "predict"])
    cl.add_argument("dir", help="a capture directory (labels from the captured data file)")
    cl.add_argument("--probe", required=True, help="probe file (.npz) written by train, read by predict")
    cl.add_argument("--out", help="predict: JSONL of doc_id, label")
    cl.add_argument("--layer", type=int)
    cl.add_argument("--test-fraction", type=float, default=0.25)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(fn=cmd_classify)
