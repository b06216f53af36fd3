"""The llama.cpp hook on tiny GGUF models built here (transformers Qwen3 -> GGUF -> Q8_0/Q4_K_M),
with transformers as the independent oracle."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import saehook  # noqa: E402
import saehook.llama as shl  # noqa: E402
from saehook.llama import export_control_vector  # noqa: E402

import gguf_models as gm  # noqa: E402

D = 256
N_LAYER = 3
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 256, 40)]
# With an f32 KV cache llama.cpp's f32 model matches transformers to ~1e-6 (f16 KV: ~1e-3).
KV_F32 = gm.KV_F32
REL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = gm.build_hf_model(num_hidden_layers=N_LAYER)
    f32 = d / "tiny-f32.gguf"
    gm.write_gguf(hf, f32)
    files = {"f32": f32}
    for q in ("Q8_0", "Q4_K_M"):
        files[q] = d / f"tiny-{q}.gguf"
        gm.quantize(f32, files[q], q)
    return hf, files


random_sae = gm.random_sae  # d_model 256: the tiny models' hidden size


@pytest.fixture(scope="module")
def sae():
    return random_sae()


open_llm = gm.open_llm


def hf_forward(model, tokens, steerings=()):
    """transformers as the oracle, with its own plain forward hooks (not saehook.hf): the output
    of every decoder layer (the residual after block L), steered in place with Steering.apply
    where asked, and the logits of every position."""
    outs, hooks = {}, []
    for L, layer in enumerate(model.model.layers):
        def hook(module, args, output, L=L):
            h = output[0] if isinstance(output, tuple) else output
            for st in steerings:
                if st.layer == L:
                    st.apply(h[0])  # (n, d) float32 view: changed in place, as the next layer reads it
            outs[L] = h[0].detach().clone().numpy()
        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return outs, out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states]


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def overlap(a, b):
    k = a.shape[1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))


# ---------------------------------------------------------------------------------------------
# capture


def test_capture_equals_transformers_hidden_states(models, sae):
    hf, files = models
    llm = open_llm(files["f32"])
    with llm.capture({0: sae, 1: sae, 2: sae}, residuals=True) as rec:
        llm.eval(TOKENS)
    outs, _, hidden_states = hf_forward(hf, TOKENS)
    for L in (0, 1):
        np.testing.assert_allclose(outs[L], hidden_states[L + 1], rtol=0, atol=0)  # the hook point
        r = rec[L]
        np.testing.assert_array_equal(r.tokens, TOKENS)
        np.testing.assert_array_equal(r.positions, np.arange(len(TOKENS)))
        assert not r.generated.any() and (r.seq_ids == 0).all()
        assert rel_err(r.residuals, hidden_states[L + 1]) < 1e-5
        # The features are sae.encode of transformers' residual: same indices, same order.
        v_hf, i_hf = sae.encode(hidden_states[L + 1])
        np.testing.assert_array_equal(r.indices, i_hf)
        np.testing.assert_allclose(r.values, v_hf, rtol=1e-4, atol=1e-4)
        assert r.values.shape == (len(TOKENS), sae.k) and (np.diff(r.values, axis=1) <= 0).all()
    # Last block: only the row whose logits were requested exists (the last token).
    last = rec[2]
    assert last.tokens.tolist() == [TOKENS[-1]] and last.positions.tolist() == [len(TOKENS) - 1]
    assert rel_err(last.residuals[0], outs[2][-1]) < 1e-5
    assert llm.unannounced_rows == 0


def test_batch_and_ubatch_splitting(models, sae):
    _, files = models
    tokens = (TOKENS * 4)[:150]
    whole = open_llm(files["f32"], n_batch=256, n_ubatch=256)
    with whole.capture({1: sae}, residuals=True) as ref:
        whole.eval(tokens)
    split = open_llm(files["f32"], n_batch=32, n_ubatch=8)  # 5 decodes of up to 4 micro-batches
    with split.capture({1: sae, 2: sae}, residuals=True) as rec:
        split.eval(tokens)
    np.testing.assert_array_equal(rec[1].positions, np.arange(150))
    np.testing.assert_array_equal(rec[1].tokens, tokens)
    np.testing.assert_allclose(rec[1].residuals, ref[1].residuals, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rec[1].indices, ref[1].indices)
    # On the last block, the one output row of each decode (tokens 31, 63, ..., 149); the
    # micro-batches without it have no row there.
    assert rec[2].positions.tolist() == [31, 63, 95, 127, 149]
    np.testing.assert_array_equal(rec[2].tokens, [tokens[p] for p in (31, 63, 95, 127, 149)])
    # logits_all: every row reaches the last block, in order.
    every = open_llm(files["f32"], n_batch=32, n_ubatch=8, logits_all=True)
    with every.capture({2: sae}) as rec_all:
        every.eval(tokens)
    np.testing.assert_array_equal(rec_all[2].positions, np.arange(150))


# ---------------------------------------------------------------------------------------------
# steering


def _spec(sae, hidden_row, layer):
    v, i = sae.encode(hidden_row[None])
    return (saehook.Steering(sae, layer=layer).clamp(int(i[0, 0]), 3.0).scale(int(i[0, 1]), 2.0)
            .ablate(int(i[0, 2])).add(5, 1.5))


def test_steering_matches_transformers(models, sae):
    hf, files = models
    outs, clean, _ = hf_forward(hf, TOKENS)
    st = _spec(sae, outs[1][-1], layer=1)
    _, hf_steered, _ = hf_forward(hf, TOKENS, [st])
    llm = open_llm(files["f32"], logits_all=True)  # compare every position's logits
    llm.eval(TOKENS)
    base = np.array(llm.scores[: len(TOKENS)])
    llm.reset()
    with llm.steer(st):
        llm.eval(TOKENS)
    steered = np.array(llm.scores[: len(TOKENS)])
    assert rel_err(base, clean) < REL
    assert rel_err(steered, base) > 100 * REL  # the intervention matters...
    assert rel_err(steered, hf_steered) < REL  # ...and is the same as transformers'
    # Leaving the block removes the hook: logits are back to the clean ones.
    llm.reset()
    llm.eval(TOKENS)
    np.testing.assert_array_equal(np.array(llm.scores[: len(TOKENS)]), base)


@pytest.mark.parametrize("layer", [0, N_LAYER - 1])
def test_steering_first_and_last_block(models, sae, layer):
    """Block 0 (no control-vector row: an add goes through the callback) and the last block
    (only the output row exists there) steer like transformers."""
    hf, files = models
    outs, _, _ = hf_forward(hf, TOKENS)
    st = _spec(sae, outs[layer][-1], layer)
    add = saehook.Steering(sae, layer=layer).add(11, 2.5)
    _, hf_steered, _ = hf_forward(hf, TOKENS, [st, add])
    llm = open_llm(files["f32"])
    with llm.steer(st, add):
        llm.eval(TOKENS)
    assert rel_err(last_logits(llm), hf_steered[-1]) < REL


def test_additive_steering_control_vector_equals_callback(models, sae, tmp_path):
    hf, files = models
    st = saehook.Steering(sae, layer=2).add(7, 4.0).add(9, -2.0)
    st1 = saehook.Steering(sae, layer=1).add(3, 2.0)
    _, hf_steered, _ = hf_forward(hf, TOKENS, [st1, st])
    llm = open_llm(files["f32"])
    runs = {}
    for name, cv in (("cvec", True), ("callback", False)):
        llm.reset()
        with llm.steer(st, st1, control_vectors=cv):
            llm.eval(TOKENS)
        runs[name] = last_logits(llm)
    np.testing.assert_allclose(runs["cvec"], runs["callback"], rtol=1e-5, atol=1e-5)
    assert rel_err(runs["cvec"], hf_steered[-1]) < REL
    # The exported file, loaded back and applied by llama.cpp: direction.N in buffer row N - 1
    # (as llama.cpp's control-vector loader does), added to block N's output.
    path = tmp_path / "steer.gguf"
    export_control_vector([st, st1], path, model_hint="qwen3")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    buf = np.zeros((llm.n_layer - 1, D), np.float32)
    for t in reader.tensors:
        n = int(t.name.split(".")[1])
        buf[n - 1] += np.asarray(t.data, dtype=np.float32)
    llm.reset()
    rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                          buf.size, D, 1, llm.n_layer - 1)
    assert rc == 0
    llm.eval(TOKENS)
    np.testing.assert_allclose(last_logits(llm), runs["callback"], rtol=1e-5, atol=1e-5)
    llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, D, -1, -1)
    with pytest.raises(ValueError, match="block 0"):
        export_control_vector([saehook.Steering(sae, layer=0).add(1, 1.0)], tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="add-only"):
        export_control_vector([saehook.Steering(sae, layer=1).clamp(1, 1.0)], tmp_path / "x.gguf")


def test_capture_reads_the_residual_before_steering_at_its_layer(models, sae):
    _, files = models
    other = random_sae(seed=5, d_sae=512, k=8)  # a second SAE: its capture cannot share the steer's encode
    llm = open_llm(files["f32"])
    with llm.capture({1: sae, 2: sae}, residuals=True) as clean, llm.capture({1: other}) as clean_other:
        llm.eval(TOKENS)
    f = int(clean[1].indices[-1, 0])
    cases = {
        "clamp": dict(st=saehook.Steering(sae, layer=1).clamp(f, 30.0)),
        "add (callback)": dict(st=saehook.Steering(sae, layer=1).add(f, 30.0), control_vectors=False),
        "add (control vector)": dict(st=saehook.Steering(sae, layer=1).add(f, 30.0)),
    }
    for name, case in cases.items():
        for capture_first in (False, True):
            llm.reset()
            steer = llm.steer(case["st"], control_vectors=case.get("control_vectors", True))
            cap = llm.capture({1: sae, 2: sae}, residuals=True)
            cap_other = llm.capture({1: other})
            outer, inner = (cap, steer) if capture_first else (steer, cap)
            with outer as a, inner as b, cap_other as ro:
                llm.eval(TOKENS)
            rec = a if capture_first else b
            np.testing.assert_allclose(rec[1].residuals, clean[1].residuals, rtol=1e-6, atol=1e-6, err_msg=name)
            np.testing.assert_array_equal(rec[1].indices, clean[1].indices, err_msg=name)
            np.testing.assert_allclose(rec[1].values, clean[1].values, rtol=1e-5, atol=1e-5, err_msg=name)
            np.testing.assert_array_equal(ro[1].indices, clean_other[1].indices, err_msg=name)
            assert rel_err(rec[2].residuals, clean[2].residuals) > 1e-3, name  # later blocks are steered


# ---------------------------------------------------------------------------------------------
# generation, positions, cache reuse


def test_generation_positions_and_kv_reuse(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
    prompt = TOKENS[:12]
    gen = dict(max_tokens=6, temperature=0.0, top_k=1)
    base = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    llm.reset()
    with llm.capture({1: sae}) as rec:
        out = llm.create_completion(prompt, **gen)
    r = rec[1]
    # every evaluated token: the prompt, then the generated ones fed back (not the last sample)
    n = len(r.positions)
    assert n > 12 and r.positions.tolist() == list(range(n))
    assert r.tokens[:12].tolist() == prompt
    assert r.generated.tolist() == [False] * 12 + [True] * (n - 12)
    assert out["choices"][0]["text"] == base
    # The same prompt again inside a capture: the cached prefix is evaluated again so that the
    # capture gets the prompt (issue 14 item 1), the same rows as the first time.
    with llm.capture({1: sae}) as again:
        llm.create_completion(prompt, **gen)
    a = again[1]
    np.testing.assert_array_equal(a.positions, r.positions)
    np.testing.assert_array_equal(a.tokens, r.tokens)
    np.testing.assert_array_equal(a.indices, r.indices)
    # positions='generated' leaves the prompt (and so the first new token) alone.
    llm.reset()
    with llm.steer(saehook.Steering(sae, layer=1, positions="generated").add(3, 200.0)):
        steered_gen = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    llm.reset()
    with llm.steer(saehook.Steering(sae, layer=1, positions="prompt").add(3, 200.0)):
        steered_prompt = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    assert steered_gen[:1] == base[:1] and steered_gen != base
    assert steered_prompt != base


def test_nested_capture_and_steer_with_streaming_and_chat(models, sae):
    _, files = models
    llm = open_llm(files["f32"], chat_format="chatml")
    prompt = TOKENS[:8]
    gen = dict(max_tokens=5, temperature=0.0, top_k=1)
    st = saehook.Steering(sae, layer=1).clamp(2, 9.0)
    llm.reset()
    with llm.steer(st):
        with llm.capture({2: sae}) as outer:
            with llm.capture({1: sae}) as inner:
                streamed = "".join(c["choices"][0]["text"] for c in llm(prompt, stream=True, **gen))
        after_inner = len(inner[1].tokens)
        llm.reset()
        plain = llm(prompt, **gen)["choices"][0]["text"]  # still steered: the outer block is open
    assert streamed == plain
    assert after_inner == len(prompt) + 4  # the prompt and the 4 sampled tokens fed back
    assert len(outer[2].tokens) >= 2  # last block: the last prompt token and each fed-back token
    assert not llm._entries  # every block removed its entries

    messages = [{"role": "user", "content": "hi"}]
    llm.reset()
    with llm.capture({1: sae}) as chat:
        reply = llm.create_chat_completion(messages=messages, **gen)
    r = chat[1]
    n_prompt = reply["usage"]["prompt_tokens"]
    chat_prompt = llama_cpp.llama_chat_format.format_chatml(messages).prompt
    assert r.tokens[:n_prompt].tolist() == llm.tokenize(chat_prompt.encode(), add_bos=True, special=True)
    assert (~r.generated[:n_prompt]).all() and r.generated[n_prompt:].all()
    llm.reset()
    with llm.capture({1: sae}) as chat_stream:
        chunks = list(llm.create_chat_completion(messages=messages, stream=True, **gen))
    assert len(chunks) > 1
    np.testing.assert_array_equal(chat_stream[1].tokens, r.tokens)


# ---------------------------------------------------------------------------------------------
# several sequences


def _two_sequence_batch(a, b):
    batch = llama_cpp.llama_batch_init(32, 0, 2)
    j = 0
    for s, seq in enumerate((a, b)):
        for p, t in enumerate(seq):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = t, p, 1, s
            batch.logits[j] = p == len(seq) - 1
            j += 1
    batch.n_tokens = j
    return batch


def test_several_sequences_in_one_batch(models, sae):
    _, files = models
    a, b = TOKENS[:10], TOKENS[10:17]
    single = open_llm(files["f32"])
    ref = {}
    for s, seq in enumerate((a, b)):
        single.reset()
        with single.capture({1: sae}, residuals=True) as one:
            single.eval(seq)
        ref[s] = one[1].residuals

    llm = open_llm(files["f32"], context_overrides={"n_seq_max": 2, "kv_unified": True})
    batch = _two_sequence_batch(a, b)
    try:
        with llm.capture({1: sae, 2: sae}, residuals=True) as rec:
            llm.announce_batch(batch)
            assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
            llm.raise_hook_error()
    finally:
        llama_cpp.llama_batch_free(batch)
    for s, seq in enumerate((a, b)):
        rows = rec[1].seq_ids == s
        assert rec[1].tokens[rows].tolist() == seq and rec[1].positions[rows].tolist() == list(range(len(seq)))
        np.testing.assert_allclose(rec[1].residuals[rows], ref[s], rtol=1e-5, atol=1e-5)
    # Last block: the two output rows, one per sequence.
    assert rec[2].seq_ids.tolist() == [0, 1] and rec[2].tokens.tolist() == [a[-1], b[-1]]

    # One KV stream per sequence: llama.cpp groups micro-batch rows by sequence; refused.
    grouped = open_llm(files["f32"], context_overrides={"n_seq_max": 2, "kv_unified": False})
    batch = _two_sequence_batch(a, b)
    try:
        with grouped.capture({1: sae}):
            with pytest.raises(ValueError, match="kv_unified"):
                grouped.announce_batch(batch)
    finally:
        llama_cpp.llama_batch_free(batch)

    # llama-cpp-python's own multi-sequence decode (embed) goes through the same announcement.
    emb = open_llm(files["f32"], embedding=True)
    texts = [bytes(a).decode("latin-1"), bytes(b).decode("latin-1")]
    toks = [emb.tokenize(t.encode(), add_bos=False) for t in texts]
    with emb.capture({1: sae}, residuals=True) as rec_e:
        emb.embed(texts)
    for s in (0, 1):
        rows = rec_e[1].seq_ids == s
        assert rec_e[1].tokens[rows].tolist() == toks[s]
    single.reset()
    with single.capture({1: sae}, residuals=True) as one:
        single.eval(toks[1])
    np.testing.assert_allclose(rec_e[1].residuals[rec_e[1].seq_ids == 1], one[1].residuals, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# robustness


def test_unannounced_decodes_are_not_captured(models, sae):
    """A decode nobody announced (here llama.cpp's warm-up, as its tools run it at start-up:
    warm-up mode, one decode, memory cleared) is neither captured nor a crash; the next
    announced decode is captured normally."""
    _, files = models
    llm = open_llm(files["f32"])
    toks = (llama_cpp.llama_token * 2)(gm.EOS, 65)
    with pytest.warns(UserWarning, match="without an announcement"):
        with llm.capture({1: sae, 2: sae}) as rec:
            llama_cpp.llama_set_warmup(llm._ctx.ctx, True)
            assert llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(toks, 2)) == 0
            llama_cpp.llama_set_warmup(llm._ctx.ctx, False)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
            llm.raise_hook_error()
    assert len(rec[1].tokens) == 0 and len(rec[2].tokens) == 0
    assert llm.unannounced_rows >= 2
    llm.reset()
    with llm.capture({1: sae}) as rec:
        llm.eval(TOKENS[:5])
    assert rec[1].positions.tolist() == list(range(5))


def test_an_announcement_that_does_not_fit_the_decode_is_an_error(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
    toks = (llama_cpp.llama_token * 5)(*TOKENS[:5])
    cases = [(dict(tokens=TOKENS[:5], positions=range(5), outputs=[True] * 5), "match neither"),  # 1 output, not 5
             (dict(tokens=TOKENS[:3], positions=range(3)), "more tokens than were announced")]
    for announced, message in cases:
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        with llm.capture({1: sae, 2: sae}):
            llm.announce(**announced)
            assert llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(toks, 5)) == 0
            with pytest.raises(RuntimeError, match=message):
                llm.raise_hook_error()
    llm.reset()
    with llm.capture({2: sae}) as rec:  # the error was cleared: the hook works again
        llm.eval(TOKENS[:5])
    assert rec[2].positions.tolist() == [4]


def test_one_block_model(tmp_path, sae):
    """With a single block, l_out-0 is also the last block (only output rows): the hook then
    follows the announced outputs instead of learning micro-batches from l_out-0."""
    hf = gm.build_hf_model(num_hidden_layers=1)
    path = tmp_path / "one.gguf"
    gm.write_gguf(hf, path)
    outs, _, _ = hf_forward(hf, TOKENS)
    for logits_all, rows in ((False, [31, 39]), (True, list(range(40)))):
        llm = open_llm(path, n_batch=32, n_ubatch=16, logits_all=logits_all)
        with llm.capture({0: sae}, residuals=True) as rec:
            llm.eval(TOKENS)
        assert rec[0].positions.tolist() == rows
        assert rel_err(rec[0].residuals, outs[0][rows]) < 1e-5


def test_ggml_functions_come_from_llamas_own_library(models):
    """The hook calls the ggml-base that libllama uses, not a second copy (pip installs
    libggml-base.so and .so.0 as two files)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    _, files = models
    open_llm(files["f32"])
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "ggml-base" in line}
    assert len(mapped) == 1, mapped


