"""Feature labels and search: labels {show,import,explain,score}, search, similar."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from .common import Progress, print_table


def _load_sae(args):
    """The SAE (any format, one layer) with its label store (--labels overrides the place)."""
    from .. import load
    from ..formats import SAESet
    from ..labels import LabelStore

    sae = load(args.sae, k=getattr(args, "k", None), layer=args.layer)
    if isinstance(sae, SAESet):
        raise ValueError(f"{args.sae} holds layers {sae.layers}: pass --layer")
    if args.layer is not None:
        sae.metadata["layer"] = args.layer
    if args.labels:
        sae.labels = LabelStore.open(sae, args.labels)
    return sae


def parse_features(spec: Optional[str], d_sae: int) -> Optional[List[int]]:
    """'1,5,10-20' -> [1, 5, 10, ..., 20] (None for no spec)."""
    if not spec:
        return None
    out = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            rng = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"--features expects indices and ranges like 1,5,10-20, got {part!r}") from None
        if not rng:
            raise ValueError(f"--features: the range {part!r} is empty")
        for f in rng:
            if not 0 <= f < d_sae:
                raise IndexError(f"--features: feature {f} is out of range [0, {d_sae})")
            out.add(f)
    return sorted(out)


def _score_text(rec) -> str:
    det = (rec.score or {}).get("detection")
    if det:
        return f"{det['balanced_accuracy']:.2f}"
    other = (rec.score or {}).get("neuronpedia")
    return f"np {other['value']:.2f}" if other else ""


def cmd_show(args) -> int:
    from ..labels import resolve_feature

    sae = _load_sae(args)
    store = sae.labels
    if args.feature is not None:
        f = resolve_feature(sae, args.feature)
        if f not in store:
            raise ValueError(f"feature {f} has no label in {store.path}")
        rec = store[f]
        if args.json:
            print(json.dumps(rec.to_json(), indent=1, ensure_ascii=False))
            return 0
        print(f"feature #{f}: {rec.label}\nsource:  {rec.source}")
        for kind, val in (rec.score or {}).items():
            print(f"score:   {kind} " + " ".join(f"{k}={v}" for k, v in val.items()))
        if rec.examples:
            from ..labels.prompts import highlight

            print("examples:")
            for ex in rec.examples[: args.examples]:
                print(f"  {max(ex['acts']):7.3f}  {highlight(ex['tokens'], ex['acts'])}")
        return 0
    feats = list(store)
    if args.json:
        print(json.dumps({"path": store.path, "fingerprint": store.fingerprint,
                          "features": [store[f].to_json() for f in feats]}, indent=1, ensure_ascii=False))
        return 0
    print(f"{store.path}: {len(feats)} of {sae.d_sae} features labelled")
    print_table(["feature", "label", "score", "source"],
                [[f"#{f}", store[f].label, _score_text(store[f]), store[f].source] for f in feats[: args.rows]])
    return 0


def cmd_import(args) -> int:
    from ..labels import import_labels

    sae = _load_sae(args)
    store = sae.labels
    res = import_labels(store, args.file, sae, overwrite=not args.keep_existing)
    path = store.save()
    print(json.dumps({**res, "store": path}) if args.json else
          f"{path}: {res['imported']} labels imported from {args.file}" +
          (f", {res['kept']} existing kept" if res["kept"] else ""))
    return 0


def _contexts(args, sae, features):
    """Captures --data at the SAE's layer (or reuses that capture) and reads its windows."""
    from ..engines import open_engine
    from ..labels import FeatureContexts, capture_for
    from ..workflows.datasets import FeatureData, read_documents

    docs = read_documents(args.data)
    directory = args.capture or (sae.labels.path or os.path.abspath("saehook-labels")) + ".captures"
    eng = open_engine(args.model, args.engine)
    bar = Progress("capturing documents", len(docs))
    try:
        out = capture_for(eng, sae, docs, directory, model=args.model, data=args.data, max_tokens=args.max_tokens,
                          progress=lambda done, total: bar(done))
    finally:
        bar.close()
    data = FeatureData(out, sae.layer)
    return FeatureContexts(data, features, ctx_len=args.ctx_len)


def _sampling(args) -> dict:
    return {"seed": args.seed, "n_top": args.n_top, "n_quantile": args.n_quantile, "n_quantiles": args.n_quantiles}


