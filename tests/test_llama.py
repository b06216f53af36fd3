"""The llama.cpp hook on tiny GGUF models built here (transformers Qwen3 -> GGUF -> Q8_0/Q4_K_M),
with transformers as the independent oracle."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import saehook  # noqa: E402
from saehook.llama import HookedLlama, export_control_vector  # noqa: E402

import gguf_models as gm  # noqa: E402

D = 256
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 256, 40)]
REL = 3e-3  # llama.cpp's f16 KV cache vs transformers' f32 attention


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = gm.build_hf_model()
    f32 = d / "tiny-f32.gguf"
    gm.write_gguf(hf, f32)
    files = {"f32": f32}
    for q in ("Q8_0", "Q4_K_M"):
        files[q] = d / f"tiny-{q}.gguf"
        gm.quantize(f32, files[q], q)
    return hf, files


@pytest.fixture(scope="module")
def sae():
    rng = np.random.default_rng(0)
    W_enc = (rng.standard_normal((1024, D)) / 16).astype(np.float32)
    W_dec = (rng.standard_normal((1024, D)) / 16).astype(np.float32)
    return saehook.SAE(W_enc, W_dec, (0.05 * rng.standard_normal(1024)).astype(np.float32), k=16)


def open_llm(path, **kw):
    args = dict(n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, seed=0)
    args.update(kw)
    return HookedLlama(str(path), **args)


def hf_block_outputs(model, tokens, steer=None):
    """Outputs of every decoder layer (the residual after block L) and the logits."""
    import saehook.hf as shf

    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, L=L: outs.__setitem__(L, (o[0] if isinstance(o, tuple) else o)[0].clone()))
             for L, layer in enumerate(shf.decoder_layers(model))]
    try:
        with torch.no_grad(), (shf.steer(model, *steer) if steer else _null()):
            logits = model(torch.tensor([tokens])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return {L: v.numpy() for L, v in outs.items()}, logits.numpy()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_capture_equals_transformers_hidden_states(models, sae):
    hf, files = models
    llm = open_llm(files["f32"])
    with llm.capture({0: sae, 1: sae, 2: sae}, residuals=True) as rec:
        llm.eval(TOKENS)
    outs, _ = hf_block_outputs(hf, TOKENS)
    for L in (0, 1):
        r = rec[L]
        np.testing.assert_array_equal(r.tokens, TOKENS)
        np.testing.assert_array_equal(r.positions, np.arange(len(TOKENS)))
        assert rel_err(r.residuals, outs[L]) < REL
        v, i = sae.encode(r.residuals)  # the features are the SAE's encode of what was captured
        np.testing.assert_array_equal(r.indices, i)
        np.testing.assert_allclose(r.values, v, rtol=1e-6)
        _, i_hf = sae.encode(outs[L])
        overlap = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(r.indices.tolist(), i_hf.tolist())])
        assert overlap > 0.9, overlap
    # Last block: only the row whose logits were requested exists (the last token).
    last = rec[2]
    assert last.tokens.tolist() == [TOKENS[-1]] and last.positions.tolist() == [len(TOKENS) - 1]
    assert rel_err(last.residuals[0], outs[2][-1]) < REL


def test_batch_and_ubatch_splitting(models, sae):
    _, files = models
    tokens = (TOKENS * 4)[:150]
    whole = open_llm(files["f32"], n_batch=256, n_ubatch=256)
    with whole.capture({1: sae}, residuals=True) as ref:
        whole.eval(tokens)
    split = open_llm(files["f32"], n_batch=32, n_ubatch=8)  # 5 decodes, 4 micro-batches each
    with split.capture({1: sae, 2: sae}, residuals=True) as rec:
        split.eval(tokens)
    np.testing.assert_array_equal(rec[1].positions, np.arange(150))
    np.testing.assert_array_equal(rec[1].tokens, tokens)
    np.testing.assert_allclose(rec[1].residuals, ref[1].residuals, rtol=1e-3, atol=1e-3)
    # On the last block, the one output row of each decode (tokens 31, 63, ..., 149).
    assert rec[2].positions.tolist() == [31, 63, 95, 127, 149]


def _spec(sae, hidden_row, layer=1):
    v, i = sae.encode(hidden_row[None])
    return (saehook.Steering(sae, layer=layer).clamp(int(i[0, 0]), 3.0).scale(int(i[0, 1]), 2.0)
            .ablate(int(i[0, 2])).add(5, 1.5))


def test_steering_matches_transformers(models, sae):
    hf, files = models
    outs, clean = hf_block_outputs(hf, TOKENS)
    st = _spec(sae, outs[1][-1])
    _, hf_logits = hf_block_outputs(hf, TOKENS, steer=[st])
    llm = open_llm(files["f32"])
    llm.eval(TOKENS)
    base = last_logits(llm)
    llm.reset()
    with llm.steer(st):
        llm.eval(TOKENS)
    steered = last_logits(llm)
    assert rel_err(base, clean[-1]) < REL
    assert rel_err(steered, base) > 10 * REL  # the intervention matters...
    assert rel_err(steered, hf_logits[-1]) < REL  # ...and is the same as transformers'
    # Leaving the block removes the hook: logits are back to the clean ones.
    llm.reset()
    llm.eval(TOKENS)
    np.testing.assert_allclose(last_logits(llm), base, rtol=1e-5, atol=1e-5)


def test_additive_steering_control_vector_equals_callback(models, sae, tmp_path):
    _, files = models
    st = saehook.Steering(sae, layer=2).add(7, 4.0).add(9, -2.0)
    llm = open_llm(files["f32"])
    runs = {}
    for name, cv in (("cvec", True), ("callback", False)):
        llm.reset()
        with llm.steer(st, control_vectors=cv):
            llm.eval(TOKENS)
        runs[name] = last_logits(llm)
    np.testing.assert_allclose(runs["cvec"], runs["callback"], rtol=1e-4, atol=1e-4)
    # Exported file: llama.cpp's loader puts direction.N in buffer row N - 1 (added to block N).
    path = tmp_path / "steer.gguf"
    export_control_vector([st], path, model_hint="qwen3")
    reader = gguf.GGUFReader(str(path))
    buf = np.zeros((llm.n_layer, D), np.float32)
    for t in reader.tensors:
        n = int(t.name.split(".")[1])
        buf[n - 1] += np.asarray(t.data, dtype=np.float32)
    llm.reset()
    rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                          buf.size, D, 1, llm.n_layer - 1)
    assert rc == 0
    llm.eval(TOKENS)
    np.testing.assert_allclose(last_logits(llm), runs["callback"], rtol=1e-4, atol=1e-4)
    llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, D, -1, -1)
    with pytest.raises(ValueError, match="block 0"):
        export_control_vector([saehook.Steering(sae, layer=0).add(1, 1.0)], tmp_path / "x.gguf")


def test_generation_positions_and_kv_reuse(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
    prompt = TOKENS[:12]
    gen = dict(max_tokens=6, temperature=0.0, top_k=1)
    base = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    llm.reset()
    with llm.capture({1: sae}) as rec:
        out = llm.create_completion(prompt, **gen)
    # every evaluated token: the prompt, then the generated ones fed back (not the last sample)
    assert rec[1].positions.tolist() == list(range(len(rec[1].positions)))
    assert rec[1].tokens[:12].tolist() == prompt and len(rec[1].tokens) >= 12
    assert out["choices"][0]["text"] == base
    # The same prompt again: the cached prefix is not evaluated, hence not captured again.
    with llm.capture({1: sae}) as again:
        llm.create_completion(prompt, **gen)
    assert 0 < len(again[1].tokens) < len(rec[1].tokens)
    # positions='generated' leaves the prompt (and so the first new token) alone.
    big = saehook.Steering(sae, layer=1, positions="generated").add(3, 200.0)
    llm.reset()
    with llm.steer(big):
        steered_gen = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    llm.reset()
    with llm.steer(saehook.Steering(sae, layer=1, positions="prompt").add(3, 200.0)):
        steered_prompt = llm.create_completion(prompt, **gen)["choices"][0]["text"]
    assert steered_gen[:1] == base[:1] and steered_gen != base
    assert steered_prompt != base


def test_two_sequences_in_one_batch(models, sae):
    _, files = models
    llm = open_llm(files["f32"], context_overrides={"n_seq_max": 2, "kv_unified": True})
    a, b = TOKENS[:10], TOKENS[10:17]
    batch = llama_cpp.llama_batch_init(32, 0, 2)
    try:
        toks, pos, seqs = [], [], []
        for s, seq in enumerate((a, b)):
            for p, t in enumerate(seq):
                j = len(toks)
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = t, p, 1, s
                batch.logits[j] = p == len(seq) - 1
                toks.append(t), pos.append(p), seqs.append(s)
        batch.n_tokens = len(toks)
        with llm.capture({1: sae}, residuals=True) as rec:
            llm.announce(toks, pos, seq_ids=seqs, outputs=[bool(batch.logits[j]) for j in range(len(toks))])
            assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
            llm.raise_hook_error()
    finally:
        llama_cpp.llama_batch_free(batch)
    single = open_llm(files["f32"])
    for s, seq in enumerate((a, b)):
        single.reset()
        with single.capture({1: sae}, residuals=True) as one:
            single.eval(seq)
        rows = rec[1].seq_ids == s
        assert rec[1].tokens[rows].tolist() == seq
        np.testing.assert_allclose(rec[1].residuals[rows], one[1].residuals, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("quant,floor", [("Q8_0", 0.85), ("Q4_K_M", 0.5)])
def test_quantized_models_keep_the_features(models, sae, quant, floor):
    _, files = models
    feats = {}
    for name in ("f32", quant):
        llm = open_llm(files[name])
        with llm.capture({1: sae}) as rec:
            llm.eval(TOKENS)
        feats[name] = rec[1].indices
    overlap = float(np.mean([len(set(x) & set(y)) / 16 for x, y in zip(feats["f32"].tolist(), feats[quant].tolist())]))
    print(f"{quant}: top-16 overlap with f32 = {overlap:.3f}")
    assert overlap >= floor


def test_errors_before_any_token(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
    small = saehook.SAE(np.zeros((32, 64), np.float32), np.zeros((32, 64), np.float32), k=4)
    with pytest.raises(ValueError, match="d_model mismatch"):
        with llm.capture({1: small}):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with llm.steer(saehook.Steering(sae, layer=3).clamp(1, 1.0)):
            pass
    with pytest.raises(IndexError, match="out of range"):
        saehook.Steering(sae, layer=1).clamp(1024, 1.0)
    assert not llm._entries


def test_c_example_program(models, sae, tmp_path):
    _, files = models
    cmake = shutil.which("cmake")
    include = os.path.join(os.path.dirname(os.path.dirname(llama_cpp.__file__)), "include")  # site-packages/include
    if not cmake or not os.path.exists(os.path.join(include, "llama.h")):
        pytest.skip("cmake or llama.cpp headers (from llama-cpp-python) not found")
    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", example, "-B", str(build), f"-DSAEHOOK_INCLUDE_DIR={saehook.get_include()}",
                    f"-DSAEHOOK_LIBRARY={saehook.get_library()}", f"-DLLAMA_INCLUDE_DIR={include}",
                    f"-DLLAMA_LIB_DIR={os.path.join(os.path.dirname(llama_cpp.__file__), 'lib')}"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    out = subprocess.run([str(build / "llama_capture"), str(files["Q8_0"]), "1", "--random-sae", "1024", "16", "Hello"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("token")]
    # "Hello" is 5 byte tokens, then 4 generated tokens are fed back: 9 rows at positions 0..8
    assert [int(ln.split()[3].rstrip(":")) for ln in lines] == list(range(9)), out
    assert all(len(ln.split()) == 4 + 5 for ln in lines), out


def test_nested_capture_and_steer_with_streaming(models, sae):
    _, files = models
    llm = open_llm(files["f32"])
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
    assert len(outer[2].tokens) >= 1
    assert not llm._entries  # every block removed its entries
