"""Writes Qwen3 weights as a GGUF file llama.cpp loads (arch qwen3, a GPT-2-style byte-level BPE
vocabulary), with the `gguf` package, and quantizes it with llama.cpp's own quantizer. Used by the
tests and benchmarks (tiny random models with the fixed 272-token byte vocabulary below) and the
demo recipe (its own BPE vocabulary trained on its corpus, a Vocabulary).
read_hf_model goes back: such a GGUF as a transformers directory (the demo's transformers copy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

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


EOS = "<|endoftext|>"
NORMAL, CONTROL = 1, 3  # llama.cpp's token types (llama_token_type / gguf.TokenType)


@dataclass(frozen=True)
class Vocabulary:
    """A GPT-2-style byte-level BPE vocabulary as llama.cpp reads it: tokenizer.ggml.model "gpt2",
    tokens (GPT-2's printable byte characters, e.g. 'Ġ' for a space), token types (NORMAL, or
    CONTROL for <|endoftext|>, BOS and EOS), merges ("a b": their rank is their order) and
    tokenizer.ggml.pre "qwen2" (llama.cpp's Qwen2 split regex, QWEN2_SPLIT below)."""

    tokens: Tuple[str, ...]
    types: Tuple[int, ...]
    merges: Tuple[Tuple[str, str], ...]

    def __post_init__(self):
        if len(self.tokens) != len(self.types):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.types)} token types")
        if EOS not in self.tokens:
            raise ValueError(f"the vocabulary has no {EOS} token")
        have = set(self.tokens)
        missing = [c for c in byte_tokens() if c not in have]
        if missing:  # llama.cpp's BPE falls back to single bytes: each must be a token
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 byte tokens, e.g. {missing[0]!r}")
        for i, (a, b) in enumerate(self.merges):
            if a + b not in have:
                raise ValueError(f"merge {i} ({a!r} {b!r}) makes {a + b!r}, which is not a token")

    @property
    def eos(self) -> int:
        return self.tokens.index(EOS)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocabulary":
        """From a `tokenizers.Tokenizer` with a byte-level BPE model (its merges as ranked pairs)."""
        import json

        model = json.loads(tokenizer.to_str())["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"a {model.get('type')} tokenizer, expected BPE")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
        if sorted(by_id) != list(range(size)):
            raise ValueError("the tokenizer's ids are not 0..n-1")
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        tokens = tuple(by_id[i] for i in range(size))
        merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
        return cls(tokens, tuple(CONTROL if t in special else NORMAL for t in tokens), merges)

    @classmethod
    def from_gguf(cls, reader) -> "Vocabulary":
        """From a gguf.GGUFReader of a file written by add_vocabulary."""
        f = reader.fields
        for key, want in (("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "qwen2")):
            got = f[key].contents() if key in f else None
            if got != want:
                raise ValueError(f"{key} is {got!r}, expected {want!r}")
        merges = tuple(tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents())
        return cls(tuple(f["tokenizer.ggml.tokens"].contents()), tuple(int(t) for t in
                   f["tokenizer.ggml.token_type"].contents()), merges)

    def hf_tokenizer(self):
        """This vocabulary as a transformers fast tokenizer that gives llama.cpp's ids: the same
        tokens, merges and pre-tokenizer split (tests/test_demo.py checks it on varied text)."""
        from tokenizers import Tokenizer, decoders, models
        from transformers import PreTrainedTokenizerFast

        bpe = models.BPE(vocab={t: i for i, t in enumerate(self.tokens)}, merges=[tuple(m) for m in self.merges])
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t, ty in zip(self.tokens, self.types) if ty == CONTROL])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def byte_vocabulary() -> Vocabulary:
    """The fixed 272-token vocabulary of the tiny test and benchmark models."""
    toks, types = vocab()
    return Vocabulary(tuple(toks), tuple(types), tuple(MERGES))


def add_vocabulary(w, v: Vocabulary) -> None:
    """Writes a byte-level BPE vocabulary (gpt2 model, qwen2 pre-tokenizer, <|endoftext|> as BOS
    and EOS, no BOS added) into a gguf.GGUFWriter."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(list(v.tokens))
    w.add_token_types(list(v.types))
    w.add_token_merges([f"{a} {b}" for a, b in v.merges])
    w.add_bos_token_id(v.eos)
    w.add_eos_token_id(v.eos)
    w.add_add_bos_token(False)


def add_byte_vocabulary(w) -> None:
    """The tokenizer every tiny test model shares (byte_vocabulary) into a gguf.GGUFWriter."""
    add_vocabulary(w, byte_vocabulary())


def write_qwen3(path, cfg: dict, tensors, vocabulary: "Vocabulary | None" = None) -> None:
    """Writes a Qwen3 causal LM as an f32 GGUF. cfg: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, max_position_embeddings,
    rms_norm_eps, rope_theta, vocab_size (the vocabulary's size). tensors: transformers state-dict names ->
    float32 numpy arrays (model.embed_tokens.weight, model.layers.N.*, model.norm.weight,
    lm_head.weight). Linear weights keep transformers' (out, in) layout, as llama.cpp expects.
    vocabulary: the model's tokenizer (default: the 272-token byte vocabulary)."""
    import gguf

    v = vocabulary or byte_vocabulary()
    if cfg["vocab_size"] != len(v.tokens):
        raise ValueError(f"the vocabulary has {len(v.tokens)} tokens, the model {cfg['vocab_size']}")
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
    add_vocabulary(w, v)

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


def write_random_qwen35(path, *, hidden: int = 256, layers: int = 4, ffn: int = 512, heads: int = 4,
                        kv_heads: int = 2, head_dim: int = 64, lin_k_heads: int = 2, lin_v_heads: int = 4,
                        lin_head_dim: int = 32, full_attention_interval: int = 2, context_length: int = 1024,
                        seed: int = 0) -> None:
    """A random-weight Qwen3.5 (llama.cpp arch `qwen35`: hybrid gated-delta-net linear attention
    and full attention) written straight as an f32 GGUF with the byte vocabulary, for the tests
    and benchmarks that need a recurrent/hybrid memory (the defaults: the tests' tiny model). Only
    the shapes and metadata must be what llama.cpp's loader (src/models/qwen35.cpp in the llama.cpp
    llama-cpp-python vendors) expects, and the names are those its convert_hf_to_gguf.py writes for
    a transformers Qwen3_5ForCausalLM; the values keep activations lively (matrices of standard
    deviation 1.28 / sqrt(hidden), norms near 1). Blocks i with (i + 1) % full_attention_interval
    == 0 use full attention, the others the recurrent linear attention (llama.cpp's rule when no
    recurrent-layer array is given)."""
    import gguf

    arch = "qwen35"
    rng = np.random.default_rng(seed)
    scale = 0.08 * (256 / hidden) ** 0.5
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("saehook-qwen35")
    w.add_block_count(layers)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    rope_dim = head_dim // 4  # Qwen3.5's partial_rotary_factor 0.25
    w.add_rope_dimension_count(rope_dim)
    # the converter's mrope sections for text ([11, 11, 10] at head_dim 256), summing to rope_dim / 2
    a = round(rope_dim / 2 * 11 / 32)
    w.add_array(f"{arch}.rope.dimension_sections", [a, a, rope_dim // 2 - 2 * a, 0])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_uint32(f"{arch}.ssm.conv_kernel", 4)
    w.add_uint32(f"{arch}.ssm.state_size", lin_head_dim)
    w.add_uint32(f"{arch}.ssm.group_count", lin_k_heads)
    w.add_uint32(f"{arch}.ssm.time_step_rank", lin_v_heads)
    w.add_uint32(f"{arch}.ssm.inner_size", lin_head_dim * lin_v_heads)
    w.add_uint32(f"{arch}.full_attention_interval", full_attention_interval)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_vocabulary(w)

    def mat(n_in, n_out):  # ggml {n_in, n_out} is numpy (n_out, n_in)
        return (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(hidden, VOCAB))
    w.add_tensor("output_norm.weight", norm(hidden))
    w.add_tensor("output.weight", mat(hidden, VOCAB))
    key_dim, value_dim = lin_head_dim * lin_k_heads, lin_head_dim * lin_v_heads
    for i in range(layers):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", norm(hidden))
        w.add_tensor(f"{b}.post_attention_norm.weight", norm(hidden))
        if (i + 1) % full_attention_interval == 0:  # full attention (q carries its gate: 2x)
            w.add_tensor(f"{b}.attn_q.weight", mat(hidden, head_dim * heads * 2))
            w.add_tensor(f"{b}.attn_k.weight", mat(hidden, head_dim * kv_heads))
            w.add_tensor(f"{b}.attn_v.weight", mat(hidden, head_dim * kv_heads))
            w.add_tensor(f"{b}.attn_output.weight", mat(head_dim * heads, hidden))
            w.add_tensor(f"{b}.attn_q_norm.weight", norm(head_dim))
            w.add_tensor(f"{b}.attn_k_norm.weight", norm(head_dim))
        else:  # gated delta net
            w.add_tensor(f"{b}.attn_qkv.weight", mat(hidden, 2 * key_dim + value_dim))
            w.add_tensor(f"{b}.attn_gate.weight", mat(hidden, value_dim))
            w.add_tensor(f"{b}.ssm_conv1d.weight", (rng.standard_normal((2 * key_dim + value_dim, 4)) * 0.3)
                         .astype(np.float32))
            w.add_tensor(f"{b}.ssm_dt.bias", (0.1 * rng.standard_normal(lin_v_heads)).astype(np.float32))
            w.add_tensor(f"{b}.ssm_a", (-np.exp(0.3 * rng.standard_normal(lin_v_heads))).astype(np.float32))
            w.add_tensor(f"{b}.ssm_beta.weight", mat(hidden, lin_v_heads))
            w.add_tensor(f"{b}.ssm_alpha.weight", mat(hidden, lin_v_heads))
            w.add_tensor(f"{b}.ssm_norm.weight", norm(lin_head_dim))
            w.add_tensor(f"{b}.ssm_out.weight", mat(value_dim, hidden))
        w.add_tensor(f"{b}.ffn_gate.weight", mat(hidden, ffn))
        w.add_tensor(f"{b}.ffn_up.weight", mat(hidden, ffn))
        w.add_tensor(f"{b}.ffn_down.weight", mat(ffn, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# transformers Qwen3 decoder-layer tensor -> llama.cpp's name
LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_hf_model(model, path, vocabulary: "Vocabulary | None" = None) -> None:
    """Writes a transformers Qwen3ForCausalLM (float weights) as an f32 GGUF."""
    c = model.config
    cfg = {key: getattr(c, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "max_position_embeddings", "rms_norm_eps", "vocab_size")}
    cfg["rope_theta"] = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    write_qwen3(path, cfg, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}, vocabulary)


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


def pre_tokenizer():
    """The `tokenizers` pre-tokenizer equal to llama.cpp's qwen2 one: the split regex, then
    GPT-2's byte-to-character mapping (no regex of its own, no prefix space)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def hf_tokenizer():
    """The byte vocabulary of the test models as a transformers fast tokenizer (llama.cpp's ids)."""
    return byte_vocabulary().hf_tokenizer()


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
    v = Vocabulary.from_gguf(r)
    if kv.get("general.architecture") != "qwen3":
        raise ValueError(f"{path}: architecture {kv.get('general.architecture')!r}, expected qwen3")
    n_layer = int(kv["qwen3.block_count"])
    cfg = transformers.Qwen3Config(
        vocab_size=len(v.tokens), hidden_size=int(kv["qwen3.embedding_length"]),
        intermediate_size=int(kv["qwen3.feed_forward_length"]), num_hidden_layers=n_layer,
        num_attention_heads=int(kv["qwen3.attention.head_count"]),
        num_key_value_heads=int(kv["qwen3.attention.head_count_kv"]), head_dim=int(kv["qwen3.attention.key_length"]),
        max_position_embeddings=int(kv["qwen3.context_length"]),
        rms_norm_eps=float(kv["qwen3.attention.layer_norm_rms_epsilon"]), rope_theta=float(kv["qwen3.rope.freq_base"]),
        tie_word_embeddings=False, eos_token_id=v.eos, bos_token_id=v.eos)
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
        v.hf_tokenizer().save_pretrained(out_dir)