def cmd_explain(args) -> int:
    from ..labels import LlamaCppModel, explain_features

    sae = _load_sae(args)
    if sae.layer is None:
        raise ValueError(f"{args.sae} does not say which layer it reads: pass --layer")
    if sae.labels.path is None:
        raise ValueError("the SAE has no file beside which to store labels: pass --labels FILE")
    if not os.path.isfile(args.explainer):
        raise FileNotFoundError(f"{args.explainer}: no such GGUF file (--explainer)")
    wanted = parse_features(args.features, sae.d_sae)
    ctx = _contexts(args, sae, wanted)
    features = wanted if wanted is not None else ctx.firing_features()
    explainer = LlamaCppModel(args.explainer, n_ctx=args.explainer_ctx, style=args.prompt,
                              max_new_tokens=args.max_new_tokens)
    bar = Progress(f"explaining with {explainer.name}", len(features))
    try:
        res = explain_features(sae.labels, ctx, features, explainer, batch=args.batch, overwrite=args.overwrite,
                               progress=lambda done, total: bar(done), **_sampling(args))
    finally:
        bar.close()
    print(json.dumps({**res, "store": sae.labels.path}) if args.json else
          f"{sae.labels.path}: {res['explained']} features explained, {res['skipped']} already done, "
          f"{res['silent']} never fire in {args.data}")
    return 0


def cmd_score(args) -> int:
    from ..labels import LlamaCppModel, score_features

    sae = _load_sae(args)
    store = sae.labels
    wanted = parse_features(args.features, sae.d_sae)
    features = [f for f in (wanted if wanted is not None else list(store)) if f in store]
    if not features:
        raise ValueError(f"no labelled features to score in {store.path}")
    if not os.path.isfile(args.scorer):
        raise FileNotFoundError(f"{args.scorer}: no such GGUF file (--scorer)")
    ctx = _contexts(args, sae, features)
    scorer = LlamaCppModel(args.scorer, n_ctx=args.explainer_ctx)
    bar = Progress(f"scoring with {scorer.name}", len(features))
    try:
        res = score_features(store, ctx, features, scorer, batch=args.batch, n_test=args.n_test,
                             progress=lambda done, total: bar(done), **_sampling(args))
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"store": store.path, "scores": {str(f): m for f, m in res.items()}}, indent=1))
    else:
        print_table(["feature", "balanced acc", "F1", "label"],
                    [[f"#{f}", f"{m['balanced_accuracy']:.3f}", f"{m['f1']:.3f}", store[f].label] for f, m in res.items()])
        print(f"{store.path}: {len(res)} of {len(features)} features scored (the others have no held-out examples)")
    return 0


def cmd_search(args) -> int:
    from ..labels import search_by_example, search_labels

    sae = _load_sae(args)
    if args.by_example is None:
        if not args.query:
            raise ValueError("give a query, or --by-example TEXT")
        if not len(sae.labels):
            raise ValueError(f"{args.sae} has no labels yet ({sae.labels.path}); see `saehook labels import/explain`")
        hits = search_labels(sae.labels, args.query, top=args.top)
        cols = ["feature", "bm25", "label"]
        rows = [[f"#{h['feature']}", f"{h['score']:.3f}", h["label"]] for h in hits]
    else:
        if not args.model:
            raise ValueError("--by-example needs the model that runs the SAE: --model MODEL.gguf")
        if args.against is not None and args.against_data:
            raise ValueError("give either --against TEXT or --against-data FILE")
        if sae.layer is None:
            raise ValueError(f"{args.sae} does not say which layer it reads: pass --layer")
        from ..engines import open_engine
        from ..workflows.datasets import read_documents

        against = [args.against] if args.against is not None else \
            [d["text"] for d in read_documents(args.against_data)] if args.against_data else None
        hits = search_by_example(open_engine(args.model, args.engine), sae, args.by_example, against=against,
                                 top=args.top, max_tokens=args.max_tokens)
        cols = ["feature", "score", "example mean", "contrast mean", "label"]
        rows = [[f"#{h['feature']}", f"{h['score']:+.4f}", f"{h['example_mean']:.4f}", f"{h['contrast_mean']:.4f}",
                 h["label"] or ""] for h in hits]
    if args.json:
        print(json.dumps(hits, indent=1, ensure_ascii=False))
    else:
        print_table(cols, rows)
    return 0


def cmd_similar(args) -> int:
    from ..labels import resolve_feature, similar_features

    sae = _load_sae(args)
    f = resolve_feature(sae, args.feature)
    hits = similar_features(sae, f, top=args.top)
    if args.json:
        print(json.dumps({"feature": f, "label": sae.labels.label(f), "similar": hits}, indent=1, ensure_ascii=False))
    else:
        print(f"feature #{f}: {sae.labels.label(f) or '(no label)'}")
        print_table(["feature", "cosine", "label"], [[f"#{h['feature']}", f"{h['cosine']:.4f}", h["label"] or ""]
                                                      for h in hits])
    return 0


