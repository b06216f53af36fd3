"""Tiny GGUF models for the llama.cpp tests: a random transformers Qwen3 written as GGUF with the
`gguf` package (arch qwen3, byte-level BPE vocabulary), quantized with llama.cpp's own quantizer."""
from __future__ import annotations

import numpy as np

N_BYTES = 256
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
VOCAB = 272  # 256 bytes + merges + <|endoftext|> + padding control tokens


def byte_tokens():
    """GPT-2's reversible byte -> printable character mapping."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    table = dict(zip(keep, chars))
    return [chr(table[b]) for b in range(256)]


def vocab():
    toks = byte_tokens() + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
    types = [1] * (N_BYTES + len(MERGES)) + [3]
    while len(toks) < VOCAB:
        toks.append(f"<|pad{len(toks)}|>")
        types.append(3)
    return toks, types


def qwen3_config(**overrides):
    import transformers

    cfg = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
               tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0)
    cfg.update(overrides)
    return transformers.Qwen3Config(**cfg)


def build_hf_model(seed=0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(qwen3_config(**overrides)).eval()
    with torch.no_grad():  # larger-than-default weights so the tiny model's activations are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def write_gguf(model, path):
    """Writes a transformers Qwen3ForCausalLM as an f32 GGUF llama.cpp loads as 'qwen3'."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("saehook-tiny-qwen3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    toks, types = vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    eos = toks.index("<|endoftext|>")
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(sd[f"model.layers.{i}.{hf}.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, ftype: str):
    """llama.cpp's own quantizer (llama_model_quantize), e.g. ftype 'Q8_0' or 'Q4_K_M'."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
