"""The recipe of the demo model shipped in saehook/demo/data: a tiny Qwen3-architecture causal LM
trained on the Python documentation every CPython carries (pydoc_data.topics), converted to
GGUF (Q8_0), and a Top-K SAE trained with saehook's trainer on its residual stream.

    python -m saehook.demo.build --out python/saehook/demo/data      # about 10 minutes on 2 cores
    python -c "from saehook import demo; demo.build_feature_labels()"   # then the labels

Everything is seeded; the loss curve and settings go to demo_model.json beside the files.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

LAYER = 2
CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False)


def corpus() -> list:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def tokenize_all(texts, gguf_path) -> list:
    """Token ids exactly as llama.cpp will tokenize at run time (its own tokenizer)."""
    import llama_cpp

    tok = llama_cpp.Llama(gguf_path, vocab_only=True, verbose=False)
    return [tok.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)  # validation loss rises after ~1000 (small corpus)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sae-steps", type=int, default=2000)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import transformers

    from . import gguf_writer
    from ..engines import HFEngine
    from ..workflows.evaluate import evaluate
    from ..workflows.train import shuffled_batches, train_sae

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = transformers.Qwen3Config(vocab_size=gguf_writer.VOCAB, eos_token_id=gguf_writer.vocab()[0].index("<|endoftext|>"),
                                   **CONFIG)
    model = transformers.Qwen3ForCausalLM(cfg)
    docs = corpus()
    with tempfile.TemporaryDirectory() as tmp:
        gguf_writer.write_hf_model(model, os.path.join(tmp, "tok.gguf"))
        ids = tokenize_all(docs, os.path.join(tmp, "tok.gguf"))
    held_out = set(range(0, len(docs), 10))  # every tenth topic is held out
    train_stream = np.concatenate([np.asarray(x) for i, x in enumerate(ids) if i not in held_out])
    val_stream = np.concatenate([np.asarray(x) for i, x in enumerate(ids) if i in held_out])
    rng = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.05)

    def batch(stream):
        starts = rng.integers(0, len(stream) - args.seq - 1, args.batch)
        return torch.as_tensor(np.stack([stream[s:s + args.seq] for s in starts]), dtype=torch.long)

    curve = []
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x = batch(train_stream)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val = float(np.mean([model(v, labels=v).loss.item() for v in (batch(val_stream) for _ in range(4))]))
            model.train()
            curve.append({"step": step, "train_loss": float(loss), "val_loss": val, "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
    model.eval()
    f32 = os.path.join(args.out, "demo-f32.gguf")
    gguf_writer.write_hf_model(model, f32)
    gguf_writer.quantize(f32, os.path.join(args.out, "demo-model-Q8_0.gguf"), "Q8_0")
    os.remove(f32)
    hf_dir = tempfile.mkdtemp()
    model.save_pretrained(hf_dir)

    # The SAE, trained on the residual stream after block LAYER with saehook's trainer.
    eng = HFEngine(hf_dir)

    def rows():
        while True:
            for i, x in enumerate(ids):
                if i not in held_out:
                    for s in range(0, len(x) - 1, 256):
                        yield eng.residuals(x[s:s + 256], LAYER)

    sae = train_sae(shuffled_batches(rows(), 256, seed=args.seed), CONFIG["hidden_size"], args.d_sae, args.k,
                    steps=args.sae_steps, lr=1e-3, seed=args.seed, dead_tokens=200_000,
                    metadata={"layer": LAYER, "hook_point": "resid_post", "model": "saehook-demo-qwen3"})
    sae_path = os.path.join(args.out, "demo-sae.safetensors")
    sae.save(sae_path)
    held = [docs[i] for i in sorted(held_out)]
    metrics = evaluate(eng, sae, LAYER, held, max_tokens=256)
    print(json.dumps(metrics), flush=True)
    with open(os.path.join(args.out, "demo_model.json"), "w") as f:
        json.dump({"config": CONFIG, "vocab_size": gguf_writer.VOCAB, "seed": args.seed, "steps": args.steps,
                   "seq": args.seq, "batch": args.batch, "corpus": "pydoc_data.topics (every 10th topic held out)",
                   "loss_curve": curve, "sae": {"layer": LAYER, "d_sae": args.d_sae, "k": args.k, "steps": args.sae_steps,
                                                "held_out_metrics": metrics}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