@pytest.mark.parametrize("quant,floor", [("Q8_0", 0.9), ("Q4_K_M", 0.55)])
def test_quantized_models_keep_the_features(models, sae, quant, floor):
    _, files = models
    feats = {}
    for name in ("f32", quant):
        llm = open_llm(files[name])
        with llm.capture({0: sae, 1: sae}) as rec:
            llm.eval(TOKENS)
        feats[name] = rec
    for L in (0, 1):
        ov = overlap(feats["f32"][L].indices, feats[quant][L].indices)
        print(f"{quant}: layer {L} top-{sae.k} overlap with f32 = {ov:.3f}")
        assert ov >= floor, (quant, L, ov)


def _gpu_offload() -> bool:
    supported = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    return bool(supported and supported())


@pytest.mark.skipif(not _gpu_offload(),
                    reason="llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)")
def test_capture_and_steering_with_every_layer_on_the_gpu(models, sae):
    """n_gpu_layers=-1: the residual lives in the GPU backend's buffers, which the hook reads and
    writes through ggml_backend_tensor_get/set; the control vector lives there too. transformers
    is the oracle, as on the CPU (to GPU float32 matmul precision)."""
    hf, files = models
    outs, clean, hidden_states = hf_forward(hf, TOKENS)
    llm = open_llm(files["f32"], n_gpu_layers=-1, logits_all=True)
    with llm.capture({0: sae, 1: sae}, residuals=True) as rec:
        llm.eval(TOKENS)
    for L in (0, 1):
        assert rel_err(rec[L].residuals, hidden_states[L + 1]) < 1e-3
        assert overlap(rec[L].indices, sae.encode(hidden_states[L + 1])[1]) >= 0.98
    base = np.array(llm.scores[: len(TOKENS)])
    assert rel_err(base, clean) < 1e-3
    st = _spec(sae, outs[1][-1], layer=1)  # clamp/scale/ablate through the callback
    add = saehook.Steering(sae, layer=2).add(7, 4.0)  # through the control vector
    _, hf_steered, _ = hf_forward(hf, TOKENS, [st, add])
    llm.reset()
    with llm.steer(st, add):
        llm.eval(TOKENS)
    steered = np.array(llm.scores[: len(TOKENS)])
    assert rel_err(steered, base) > 0.1
    assert rel_err(steered, hf_steered) < 1e-3
    # A quantized model on the GPU keeps the features of the same model on the CPU.
    feats = {}
    for layers in (0, -1):
        q = open_llm(files["Q8_0"], n_gpu_layers=layers)
        with q.capture({1: sae}) as r:
            q.eval(TOKENS)
        feats[layers] = r[1].indices
    assert overlap(feats[0], feats[-1]) >= 0.9


