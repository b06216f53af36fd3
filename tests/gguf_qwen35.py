"""A tiny random Qwen3.5 (llama.cpp arch `qwen35`: hybrid gated-delta-net linear attention and
full attention) written straight as GGUF, for the llama.cpp hook tests that need a recurrent/
hybrid memory. No transformers model is built: the tests compare llama.cpp with itself (one
sequence alone vs several in one batch), so only the shapes and the metadata must be what
llama.cpp's loader (src/models/qwen35.cpp in the llama.cpp that llama-cpp-python vendors)
expects, and the values must keep activations lively."""
from __future__ import annotations

import numpy as np

from saehook.demo.gguf_writer import VOCAB, add_byte_vocabulary

D, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 256, 4, 2, 64, 512
# gated delta net: key heads (ssm.group_count), value heads (ssm.time_step_rank), head size
N_K_HEADS, N_V_HEADS, D_STATE, D_CONV = 2, 4, 32, 4


def write_qwen35(path, *, n_layer: int = 4, full_attention_interval: int = 2, seed: int = 0) -> None:
    """Blocks i with (i + 1) % full_attention_interval == 0 use full attention, the others the
    recurrent linear attention (llama.cpp's rule when no recurrent-layer array is given)."""
    import gguf

    arch = "qwen35"
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("saehook-qwen35")
    w.add_block_count(n_layer)
    w.add_context_length(1024)
    w.add_embedding_length(D)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1e6)
    rope_dim = HEAD_DIM // 4  # Qwen3.5's partial_rotary_factor 0.25
    w.add_rope_dimension_count(rope_dim)
    w.add_array(f"{arch}.rope.dimension_sections", [3, 3, 2, 0])  # sums to rope_dim / 2
    w.add_layer_norm_rms_eps(1e-6)
    w.add_uint32(f"{arch}.ssm.conv_kernel", D_CONV)
    w.add_uint32(f"{arch}.ssm.state_size", D_STATE)
    w.add_uint32(f"{arch}.ssm.group_count", N_K_HEADS)
    w.add_uint32(f"{arch}.ssm.time_step_rank", N_V_HEADS)
    w.add_uint32(f"{arch}.ssm.inner_size", D_STATE * N_V_HEADS)
    w.add_uint32(f"{arch}.full_attention_interval", full_attention_interval)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_vocabulary(w)

    def mat(n_in, n_out):  # ggml {n_in, n_out} is numpy (n_out, n_in)
        return (rng.standard_normal((n_out, n_in)) * 0.08).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(D, VOCAB))
    w.add_tensor("output_norm.weight", norm(D))
    w.add_tensor("output.weight", mat(D, VOCAB))
    key_dim, value_dim = D_STATE * N_K_HEADS, D_STATE * N_V_HEADS
    for i in range(n_layer):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", norm(D))
        w.add_tensor(f"{b}.post_attention_norm.weight", norm(D))
        if (i + 1) % full_attention_interval == 0:  # full attention (q carries its gate: 2x)
            w.add_tensor(f"{b}.attn_q.weight", mat(D, HEAD_DIM * N_HEAD * 2))
            w.add_tensor(f"{b}.attn_k.weight", mat(D, HEAD_DIM * N_HEAD_KV))
            w.add_tensor(f"{b}.attn_v.weight", mat(D, HEAD_DIM * N_HEAD_KV))
            w.add_tensor(f"{b}.attn_output.weight", mat(HEAD_DIM * N_HEAD, D))
            w.add_tensor(f"{b}.attn_q_norm.weight", norm(HEAD_DIM))
            w.add_tensor(f"{b}.attn_k_norm.weight", norm(HEAD_DIM))
        else:  # gated delta net
            w.add_tensor(f"{b}.attn_qkv.weight", mat(D, 2 * key_dim + value_dim))
            w.add_tensor(f"{b}.attn_gate.weight", mat(D, value_dim))
            w.add_tensor(f"{b}.ssm_conv1d.weight", (rng.standard_normal((2 * key_dim + value_dim, D_CONV)) * 0.3)
                         .astype(np.float32))
            w.add_tensor(f"{b}.ssm_dt.bias", (0.1 * rng.standard_normal(N_V_HEADS)).astype(np.float32))
            w.add_tensor(f"{b}.ssm_a", (-np.exp(0.3 * rng.standard_normal(N_V_HEADS))).astype(np.float32))
            w.add_tensor(f"{b}.ssm_beta.weight", mat(D, N_V_HEADS))
            w.add_tensor(f"{b}.ssm_alpha.weight", mat(D, N_V_HEADS))
            w.add_tensor(f"{b}.ssm_norm.weight", norm(D_STATE))
            w.add_tensor(f"{b}.ssm_out.weight", mat(value_dim, D))
        w.add_tensor(f"{b}.ffn_gate.weight", mat(D, N_FF))
        w.add_tensor(f"{b}.ffn_up.weight", mat(D, N_FF))
        w.add_tensor(f"{b}.ffn_down.weight", mat(N_FF, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
