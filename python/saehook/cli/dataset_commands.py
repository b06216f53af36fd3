"""Dataset workflows: capture per-token features, then stats, compare and classify over captures."""
from __future__ import annotations

import json
import os
import sys

from ..sae import PREFILTER_MODES
from .common import (
    Optional, Progress, capture_labels, fraction, nonnegative_int, positive_int, print_table, unit_float,
)


def load_layers(path: str, layers: Optional[str], k: Optional[int], prefilter: Optional[str] = None) -> dict:
    """{layer: SAE} of an SAE file or directory, with the --prefilter policy applied
    (saehook.sae.apply_prefilter; capture encodes on the CPU)."""
    saes = _layers_of(path, layers, k)
    from ..sae import apply_prefilter

    _, note = apply_prefilter(saes, prefilter, name_of=lambda L: f"{path} (layer {L})")
    if note:
        print(f"saehook: {note}", file=sys.stderr)
    return saes


def _layers_of(path: str, layers: Optional[str], k: Optional[int]) -> dict:
    from .. import load
    from ..formats import SAESet

    obj = load(path, k=k)
    try:
        wanted = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise ValueError(f"--layers expects comma-separated layer numbers, got {layers!r}") from None
    if isinstance(obj, SAESet):
        missing = [L for L in wanted or [] if L not in obj.layers]
        if missing:
            raise ValueError(f"{path} has no SAE for layer(s) {missing} (it holds layers {obj.layers})")
        return {L: obj[L] for L in (wanted or obj.layers)}
    layer = wanted[0] if wanted else obj.layer
    if layer is None or (wanted and len(wanted) > 1):
        raise ValueError(f"{path} is one SAE: pass the one --layers it reads")
    if obj.layer is not None and int(obj.layer) != layer:
        print(f"saehook: warning: {path} was trained on layer {obj.layer}'s residual, applied at layer {layer} "
              "(its features are not expected to mean the same there)", file=sys.stderr)
    return {layer: obj}


def cmd_capture(args) -> int:
    from ..workflows.datasets import capture, read_documents
    from ..engines import open_engine

    if args.ray is not None:
        return capture_ray(args)
    saes = load_layers(args.sae, args.layers, args.k, args.prefilter)
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


def capture_ray(args) -> int:
    """capture --ray: the same capture by Ray actors (workflows.distributed.capture_on_ray), each
    loading the SAEs as the local capture does (load_layers)."""
    import functools

    from ..workflows.datasets import read_documents
    from ..workflows.distributed import capture_on_ray

    docs = read_documents(args.data)
    bar = Progress("capturing documents on Ray", len(docs))
    try:
        load_saes = functools.partial(load_layers, args.sae, args.layers, args.k, args.prefilter)
        res = capture_on_ray(args.model, load_saes, docs, args.out,
                             address=args.ray or None, engine=args.engine, shard_docs=args.shard_docs,
                             max_tokens=args.max_tokens, num_actors=args.actors,
                             manifest_extra={"model": os.path.abspath(args.model), "sae": os.path.abspath(args.sae),
                                             "data": os.path.abspath(args.data)}, progress=lambda done, total: bar(done))
    finally:
        bar.close()
    print(json.dumps(res) if args.json else
          f"{args.out}: {res['written']} shards written by {res['actors']} actors on {res.get('nodes', 0)} nodes, "
          f"{res['skipped']} already there, {res['actor_failures']} actor failures")
    return 0


