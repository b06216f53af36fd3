"""Writes Qwen3 weights as a GGUF file llama.cpp loads (arch qwen3, byte-level BPE vocabulary),
with the `gguf` package, and quantizes it with llama.cpp's own quantizer. Used by the tests
(tiny random models) and the llama.cpp benchmark (a synthetic model of realistic width).
read_hf_model goes back: such a GGUF as a transformers directory (the demo's transformers copy)."""
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


def add_byte_vocabulary(w) -> None:
    """Writes the byte-level BPE vocabulary (gpt2 model, qwen2 pre-tokenizer, <|endoftext|> as BOS
    and EOS, no BOS added) into a gguf.GGUFWriter: the tokenizer every tiny test model shares."""
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


def write_qwen3(path, cfg: dict, tensors) -> None:
    """Writes a Qwen3 causal LM as an f32 GGUF. cfg: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, max_position_embeddings,
    rms_norm_eps, rope_theta, vocab_size (== VOCAB). tensors: transformers state-dict names ->
    float32 numpy arrays (model.embed_tokens.weight, model.layers.N.*, model.norm.weight,
    lm_head.weight). Linear weights keep transformers' (out, in) layout, as llama.cpp expects."""
    import gguf

    if cfg["vocab_size"] != VOCAB:
        raise ValueError(f"the byte-level vocabulary has {VOCAB} tokens, the model {cfg['vocab_size']}")
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("saehook-qwen3")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_vocabulary(w)

    f32 = lambda name: np.ascontiguousarray(tensors[name], dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", f32("model.norm.weight"))
    w.add_tensor("output.weight", f32("lm_head.weight"))
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in LAYER_TENSORS.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", f32(f"model.layers.{i}.{hf}.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# transformers Qwen3 decoder-layer tensor -> llama.cpp's name
LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_hf_model(model, path) -> None:
    """Writes a transformers Qwen3ForCausalLM (float weights) as an f32 GGUF."""
    c = model.config
    cfg = {key: getattr(c, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "max_position_embeddings", "rms_norm_eps", "vocab_size")}
    cfg["rope_theta"] = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    write_qwen3(path, cfg, {k: v.detach().float().numpy() for k, v in model.state_dict().items()})


def quantize(src, dst, ftype: str):
    """llama.cpp's own quantizer (llama_model_quantize), e.g. ftype 'Q8_0' or 'Q4_K_M'."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")


# llama.cpp's qwen2 pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2), as Qwen2's own
# tokenizer.json writes it for the `tokenizers` library.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_tokenizer():
    """The GGUF files' byte-level BPE vocabulary as a transformers fast tokenizer (the same ids
    llama.cpp gives: same vocabulary, merges and pre-tokenizer split)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    toks, types = vocab()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=list(MERGES))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(toks, types) if ty == 3])
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def read_hf_model(path, out_dir) -> None:
    """The inverse of write_hf_model: a Qwen3 GGUF written here (f32 or quantized; quantized
    tensors are dequantized with the gguf package) saved as a transformers directory (config,
    safetensors weights, tokenizer) that loads offline."""
    import gguf
    import torch
    import transformers

    from ..engines.protocol import quiet_transformers

    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    if kv.get("general.architecture") != "qwen3":
        raise ValueError(f"{path}: architecture {kv.get('general.architecture')!r}, expected qwen3")
    n_layer = int(kv["qwen3.block_count"])
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=int(kv["qwen3.embedding_length"]),
        intermediate_size=int(kv["qwen3.feed_forward_length"]), num_hidden_layers=n_layer,
        num_attention_heads=int(kv["qwen3.attention.head_count"]),
        num_key_value_heads=int(kv["qwen3.attention.head_count_kv"]), head_dim=int(kv["qwen3.attention.key_length"]),
        max_position_embeddings=int(kv["qwen3.context_length"]),
        rms_norm_eps=float(kv["qwen3.attention.layer_norm_rms_epsilon"]), rope_theta=float(kv["qwen3.rope.freq_base"]),
        tie_word_embeddings=False, eos_token_id=vocab()[0].index("<|endoftext|>"),
        bos_token_id=vocab()[0].index("<|endoftext|>"))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(n_layer):
        for hf, gg in LAYER_TENSORS.items():
            names[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    state = {}
    for t in r.tensors:
        if t.name not in names:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
        state[names[t.name]] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    model = transformers.Qwen3ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing}, unexpected {unexpected}")
    with quiet_transformers():
        model.save_pretrained(out_dir)
        hf_tokenizer().save_pretrained(out_dir)