def _sae_flags(p, sae_positional: bool = False):
    if sae_positional:
        p.add_argument("sae", help="the SAE (any format saehook loads)")
    else:
        p.add_argument("--sae", required=True, help="the SAE (any format saehook loads)")
    p.add_argument("--layer", type=int, help="the layer, for a file or folder holding several")
    p.add_argument("--labels", help="label store file (default: beside the SAE, <file>.labels.jsonl)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_flags(p):
    p.add_argument("model", help="the model the SAE reads (a GGUF file, or a transformers directory)")
    p.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a .gguf file, else transformers")
    p.add_argument("--k", type=int, help="features kept per token (default: the SAE's k)")
    p.add_argument("--data", required=True, help="documents: .txt, .jsonl or .parquet (captured once, then reused)")
    p.add_argument("--capture", help="capture directory (default: <label store>.captures/)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens captured per document")
    p.add_argument("--features", help="a subset, e.g. 1,5,10-20 (default: every feature that fires / is labelled)")
    p.add_argument("--ctx-len", type=int, default=32, help="tokens per example window")
    p.add_argument("--n-top", type=int, default=10, help="strongest windows shown to the explainer")
    p.add_argument("--n-quantile", type=int, default=10, help="windows sampled across activation quantiles")
    p.add_argument("--n-quantiles", type=int, default=5, help="activation quantile bins the sampled windows come from")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampling and the explain/held-out split")
    p.add_argument("--batch", type=int, default=8, help="features per batch (the store is saved after each)")
    p.add_argument("--explainer-ctx", type=int, default=4096, help="context of the explainer/scorer model")


def register(sub) -> None:
    lp = sub.add_parser("labels", help="feature labels: show, import published ones, explain and score locally")
    lsub = lp.add_subparsers(dest="labels_cmd", required=True, help="what to do with the labels")
    s = lsub.add_parser("show", help="the labels of an SAE, or one feature's with its examples and scores")
    _sae_flags(s, sae_positional=True)
    s.add_argument("--feature", help="an index or label:TEXT")
    s.add_argument("--rows", type=int, default=50, help="labels listed")
    s.add_argument("--examples", type=int, default=5, help="example contexts shown with --feature")
    s.set_defaults(fn=cmd_show)
    i = lsub.add_parser("import", help="import Neuronpedia explanation exports or label JSON (layer/width checked)")
    i.add_argument("file", help="a .jsonl/.json(.gz) file or a directory of them")
    _sae_flags(i)
    i.add_argument("--keep-existing", action="store_true", help="do not replace labels already in the store")
    i.set_defaults(fn=cmd_import)
    e = lsub.add_parser("explain", help="explain features with a local GGUF model (resumable)")
    _run_flags(e)
    _sae_flags(e)
    e.add_argument("--explainer", required=True, help="the explainer GGUF model")
    e.add_argument("--prompt", choices=["delphi", "compact"], default="delphi",
                   help="compact: no system prompt or activation lines, for short-context models")
    e.add_argument("--max-new-tokens", type=int, default=48, help="longest explanation generated")
    e.add_argument("--overwrite", action="store_true", help="explain again features that already have a label")
    e.set_defaults(fn=cmd_explain)
    c = lsub.add_parser("score", help="detection-score labels on held-out examples with a local GGUF scorer")
    _run_flags(c)
    _sae_flags(c)
    c.add_argument("--scorer", required=True, help="the scorer GGUF model")
    c.add_argument("--n-test", type=int, default=10, help="held-out firing examples (as many silent ones)")
    c.set_defaults(fn=cmd_score)

    q = sub.add_parser("search", help="features by label text (BM25), or by activation on an example vs a contrast")
    _sae_flags(q, sae_positional=True)
    q.add_argument("query", nargs="?", help="words to find in the labels")
    q.add_argument("--by-example", metavar="TEXT", help="rank features by their activation on this text instead")
    q.add_argument("--against", metavar="TEXT", help="with --by-example: a contrast text")
    q.add_argument("--against-data", metavar="FILE", help="with --by-example: contrast documents (.txt, .jsonl, .parquet)")
    q.add_argument("--model", help="with --by-example: the model the SAE reads")
    q.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a .gguf file, else transformers")
    q.add_argument("--k", type=int, help="features kept per token (default: the SAE's k)")
    q.add_argument("--max-tokens", type=int, default=512, help="tokens read per document")
    q.add_argument("--top", type=int, default=20, help="features listed")
    q.set_defaults(fn=cmd_search)
    m = sub.add_parser("similar", help="features whose decoder directions are closest to F's (cosine)")
    _sae_flags(m, sae_positional=True)
    m.add_argument("feature", help="an index or label:TEXT")
    m.add_argument("--top", type=int, default=10, help="features listed")
    m.set_defaults(fn=cmd_similar)