def cmd_stats(args) -> int:
    import numpy as np

    from ..workflows.datasets import write_json
    from ..workflows.report import histogram_svg, table_html
    from ..workflows.streaming import StreamingCapture, stream_feature_stats

    data = StreamingCapture(args.dir, args.layer)  # read batch by batch: any size of capture
    stats = stream_feature_stats(data, top=args.top)
    label = capture_labels(data.manifest, data.layer)
    for s in stats:
        s["label"] = label(s["feature"])
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
    rows = [[s["feature"], s["label"] or "", s["frequency"], s["mean"], s["max"],
             s["top_contexts"][0]["context"] if s["top_contexts"] else ""] for s in live[: args.report_rows]]
    page = os.path.join(args.dir, f"stats-layer{data.layer}.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(table_html(f"Feature statistics, layer {data.layer}",
                           f"{data.n_tokens} tokens; {summary['dead_fraction']:.1%} of {data.d_sae} features never fired. "
                           f"The table lists the {len(rows)} most frequent live features: frequency is the fraction of "
                           "tokens on which the feature is among the SAE's active features; mean is its activation "
                           "averaged over those tokens; the context marks the token of its largest activation in [brackets].",
                           ["feature", "label", "frequency", "mean", "max", "top context"], rows,
                           bars=["frequency", "max"],
                           figures=[histogram_svg([np.log10(s["frequency"]) for s in live],
                                                  "firing frequency of the live features (log10 of the fraction of tokens)",
                                                  x_label="log10 frequency", y_label="features"),
                                    histogram_svg([s["mean"] for s in live], "mean activation when firing",
                                                  x_label="mean activation", y_label="features")]))
    if args.json:
        print(json.dumps({"summary": summary, "features": live[: args.report_rows]}, indent=1))
    else:
        print(json.dumps(summary))
        print_table(["feature", "label", "frequency", "mean", "max", "top context"],
                     [[f"#{s['feature']}", s["label"] or "", f"{s['frequency']:.4f}", f"{s['mean']:.3f}", f"{s['max']:.3f}",
                       repr(s["top_contexts"][0]["context"] if s["top_contexts"] else "")] for s in live[: args.report_rows]])
    print(f"wrote {page} and stats-layer{data.layer}.json/.parquet beside it", file=sys.stderr)
    return 0


COMPARE_RANKING = ("Rows are the features whose firing frequency differs most between A and B (largest "
                   "|freq A - freq B| first); frequency is the fraction of a dataset's tokens on which the feature "
                   "is active, and log(A/B) the log ratio of the two (smoothed by one token's frequency).")


def cmd_compare(args) -> int:
    from ..workflows.report import paired_bars_html
    from ..workflows.streaming import StreamingCapture, stream_compare

    a, b = StreamingCapture(args.a, args.layer), StreamingCapture(args.b, args.layer)  # read batch by batch
    res = stream_compare(a, b, top=args.top, redundancy=args.redundancy)
    label = capture_labels(a.manifest, res["layer"])
    for s in res["separating_features"]:
        s["label"] = label(s["feature"])
    coverage = (f"Coverage of B by A = {res['coverage_of_b_by_a']:.1%}: the share of the features active somewhere in B "
                f"({res['active_b']}) that are also active somewhere in A; of A by B = {res['coverage_of_a_by_b']:.1%} "
                f"(of A's {res['active_a']}). {len(res['redundant_docs_b'])} documents of B have a feature profile "
                f"(mean activations) with cosine similarity >= {args.redundancy} to one document of A.")
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(paired_bars_html(f"{os.path.basename(os.path.normpath(args.a))} (A) vs "
                                     f"{os.path.basename(os.path.normpath(args.b))} (B), layer {res['layer']}",
                                     f"A: {res['tokens_a']} tokens, B: {res['tokens_b']} tokens. {coverage} {COMPARE_RANKING}",
                                     res["separating_features"]))
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"active features: A {res['active_a']}, B {res['active_b']}, both {res['active_both']} "
              f"(Jaccard {res['jaccard']:.3f})")
        print(coverage)
        print(COMPARE_RANKING)
        print_table(["feature", "label", "freq A", "freq B", "log(A/B)"],
                     [[f"#{s['feature']}", s["label"] or "", f"{s['freq_a']:.4f}", f"{s['freq_b']:.4f}",
                       f"{s['log_ratio']:+.2f}"]
                      for s in res["separating_features"]])
    return 0