def test_errors_before_any_token(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
    small = saehook.SAE(np.zeros((32, 64), np.float32), np.zeros((32, 64), np.float32), k=4)
    with pytest.raises(ValueError, match="d_model mismatch"):
        with llm.capture({1: small}):
            pass
    with pytest.raises(ValueError, match="d_model mismatch"):
        with llm.steer(saehook.Steering(small, layer=1).add(1, 1.0)):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with llm.capture({N_LAYER: sae}):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with llm.steer(saehook.Steering(sae, layer=-1).clamp(1, 1.0)):
            pass
    with pytest.raises(ValueError, match="no layer"):
        with llm.steer(saehook.Steering(sae).clamp(1, 1.0)):
            pass
    with pytest.raises(IndexError, match="out of range"):
        saehook.Steering(sae, layer=1).clamp(1024, 1.0)
    with pytest.raises(TypeError, match="context_params has no field"):
        open_llm(files["f32"], context_overrides={"no_such_field": 1})
    assert not llm._entries and llm.n_tokens == 0


# ---------------------------------------------------------------------------------------------
# C


def _llama_cpp_dirs():
    pkg = os.path.dirname(llama_cpp.__file__)
    return os.path.join(os.path.dirname(pkg), "include"), os.path.join(pkg, "lib")


def test_c_example_program(models, sae, tmp_path):
    """examples/llama_capture.c built with CMake against llama-cpp-python's headers and libraries
    (found by examples/CMakeLists.txt itself) and run on the Q8_0 model."""
    _, files = models
    cmake = shutil.which("cmake")
    include, _ = _llama_cpp_dirs()
    if not cmake:
        pytest.skip("cmake not found")
    if not os.path.exists(os.path.join(include, "llama.h")):
        pytest.skip(f"llama.cpp headers not found in {include} (llama-cpp-python installs them there)")
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", example, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DSAEHOOK_INCLUDE_DIR={saehook.get_include()}", f"-DSAEHOOK_LIBRARY={saehook.get_library()}"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)

    # The example loads models as HookedLlama does where llama.cpp's AMX product would crash.
    repack = () if shl._resolve_extra_bufts(None) else ("--no-repack",)

    def run(*extra):
        out = subprocess.run([str(build / "llama_capture"), str(files["Q8_0"]), "1", "--random-sae", "1024", "16",
                              *repack, *extra, "Hello"], check=True, capture_output=True, text=True, timeout=120).stdout
        rows = [ln.split() for ln in out.splitlines() if ln.startswith("token")]
        assert rows and all(len(r) == 5 + 5 for r in rows), out  # token T pos P KIND: + 5 features
        return rows

    rows = run()
    # "Hello" is 5 byte tokens, then the 4 generated tokens fed back: 9 rows at positions 0..8
    assert [int(r[3]) for r in rows] == list(range(9))
    assert [r[4] for r in rows] == ["prompt:"] * 5 + ["gen:"] * 4
    # Clamping a feature on the generated tokens: the prompt and the first sampled token are
    # unchanged (features are read before the steering), what follows is steered.
    steered = run("--clamp", "5", "40")
    assert steered[:6] == rows[:6] and steered != rows



