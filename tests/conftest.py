"""Shared fixtures: tiny random models and SAEs built in-process (no downloads)."""
from __future__ import annotations

# saehook.llama sets this before llama.cpp loads libgomp; torch (imported by test modules first)
# would load it earlier, so the suite sets it up front.
import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import pytest

import saehook


def make_sae(d_model=64, d_sae=256, k=8, *, activation="topk", dec_layout="rows", seed=0,
             subtract_b_dec=False, **kw) -> saehook.SAE:
    """A random float32 SAE whose features fire with a spread of magnitudes."""
    rng = np.random.default_rng(seed)
    W_enc = (rng.standard_normal((d_sae, d_model)) / np.sqrt(d_model)).astype(np.float32)
    W_dec = (rng.standard_normal((d_sae, d_model)) / np.sqrt(d_model)).astype(np.float32)
    if dec_layout == "cols":
        W_dec = np.ascontiguousarray(W_dec.T)
    b_enc = (0.1 * rng.standard_normal(d_sae)).astype(np.float32)
    b_dec = (0.1 * rng.standard_normal(d_model)).astype(np.float32)
    threshold = None
    if activation == "jumprelu":
        threshold = np.abs(0.2 * rng.standard_normal(d_sae)).astype(np.float32)
    return saehook.SAE(W_enc, W_dec, b_enc, b_dec, k=k, activation=activation, dec_layout=dec_layout,
                       threshold=threshold, subtract_b_dec=subtract_b_dec, **kw)


TINY_QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6)


def build_tiny_qwen3(seed: int = 0, **overrides):
    """A randomly initialised Qwen3ForCausalLM (float32, eval mode) built without downloads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(**{**TINY_QWEN3, **overrides})
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_qwen3():
    return build_tiny_qwen3()