def cmd_classify(args) -> int:
    from ..workflows.datasets import FeatureData
    from ..workflows.probe import LinearProbe, predict, train

    if args.action == "predict" and not args.out:
        raise ValueError("classify predict needs --out FILE.jsonl (where the predictions go)")
    data = FeatureData(args.dir, args.layer)
    if args.action == "train":
        res = train(data, test_fraction=args.test_fraction, seed=args.seed)
        res.pop("probe").save(args.probe)
        print(json.dumps(res, indent=1) if args.json else
              f"held-out accuracy {res['accuracy']:.3f}, macro F1 {res['macro_f1']:.3f} "
              f"({res['n_train']} train / {res['n_test']} test documents); probe written to {args.probe}")
        return 0
    probe = LinearProbe.load(args.probe)
    rows = [{"doc_id": int(i), "label": p} for i, p in predict(probe, data, probe_path=args.probe)]
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def register(sub) -> None:
    cp = sub.add_parser("capture", help="run a dataset through the model and store per-token features (Parquet)")
    cp.add_argument("model", help="a GGUF file (llama.cpp) or a transformers model directory")
    cp.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a file, hf for a directory")
    cp.add_argument("--sae", required=True, help="an SAE file or a directory of layers")
    cp.add_argument("--layers", help="comma-separated layers (default: the SAE's)")
    cp.add_argument("--k", type=positive_int, help="features kept per token (default: the SAE's own k)")
    cp.add_argument("--prefilter", choices=PREFILTER_MODES, default="auto",
                    help="encode float32 SAEs through a bf16 copy of W_enc: the same features, each encode in "
                         "0.6-0.7x the float32 time (prompt-sized batches, 2-core Zen 4), for half of W_enc's bytes "
                         "more memory. auto (default): every float32 SAE while the copies fit in a quarter of the "
                         "available memory; bf16: every SAE (a narrower encoder is refused); off: float32 alone")
    cp.add_argument("--data", required=True,
                    help=".txt (one document per line), .jsonl (fields text, label), .csv (columns text, label) "
                         "or .parquet")
    cp.add_argument("--out", required=True, help="capture directory (created; rerun to resume)")
    cp.add_argument("--shard-docs", type=positive_int, default=64, help="documents per Parquet shard")
    cp.add_argument("--max-tokens", type=positive_int, default=512, help="tokens kept per document (the rest is cut)")
    cp.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="capture on a Ray cluster: ADDRESS as ray.init takes it (auto, HOST:PORT, ray://HOST:10001); "
                         "without one, $RAY_ADDRESS or a new local cluster. --out may then be a URI (s3://, gs://...)")
    cp.add_argument("--actors", type=positive_int, help="--ray: capture actors (default: one per CPU of the cluster)")
    cp.add_argument("--json", action="store_true", help="print the result as JSON")
    cp.set_defaults(fn=cmd_capture)
    sp = sub.add_parser("stats", help="per-feature frequency, activations, top contexts, dead features")
    sp.add_argument("dir", help="a capture directory")
    sp.add_argument("--layer", type=nonnegative_int, help="which captured layer (default: the first)")
    sp.add_argument("--top", type=positive_int, default=5, help="contexts kept per feature")
    sp.add_argument("--report-rows", type=positive_int, default=50, help="features shown in the table and the HTML page")
    sp.add_argument("--json", action="store_true", help="print the summary and rows as JSON")
    sp.set_defaults(fn=cmd_stats)
    cm = sub.add_parser("compare", help="evaluation analysis between two captured datasets")
    cm.add_argument("a", help="capture directory A")
    cm.add_argument("b", help="capture directory B (same SAE and layer)")
    cm.add_argument("--layer", type=nonnegative_int, help="which captured layer (default: the first)")
    cm.add_argument("--top", type=positive_int, default=20, help="separating features listed")
    cm.add_argument("--redundancy", type=unit_float, default=0.95,
                    help="profile cosine above which documents count as redundant")
    cm.add_argument("--html", help="also write an HTML report with A and B frequency bars on one scale")
    cm.add_argument("--json", action="store_true", help="print the full result as JSON")
    cm.set_defaults(fn=cmd_compare)
    cl = sub.add_parser("classify", help="a linear probe on pooled features: train (held-out metrics) or predict")
    cl.add_argument("action", choices=["train", "predict"], help="train a probe, or predict with one")
    cl.add_argument("dir", help="a capture directory (labels from the captured data file)")
    cl.add_argument("--probe", required=True, help="probe file (.npz) written by train, read by predict")
    cl.add_argument("--out", help="predict: JSONL of doc_id, label (required for predict)")
    cl.add_argument("--layer", type=nonnegative_int, help="which captured layer (default: the first)")
    cl.add_argument("--test-fraction", type=fraction, default=0.25, help="share of labelled documents held out")
    cl.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    cl.add_argument("--json", action="store_true", help="print the result as JSON")
    cl.set_defaults(fn=cmd_classify)
