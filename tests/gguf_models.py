"""Tiny random transformers Qwen3 models for the llama.cpp tests (written as GGUF by
saehook.demo.gguf_writer)."""
from __future__ import annotations

from saehook.demo.gguf_writer import VOCAB, quantize, vocab, write_hf_model  # noqa: F401 (the tests call gm.quantize)

EOS = vocab()[0].index("<|endoftext|>")


KV_F32 = dict(type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache: llama.cpp's f16 cache would round the comparisons
LLAMA_ARGS = dict(n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, seed=0, **KV_F32)


def open_llm(path, **kw):
    """A HookedLlama on a tiny test model with the llama tests' settings (kw override them)."""
    from saehook.llama import HookedLlama

    return HookedLlama(str(path), **{**LLAMA_ARGS, **kw})


def random_sae(seed=0, d_sae=1024, k=16, d_model=256):
    """A random Top-K SAE for the tiny models (hidden 256): W_enc, W_dec, b_enc drawn in that order."""
    import numpy as np

    import saehook

    rng = np.random.default_rng(seed)
    W_enc = (rng.standard_normal((d_sae, d_model)) / 16).astype(np.float32)
    W_dec = (rng.standard_normal((d_sae, d_model)) / 16).astype(np.float32)
    return saehook.SAE(W_enc, W_dec, (0.05 * rng.standard_normal(d_sae)).astype(np.float32), k=k)


def build_hf_model(seed=0, **overrides):
    import torch
    import transformers

    cfg = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
               tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
               eos_token_id=EOS, bos_token_id=EOS)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).eval()
    with torch.no_grad():  # larger-than-default weights so the tiny model's activations are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def write_gguf(model, path):
    write_hf_model(model, path)
