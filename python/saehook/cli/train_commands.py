"""`saehook train`: a Top-K SAE on a model's residual stream."""
from __future__ import annotations

import json
import os

from .common import Progress, nonnegative_int, positive_float, positive_int


def cmd_train(args) -> int:
    from ..workflows.datasets import read_documents
    from ..engines import open_engine
    from ..workflows.evaluate import evaluate
    from ..workflows.train import check_train_args, shuffled_batches, train_sae

    check_train_args(1, args.d_sae, args.k, args.steps, args.lr)  # before the model loads (d_model comes later)
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2 (the held-out evaluation needs a next token)")
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

    bar = Progress("training", args.steps)
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


def register(sub) -> None:
    t = sub.add_parser("train", help="train a Top-K SAE on the model's residual stream after a layer")
    t.add_argument("model", help="a GGUF file (llama.cpp) or a transformers model directory")
    t.add_argument("--engine", choices=["llama", "hf"], help="default: llama for a file, hf for a directory")
    t.add_argument("--layer", type=nonnegative_int, required=True, help="the block whose output the SAE reads")
    t.add_argument("--data", required=True, help=".txt, .jsonl, .csv or .parquet documents (the last 10%% are held out)")
    t.add_argument("--d-sae", type=positive_int, required=True, help="number of features")
    t.add_argument("--k", type=positive_int, required=True, help="active features per token (at most --d-sae)")
    t.add_argument("--steps", type=positive_int, default=1000, help="training batches")
    t.add_argument("--batch", type=positive_int, default=256, help="tokens per batch")
    t.add_argument("--lr", type=positive_float, help="Adam learning rate (default: 2e-4 / sqrt(d_sae / 16384))")
    t.add_argument("--max-tokens", type=positive_int, default=256, help="tokens read per document")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the shuffling")
    t.add_argument("--checkpoint", help="resume from / save to this file")
    t.add_argument("--out", required=True, help="the SAE file to write (saehook .safetensors)")
    t.add_argument("--json", action="store_true", help="print the held-out metrics as JSON")
    t.set_defaults(fn=cmd_train)
