"""`saehook demo`: capture and steering end to end, offline, in seconds.

Builds a tiny Qwen3-architecture model with transformers (random weights, byte vocabulary, no
download) and an SAE over its layer-1 residual stream whose feature 0 writes the direction that
the model's unembedding reads as the byte "!" (the other features are random unit directions).
It then shows the features captured per token of a prompt, and greedy generation with and
without clamping feature 0: the steered run emits "!" where the clean one does not. A random
model cannot show *learned* features; that needs a trained model (see the README).
"""
from __future__ import annotations

import numpy as np

from .sae import SAE
from .steering import Steering

LAYER = 1
TARGET = ord("!")


def build_model(seed: int = 0):
    import torch
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def build_sae(model, d_sae: int = 1024, k: int = 16, seed: int = 0) -> SAE:
    rng = np.random.default_rng(seed)
    d = model.config.hidden_size
    W_dec = rng.standard_normal((d_sae, d)).astype(np.float32)
    target = model.lm_head.weight[TARGET].detach().numpy().astype(np.float32)
    W_dec[0] = target
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = W_dec.copy()  # tied encoder: a feature reads the direction it writes
    return SAE(W_enc, W_dec, np.zeros(d_sae, np.float32), np.zeros(d, np.float32), k=k,
               activation="topk_relu", metadata={"layer": LAYER, "hook_point": "resid_post",
                                                  "model": "saehook-demo-random-qwen3"})


def _text(ids) -> str:
    return "".join(chr(int(t)) if 32 <= int(t) < 127 else "·" for t in ids)


def run(prompt: str = "Hello world", max_new_tokens: int = 12, strength: float = 40.0) -> dict:
    import torch

    from . import hf

    model = build_model()
    sae = build_sae(model)
    ids = torch.tensor([[min(b, 255) for b in prompt.encode("utf-8")]])

    print(f"model: random Qwen3 (3 layers, d_model {model.config.hidden_size}); "
          f"SAE: {sae.d_sae} features, k={sae.k}, layer {LAYER}")
    with torch.no_grad(), hf.capture(model, {LAYER: sae}) as rec:
        model(ids)
    print(f"\ntop features per token of {prompt!r} (layer {LAYER}):")
    for t, (vals, idx) in enumerate(zip(rec[LAYER].values, rec[LAYER].indices)):
        top = ", ".join(f"#{i}={v:.2f}" for v, i in zip(vals[:4], idx[:4]) if i >= 0)
        print(f"  {_text(ids[0, t:t + 1])!r:>5}  {top}")

    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        clean = model.generate(ids, **gen)[0, ids.shape[1]:]
        steering = Steering(sae, layer=LAYER).clamp(0, strength)
        with hf.steer(model, steering):
            steered = model.generate(ids, **gen)[0, ids.shape[1]:]
        logits = model(ids).logits[0, -1]
        with hf.steer(model, steering):
            logits_s = model(ids).logits[0, -1]
    p_clean = torch.softmax(logits, -1)[TARGET].item()
    p_steer = torch.softmax(logits_s, -1)[TARGET].item()
    print(f"\nfeature 0 writes the unembedding direction of {chr(TARGET)!r}; clamp it to {strength:g}:")
    print(f"  p({chr(TARGET)!r} next) clean {p_clean:.4f} -> steered {p_steer:.4f}")
    print(f"  clean:   {prompt}{_text(clean)!r}")
    print(f"  steered: {prompt}{_text(steered)!r}")
    return {"p_clean": p_clean, "p_steered": p_steer, "clean": clean.tolist(), "steered": steered.tolist()}