@pytest.mark.parametrize("torch_first", [True, False])
def test_warns_when_gomp_spincount_comes_too_late(torch_first):
    # torch's own libgomp serves llama.cpp too; once loaded, GOMP_SPINCOUNT no longer applies.
    order = "import torch; import saehook.llama" if torch_first else "import saehook.llama; import torch"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-W", "always", "-c", order], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("libgomp is already loaded" in out.stderr) == torch_first, out.stderr


def test_repacked_weight_buffers_follow_the_cpu_and_the_caller(models):
    # llama.cpp's AMX product crashes on Sapphire Rapids (ggml-org/llama.cpp#20824): the
    # repacked buffers are off by default exactly where llama.cpp reports AMX, and the caller
    # decides when it says so. A plain Llama loaded the same way computes the same logits.
    _, files = models
    assert shl._resolve_extra_bufts(None) == (not shl._llama_has_amx())
    assert shl._resolve_extra_bufts(False) is False and shl._resolve_extra_bufts(True) is True
    default = open_llm(files["Q8_0"], logits_all=True)
    assert bool(default.model_params.use_extra_bufts) == shl._resolve_extra_bufts(None)
    off = open_llm(files["Q8_0"], use_extra_bufts=False, logits_all=True)
    assert not off.model_params.use_extra_bufts
    plain = shl.plain_llama(str(files["Q8_0"]), n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, seed=0,
                            logits_all=True, **KV_F32)
    assert bool(plain.model_params.use_extra_bufts) == shl._resolve_extra_bufts(None)
    tokens = default.tokenize(b"The quick brown fox")
    logits = []
    for llm in (default, off, plain):
        llm.reset()
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)]))
    np.testing.assert_allclose(logits[2], logits[0], rtol=0, atol=0)  # the same loading, the same kernels
    # Repacked or not, the same products in another order (where the default repacks, e.g. Zen).
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-3 * np.abs(logits[0]).max())
