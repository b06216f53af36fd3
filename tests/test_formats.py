"""Every loader against files written the way each format's own tooling writes them (torch.save,
safetensors, numpy.savez), checked against that format's own encode/decode transcribed from its
code; zero copy checked through /proc/self/maps; bad files refused with the file named; the
safetensors reader/writer against the official safetensors package, both ways."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

import _format_fixtures as ff  # noqa: E402
import saehook  # noqa: E402
from saehook.formats import safetensors_io  # noqa: E402

D, M = 24, 64  # d_model, d_sae
needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


def _x(n=8, seed=99):
    return ff.randn(n, D, seed=seed)


def _same_file(a, b):
    return a is not None and os.path.realpath(a) == os.path.realpath(str(b))


# ---------------- Qwen-Scope ----------------
@pytest.fixture
def qwen_dir(tmp_path):
    d = tmp_path / "SAE-Res-Qwen3.5-2B-Base-W32K-L0_10"
    d.mkdir()
    for layer in (3, 7):
        torch.save(ff.qwen_state(D, M, seed=layer), d / f"layer{layer}.sae.pt")
    return d


def test_qwenscope_matches_the_model_card(qwen_dir):
    sae = saehook.load(qwen_dir / "layer3.sae.pt")
    assert (sae.k, sae.layer, sae.activation, sae.dec_layout, sae.subtract_b_dec) == (10, 3, "topk", "cols", False)
    assert sae.metadata["model"] == "Qwen3.5-2B-Base" and sae.hook_point == "resid_post"
    sd = ff.qwen_state(D, M, seed=3)
    sd["b_enc"] -= 12.0  # most pre-activations negative: topk keeps them as they are, no ReLU
    torch.save(sd, qwen_dir / "layer3.sae.pt")
    sae = saehook.load(qwen_dir / "layer3.sae.pt")
    x = _x(16)
    pre = x @ sd["W_enc"].T + sd["b_enc"]  # the card: pre = residual @ W_enc.T + b_enc; pre.topk(k)
    assert (pre.topk(10).values < 0).any()
    vals, idx = sae.encode(x)
    ff.check_selection(vals, idx, pre, 10)
    recon = sae.reconstruct(x).numpy()  # acts @ W_dec.T + b_dec: features are columns of W_dec
    np.testing.assert_allclose(recon, ff.decode_rows(vals, idx, sd["W_dec"].T, sd["b_dec"]), rtol=1e-4, atol=1e-4)
    ref_vals, ref_idx = pre.topk(10)
    ref_recon = torch.zeros(16, M).scatter(1, ref_idx, ref_vals) @ sd["W_dec"].T + sd["b_dec"]
    np.testing.assert_allclose(recon, ref_recon.numpy(), rtol=1e-4, atol=1e-4)


@needs_proc_maps
def test_qwenscope_weights_are_mapped_not_copied(qwen_dir):
    path = qwen_dir / "layer7.sae.pt"
    sae = saehook.load(path)
    for name in ("W_enc", "W_dec"):
        assert _same_file(ff.mapped_file(sae.arrays()[name]), path), name
    x = _x()
    sd = ff.qwen_state(D, M, seed=7)
    vals, idx = sae.encode(x)
    ff.check_selection(vals, idx, x @ sd["W_enc"].T + sd["b_enc"], 10)


def test_qwenscope_directory_is_a_layer_set(qwen_dir):
    s = saehook.load(qwen_dir)
    assert isinstance(s, saehook.SAESet) and s.layers == [3, 7] and len(s) == 2
    assert s[7].layer == 7 and 3 in s and 5 not in s and "x" not in s
    assert "SAESet(2 layers [3, 7]" in repr(s)
    assert saehook.load(qwen_dir, layer=7).layer == 7
    with pytest.raises(saehook.SAEFormatError, match=r"no layer 5; layers present: \[3, 7\]"):
        saehook.load(qwen_dir, layer=5)
    with pytest.raises(KeyError, match="no SAE for layer 5"):
        s[5]


def test_qwenscope_k_and_model_from_the_path(tmp_path):
    # Hugging Face's cache: the release name is two levels up, the file's folder is a hash.
    snap = tmp_path / "models--Qwen--SAE-Res-Qwen3.5-9B-Base-W64K-L0_20" / "snapshots" / "0a1b2c"
    snap.mkdir(parents=True)
    torch.save(ff.qwen_state(D, M), snap / "layer12.sae.pt")
    sae = saehook.load(snap / "layer12.sae.pt")
    assert (sae.k, sae.layer, sae.metadata["model"]) == (20, 12, "Qwen3.5-9B-Base")
    assert saehook.load(snap / "layer12.sae.pt", k=5, layer=4).k == 5
    assert saehook.load(snap, layer=12).k == 20


def test_qwenscope_without_k_asks_for_it(tmp_path):
    torch.save(ff.qwen_state(D, M), tmp_path / "layer0.sae.pt")
    with pytest.raises(saehook.SAEFormatError, match=r"layer0\.sae\.pt: Qwen-Scope files do not store k.*pass k="):
        saehook.load(tmp_path / "layer0.sae.pt")
    assert saehook.load(tmp_path / "layer0.sae.pt", k=4).k == 4
    with pytest.raises(saehook.SAEFormatError, match="k must be a positive integer"):
        saehook.load(tmp_path / "layer0.sae.pt", k=0)


def test_qwenscope_legacy_torch_save_format(tmp_path):
    sd = ff.qwen_state(D, M)
    torch.save(sd, tmp_path / "layer2.pt", _use_new_zipfile_serialization=False)  # cannot be mmapped
    sae = saehook.load(tmp_path / "layer2.pt", k=3)
    x = _x()
    vals, idx = sae.encode(x)
    ff.check_selection(vals, idx, x @ sd["W_enc"].T + sd["b_enc"], 3)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/saehook-pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_qwenscope_bad_files_are_refused(tmp_path):
    d = tmp_path / "R-L0_4"
    d.mkdir()

    def refused(name, pattern):
        with pytest.raises(saehook.SAEFormatError, match=pattern):
            saehook.load(d / name)

    raw_path = d / "layer1.sae.pt"
    torch.save(ff.qwen_state(D, M), raw_path)
    raw = raw_path.read_bytes()
    (d / "layer2.sae.pt").write_bytes(raw[: len(raw) // 2])
    refused("layer2.sae.pt", r"layer2\.sae\.pt: not a loadable tensor checkpoint")
    sd = ff.qwen_state(D, M)
    del sd["b_dec"]
    torch.save(sd, d / "layer3.sae.pt")
    refused("layer3.sae.pt", r"layer3\.sae\.pt: missing tensor\(s\) b_dec")
    sd = ff.qwen_state(D, M)
    sd["W_dec"] = ff.randn(D, M + 1)
    torch.save(sd, d / "layer4.sae.pt")
    refused("layer4.sae.pt", r"layer4\.sae\.pt: inconsistent shapes: W_dec is \(24, 65\), expected \(24, 64\)")
    sd = ff.qwen_state(D, M)
    sd["b_enc"] = [0.0] * M  # a list is allowed by weights_only, but it is not a tensor
    torch.save(sd, d / "layer5.sae.pt")
    refused("layer5.sae.pt", r"layer5\.sae\.pt: b_enc is a list, not a tensor")
    torch.save(ff.randn(M, D), d / "layer6.sae.pt")
    refused("layer6.sae.pt", r"layer6\.sae\.pt: expected a dict of tensors, found a Tensor")
    sd = ff.qwen_state(D, M)
    sd["W_enc"] = sd["W_enc"].to(torch.int32)
    torch.save(sd, d / "layer7.sae.pt")
    refused("layer7.sae.pt", r"layer7\.sae\.pt: .*unsupported tensor dtype torch\.int32")

    # Pickles that would run code: weights_only refuses them before anything executes.
    if os.path.exists("/tmp/saehook-pwned"):
        os.remove("/tmp/saehook-pwned")
    with open(d / "layer8.sae.pt", "wb") as f:  # a legacy plain pickle
        pickle.dump({"W_enc": _Evil()}, f)
    torch.save({"W_enc": _Evil(), "W_dec": ff.randn(D, M)}, d / "layer9.sae.pt")  # a zip checkpoint
    for name in ("layer8.sae.pt", "layer9.sae.pt"):
        refused(name, name.replace(".", r"\.") + ": not a loadable tensor checkpoint")
    assert not os.path.exists("/tmp/saehook-pwned"), "a pickle payload was executed"


def test_unknown_paths_are_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(saehook.SAEFormatError, match=r"x\.bin: unknown SAE format; looked for Qwen-Scope"):
        saehook.load(tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(saehook.SAEFormatError, match=r"empty: no SAE found in this directory; looked for .*SAELens"):
        saehook.load(tmp_path / "empty")
    with pytest.raises(saehook.SAEFormatError, match="missing.pt: no such file"):
        saehook.load(tmp_path / "missing.pt")


# ---------------- SAELens ----------------
def _saelens_tensors(arch, seed=0):
    t = {"W_enc": ff.randn(D, M, seed=seed), "W_dec": ff.randn(M, D, seed=seed + 1),
         "b_enc": 0.5 * ff.randn(M, seed=seed + 2), "b_dec": ff.randn(D, seed=seed + 3)}
    if arch == "jumprelu":
        t["threshold"] = 0.5 * ff.randn(M, seed=seed + 4).abs()
    return t


@needs_proc_maps
@pytest.mark.parametrize("style", ["v6", "pre6"])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_matches_its_definition(tmp_path, arch, style):
    t = _saelens_tensors(arch)
    ff.write_saelens(tmp_path / "sae", t, arch, style=style)
    sae = saehook.load(tmp_path / "sae")
    k = 6 if arch == "topk" else M  # relu/jumprelu: default cap min(d_sae, 256)
    assert (sae.k, sae.layer, sae.hook_point, sae.metadata["model"]) == (k, 5, "blocks.5.hook_resid_post", "tiny-model")
    assert sae.subtract_b_dec and sae.dec_layout == "rows"
    assert sae.activation == {"standard": "relu", "topk": "topk_relu", "jumprelu": "jumprelu"}[arch]
    x = _x(16)
    hidden_pre, acts, sae_out = ff.saelens_forward(x, t, arch, k)
    vals, idx = sae.encode(x)
    thr = np.maximum(t["threshold"].numpy(), 0) if arch == "jumprelu" else 0.0
    ff.check_selection(vals, idx, hidden_pre, k, threshold=thr)
    recon = sae.reconstruct(x).numpy()
    np.testing.assert_allclose(recon, ff.decode_rows(vals, idx, t["W_dec"], t["b_dec"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recon, sae_out.numpy(), rtol=1e-4, atol=1e-4)
    # W_dec (d_sae, d_in) is used in place; W_enc (d_in, d_sae) needed its one transposed copy.
    assert _same_file(ff.mapped_file(sae.arrays()["W_dec"]), tmp_path / "sae" / "sae_weights.safetensors")
    assert ff.mapped_file(sae.arrays()["W_enc"]) is None


def test_saelens_without_b_dec_on_the_input(tmp_path):
    t = _saelens_tensors("standard")
    ff.write_saelens(tmp_path / "s", t, "standard", apply_b_dec_to_input=False)
    sae = saehook.load(tmp_path / "s", k=8)
    assert not sae.subtract_b_dec and sae.k == 8
    x = _x(16)
    hidden_pre, _, _ = ff.saelens_forward(x, t, "standard", apply_b_dec_to_input=False)
    vals, idx = sae.encode(x)
    ff.check_selection(vals, idx, hidden_pre, 8, threshold=0.0)


@needs_proc_maps
def test_saelens_rescale_acts_by_decoder_norm(tmp_path):
    t = _saelens_tensors("topk")
    t["W_dec"] *= 0.2 + 2 * torch.rand(M, 1, generator=torch.Generator().manual_seed(5))  # uneven norms
    ff.write_saelens(tmp_path / "r", t, "topk", rescale_acts_by_decoder_norm=True)
    sae = saehook.load(tmp_path / "r")
    x = _x(16)
    hidden_pre, _, sae_out = ff.saelens_forward(x, t, "topk", 6, rescale=True)
    vals, idx = sae.encode(x)  # the values SAELens's encode returns: pre * |d_f|
    ff.check_selection(vals, idx, hidden_pre, 6, threshold=0.0)
    np.testing.assert_allclose(sae.reconstruct(x).numpy(), sae_out.numpy(), rtol=1e-4, atol=1e-4)
    # A folded inference save (unit decoder norms) needs no fold: W_dec stays mapped.
    t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=-1, keepdim=True)
    ff.write_saelens(tmp_path / "f", t, "topk", rescale_acts_by_decoder_norm=True)
    sae = saehook.load(tmp_path / "f")
    assert _same_file(ff.mapped_file(sae.arrays()["W_dec"]), tmp_path / "f" / "sae_weights.safetensors")
    hidden_pre, _, sae_out = ff.saelens_forward(x, t, "topk", 6, rescale=True)
    np.testing.assert_allclose(sae.reconstruct(x).numpy(), sae_out.numpy(), rtol=1e-4, atol=1e-4)


def test_saelens_release_folders_are_a_layer_set(tmp_path):
    for layer in (2, 9):
        ff.write_saelens(tmp_path / "rel" / f"blocks.{layer}.hook_resid_post", _saelens_tensors("standard", layer),
                         "standard", metadata={"hook_name": f"blocks.{layer}.hook_resid_post"})
    s = saehook.load(tmp_path / "rel")
    assert s.layers == [2, 9] and s[9].hook_point == "blocks.9.hook_resid_post"
    assert saehook.load(tmp_path / "rel", layer=2).layer == 2


@pytest.mark.parametrize("fields, message", [
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"normalize_activations": True}, "normalize_activations='expected_average_only_in'"),  # pre-6 bool
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"architecture": "transcoder"}, "architecture 'transcoder' is not supported"),
    ({"activation_fn_str": "tanh-relu"}, "activation_fn='tanh-relu' is not supported"),
    ({"d_sae": M + 1}, "cfg.json says d_sae=65 but .*sae_weights.safetensors has 64"),
])
def test_saelens_refuses_what_it_cannot_compute(tmp_path, fields, message):
    ff.write_saelens(tmp_path / "s", _saelens_tensors("standard"), "standard", **fields)
    with pytest.raises(saehook.SAEFormatError, match=message):
        saehook.load(tmp_path / "s")


def test_saelens_bad_weights(tmp_path):
    t = _saelens_tensors("jumprelu")
    del t["threshold"]
    ff.write_saelens(tmp_path / "a", t, "jumprelu")
    with pytest.raises(saehook.SAEFormatError, match=r"sae_weights\.safetensors: missing tensor\(s\) threshold"):
        saehook.load(tmp_path / "a")
    t = _saelens_tensors("standard")
    t["b_dec"] = ff.randn(D + 2)
    ff.write_saelens(tmp_path / "b", t, "standard")
    with pytest.raises(saehook.SAEFormatError, match=r"inconsistent shapes: b_dec is \(26,\), expected \(24,\)"):
        saehook.load(tmp_path / "b")
    t = _saelens_tensors("standard")
    t["scaling_factor"] = torch.full((M,), 2.0)
    ff.write_saelens(tmp_path / "c", t, "standard")
    with pytest.raises(saehook.SAEFormatError, match="scaling_factor other than 1"):
        saehook.load(tmp_path / "c")
    t["scaling_factor"] = torch.ones(M)  # all ones: SAELens drops it, so do we
    ff.write_saelens(tmp_path / "d", t, "standard")
    assert saehook.load(tmp_path / "d").activation == "relu"
    ff.write_saelens(tmp_path / "e", _saelens_tensors("standard"), "standard")
    w = tmp_path / "e" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(saehook.SAEFormatError, match=r"sae_weights\.safetensors: tensor '\w+' ends at byte .* truncated"):
        saehook.load(tmp_path / "e")


# ---------------- EleutherAI sparsify ----------------
@needs_proc_maps
def test_sparsify_matches_its_definition(tmp_path):
    coder = ff.SparseCoderLike(D, M)
    ff.write_sparsify(tmp_path / "run" / "layers.4", coder, k=7)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    sae = saehook.load(tmp_path / "run" / "layers.4")
    assert (sae.k, sae.layer, sae.hook_point, sae.metadata["model"]) == (7, 4, "layers.4", "EleutherAI/pythia-70m")
    assert sae.activation == "topk_relu" and sae.subtract_b_dec
    x = _x(16)
    raw, sae_out = ff.sparsify_forward(x, coder, 7)
    vals, idx = sae.encode(x)
    ff.check_selection(vals, idx, raw, 7, threshold=0.0)
    recon = sae.reconstruct(x).numpy()
    np.testing.assert_allclose(recon, ff.decode_rows(vals, idx, coder.W_dec.detach(), coder.b_dec.detach()),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recon, sae_out.numpy(), rtol=1e-4, atol=1e-4)
    weights = tmp_path / "run" / "layers.4" / "sae.safetensors"
    for name in ("W_enc", "W_dec"):  # encoder.weight is already feature-major: nothing copied
        assert _same_file(ff.mapped_file(sae.arrays()[name]), weights), name


@needs_proc_maps
def test_sparsify_bf16_is_used_as_stored(tmp_path):
    coder = ff.SparseCoderLike(D, M, dtype=torch.bfloat16)  # EleutherAI's releases are bf16
    ff.write_sparsify(tmp_path / "layers.1", coder, k=5)
    sae = saehook.load(tmp_path / "layers.1")
    assert sae.enc_dtype == sae.dec_dtype == "bf16"
    assert _same_file(ff.mapped_file(sae.arrays()["W_enc"]), tmp_path / "layers.1" / "sae.safetensors")
    # The same bf16 weights handed to SAE directly: identical bits, identical results.
    f32 = {n: p.detach().float().numpy() for n, p in coder.named_parameters()}
    direct = saehook.SAE(f32["encoder.weight"], f32["W_dec"], f32["encoder.bias"], f32["b_dec"], k=5,
                         activation="topk_relu", subtract_b_dec=True).to_dtype("bf16")
    x = _x().numpy()
    np.testing.assert_array_equal(sae.arrays()["W_enc"], direct.arrays()["W_enc"])
    np.testing.assert_array_equal(sae.reconstruct(x), direct.reconstruct(x))


def test_sparsify_release_and_refusals(tmp_path):
    run = tmp_path / "run"
    for layer in (1, 4):
        ff.write_sparsify(run / f"layers.{layer}", ff.SparseCoderLike(D, M, seed=layer), k=7)
    s = saehook.load(run)
    assert s.layers == [1, 4] and s[4].hook_point == "layers.4"
    ff.write_sparsify(run / "layers.4.mlp", ff.SparseCoderLike(D, M), k=7)
    with pytest.raises(saehook.SAEFormatError, match=r"several SAEs for layer 4 \(layers\.4, layers\.4\.mlp\)"):
        saehook.load(run)
    assert saehook.load(run, layer=1).layer == 1
    for i, (fields, message) in enumerate([
        ({"transcode": True}, "transcoders"), ({"skip_connection": True}, "skip connections"),
        ({"activation": "groupmax"}, "activation 'groupmax'"), ({"signed": True}, "signed SAEs"),
        ({"num_latents": 0, "expansion_factor": 4}, "implies 96 latents but .* has 64"),
    ]):
        ff.write_sparsify(tmp_path / f"bad{i}" / "layers.0", ff.SparseCoderLike(D, M), k=7, **fields)
        with pytest.raises(saehook.SAEFormatError, match=message):
            saehook.load(tmp_path / f"bad{i}" / "layers.0")


# ---------------- Gemma Scope ----------------
def _gemma_params(seed=0):
    return {"W_enc": ff.randn(D, M, seed=seed).numpy(), "W_dec": ff.randn(M, D, seed=seed + 1).numpy(),
            "b_enc": ff.randn(M, seed=seed + 2).numpy(), "b_dec": ff.randn(D, seed=seed + 3).numpy(),
            "threshold": np.abs(ff.randn(M, seed=seed + 4).numpy())}


@needs_proc_maps
@pytest.mark.parametrize("compressed", [False, True])
def test_gemmascope_jumprelu(tmp_path, compressed):
    p = _gemma_params()
    path = tmp_path / "gemma-scope-2b-pt-res" / "layer_9" / "width_16k" / "average_l0_71" / "params.npz"
    path.parent.mkdir(parents=True)
    (np.savez_compressed if compressed else np.savez)(path, **p)
    sae = saehook.load(path.parent)
    assert (sae.layer, sae.activation, sae.k, sae.metadata["average_l0"]) == (9, "jumprelu", M, 71)
    assert not sae.subtract_b_dec
    assert _same_file(ff.mapped_file(sae.arrays()["W_dec"]), path) == (not compressed)
    x = _x(16).numpy().astype(np.float64)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's JumpReLU: pre * (pre > threshold)
    acts = pre * (pre > p["threshold"])
    vals, idx = sae.encode(x.astype(np.float32))
    ff.check_selection(vals, idx, pre, M, threshold=p["threshold"])
    np.testing.assert_allclose(sae.reconstruct(x.astype(np.float32)), acts @ p["W_dec"] + p["b_dec"],
                               rtol=1e-4, atol=1e-4)


def test_gemmascope_bad_files(tmp_path):
    np.savez(tmp_path / "a.npz", W_enc=np.zeros((D, M), np.float32))
    with pytest.raises(saehook.SAEFormatError, match=r"a\.npz: missing tensor\(s\) W_dec, b_enc, b_dec, threshold"):
        saehook.load(tmp_path / "a.npz")
    p = _gemma_params()
    p["threshold"] = p["threshold"][:-1]
    np.savez(tmp_path / "b.npz", **p)
    with pytest.raises(saehook.SAEFormatError, match=r"b\.npz: inconsistent shapes: threshold is \(63,\), expected \(64,\)"):
        saehook.load(tmp_path / "b.npz")
    p = _gemma_params()
    p["threshold"][3] = -0.1
    np.savez(tmp_path / "n.npz", **p)
    with pytest.raises(saehook.SAEFormatError, match=r"n\.npz: negative JumpReLU thresholds"):
        saehook.load(tmp_path / "n.npz")
    np.savez(tmp_path / "c.npz", **_gemma_params())
    raw = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(raw[: len(raw) - 200])
    with pytest.raises(saehook.SAEFormatError, match=r"c\.npz: cannot be read as an \.npz archive"):
        saehook.load(tmp_path / "c.npz")
    p = _gemma_params()
    p["b_enc"] = np.array([_Evil()] * M, dtype=object)  # stored as a pickle: must never be unpickled
    for i, save in enumerate((np.savez, np.savez_compressed)):
        save(tmp_path / f"obj{i}.npz", **p)
        with pytest.raises(saehook.SAEFormatError, match=rf"obj{i}\.npz: .*(holds Python objects|allow_pickle=False)"):
            saehook.load(tmp_path / f"obj{i}.npz")
    assert not os.path.exists("/tmp/saehook-pwned")


# ---------------- saehook's own format ----------------
@needs_proc_maps
@pytest.mark.parametrize("dtype", [None, "f16", "bf16", "int8"])
def test_saehook_roundtrip(qwen_dir, tmp_path, dtype):
    src = saehook.load(qwen_dir / "layer3.sae.pt")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "l3.safetensors"
    src.save(out, dtype=dtype)
    assert os.listdir(tmp_path / "out") == ["l3.safetensors"]  # the temporary file was renamed
    back = saehook.load(out)
    ref = src.to_dtype(dtype) if dtype else src
    assert (back.k, back.layer, back.activation, back.dec_layout, back.hook_point) == (10, 3, "topk", "rows", "resid_post")
    assert back.metadata["model"] == "Qwen3.5-2B-Base" and back.metadata["format"] == "saehook"
    assert (back.enc_dtype, back.dec_dtype) == (ref.enc_dtype, ref.dec_dtype)
    for name in ("W_enc", "W_dec"):
        assert _same_file(ff.mapped_file(back.arrays()[name]), out), name
        # The writer starts the data on a 64-byte boundary and puts whole multiples of 64 bytes first.
        assert back.arrays()[name].ctypes.data % 64 == 0, name
    # Same weights bit for bit; Qwen-Scope's column-major decoder was stored feature-major.
    a, b = ref.arrays(), back.arrays()
    np.testing.assert_array_equal(b["W_enc"], a["W_enc"])
    np.testing.assert_array_equal(b["W_dec"], a["W_dec"].T)
    if dtype == "int8":
        np.testing.assert_array_equal(b["enc_scales"], a["enc_scales"])
    x = _x().numpy()
    v1, i1 = back.encode(x)
    v2, i2 = ref.encode(x)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_allclose(back.reconstruct(x), ref.reconstruct(x), rtol=1e-5, atol=1e-5)
    # The official safetensors library reads our file.
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "saehook" and f.metadata()["dec_layout"] == "rows"
        w = f.get_tensor("W_dec")
        assert tuple(w.shape) == (M, D)
        dense_dec = w.float().numpy()
    want = a["W_dec"].T if ref.dec_dtype != "bf16" else (a["W_dec"].T.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(dense_dec, np.asarray(want, dtype=np.float32))


def test_saehook_keeps_cols_and_metadata(tmp_path):
    t = _saelens_tensors("jumprelu")
    ff.write_saelens(tmp_path / "j", t, "jumprelu")
    src = saehook.load(tmp_path / "j", k=12)
    src.save(tmp_path / "rows.safetensors")
    back = saehook.load(tmp_path / "rows.safetensors")
    assert (back.activation, back.k, back.subtract_b_dec, back.layer) == ("jumprelu", 12, True, 5)
    assert back.hook_point == "blocks.5.hook_resid_post" and back.metadata["model"] == "tiny-model"
    np.testing.assert_array_equal(back.arrays()["threshold"], t["threshold"].numpy())
    x = _x().numpy()
    np.testing.assert_allclose(back.reconstruct(x), src.reconstruct(x), rtol=1e-5, atol=1e-5)
    cols = src.to_dtype(dec_layout="cols")
    from saehook.formats import save_saehook

    save_saehook(cols, tmp_path / "cols.safetensors", dec_layout="cols")
    back = saehook.load(tmp_path / "cols.safetensors", k=3)
    assert back.dec_layout == "cols" and back.k == 3
    np.testing.assert_array_equal(back.arrays()["W_dec"], t["W_dec"].numpy().T)


def test_saehook_save_replaces_a_file_still_in_use(qwen_dir, tmp_path):
    out = tmp_path / "s.safetensors"
    saehook.load(qwen_dir / "layer3.sae.pt").save(out)
    first = saehook.load(out)
    x = _x().numpy()
    before = first.reconstruct(x)
    saehook.load(qwen_dir / "layer7.sae.pt").save(out)  # os.replace: the old mapping stays valid
    np.testing.assert_array_equal(first.reconstruct(x), before)
    assert saehook.load(out).layer == 7


def test_int8_error_is_within_its_quantization_bound(qwen_dir):
    """int8 encoder error, worst case. Weights: symmetric per feature, |W' - W| <= s_f / 2 with
    s_f = max|W_f| / 127. Inputs (the VNNI, AMX and AVX2 paths; baseline and avx512 use x exactly): symmetric
    per 128-value block, |x' - x| <= s_b / 2 with s_b = max|x_block| / 127. So
        |pre' - pre| <= sum_j (s_f / 2 |x_j| + (|W_fj| + s_f / 2) s_b / 2)  (+ f32 rounding).
    Where the f32 top-k margin exceeds twice that bound, int8 must pick the same features and
    the reconstruction differs by at most sum over them of bound_f |d_f|."""
    src = saehook.load(qwen_dir / "layer3.sae.pt")
    q = src.to_dtype("int8")
    W = src.arrays()["W_enc"].astype(np.float64)
    s_f = np.abs(W).max(axis=1) / 127
    x = ff.randn(2000, D, seed=5).numpy()
    s_b = np.abs(x).max(axis=1, keepdims=True) / 127  # d_model = 24: one block
    bound = (s_f[None, :] / 2 * np.abs(x).sum(1, keepdims=True)
             + (np.abs(W).sum(1)[None, :] + D * s_f[None, :] / 2) * s_b / 2)
    bound += 1e-5 * np.abs(x) @ np.abs(W).T + 1e-6
    pre = x.astype(np.float64) @ W.T + src.arrays()["b_enc"]
    assert np.all(np.abs(q.preacts(x) - pre) <= bound)
    vals, idx = q.encode(x)
    order = np.sort(pre, axis=1)[:, ::-1]
    margin = order[:, 9] - order[:, 10]  # k = 10
    safe = margin > 2 * bound.max(axis=1)
    assert safe.sum() >= 40, "too few rows with a clear top-k margin for the test to mean anything"
    W_dec_rows = src.arrays()["W_dec"].T.astype(np.float64)
    ref_idx = np.argsort(-pre, axis=1)[:, :10]
    for r in np.flatnonzero(safe):
        assert set(idx[r].tolist()) == set(ref_idx[r].tolist())
        err_bound = bound[r, idx[r]] @ np.abs(W_dec_rows[idx[r]]) + 1e-4
        exact = pre[r, idx[r]] @ W_dec_rows[idx[r]]
        got = vals[r] @ W_dec_rows[idx[r]]
        assert np.all(np.abs(got - exact) <= err_bound)
    # Everywhere: what int8 picks is a top-k of the exact pre-activations up to 2 * bound.
    picked = np.take_along_axis(pre, idx.astype(np.int64), axis=1)
    assert np.all(picked.min(axis=1) >= order[:, 9] - 2 * bound.max(axis=1))


def test_saehook_bad_files(qwen_dir, tmp_path):
    good = tmp_path / "g.safetensors"
    saehook.load(qwen_dir / "layer3.sae.pt").save(good)
    contents = safetensors_io.read(str(good))
    arrays = {n: (a, safetensors_io.tag_of(contents.dtypes[n])) for n, a in contents.tensors.items()}

    def variant(name, drop=(), **meta):
        path = tmp_path / name
        safetensors_io.write(str(path), {n: v for n, v in arrays.items() if n not in drop},
                             {**contents.metadata, **meta})
        return path

    cases = [
        (variant("v.safetensors", format_version="2"), "format version '2' is not supported"),
        (variant("a.safetensors", activation="gelu"), "bad metadata activation='gelu'"),
        (variant("k.safetensors", k="ten"), "bad or missing metadata"),
        (variant("m.safetensors", drop=("W_dec",)), r"missing tensor\(s\) W_dec"),
    ]
    raw = good.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-64])
    cases.append((tmp_path / "t.safetensors", r"tensor '\w+' ends at byte .* truncated"))
    safetensors_torch.save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    cases.append((tmp_path / "w.safetensors", "without saehook metadata"))
    for path, message in cases:
        with pytest.raises(saehook.SAEFormatError, match=rf"{path.name}: .*{message}"):
            saehook.load(path)
    # A SAELens weights file loaded by itself points to its folder.
    ff.write_saelens(tmp_path / "lens", _saelens_tensors("standard"), "standard")
    with pytest.raises(saehook.SAEFormatError, match="load from their directory"):
        saehook.load(tmp_path / "lens" / "sae_weights.safetensors")


def test_load_dtype(qwen_dir):
    sae = saehook.load(qwen_dir / "layer3.sae.pt", dtype="int8")
    assert sae.enc_dtype == "int8" and sae.dec_dtype == "f32"
    s = saehook.load(qwen_dir, dtype="bf16")
    assert isinstance(s, saehook.SAESet) and all(x.enc_dtype == x.dec_dtype == "bf16" for x in s.values())


def test_cli_info_and_convert(qwen_dir, tmp_path, capsys):
    from saehook.cli import main

    assert main(["info", str(qwen_dir / "layer3.sae.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["3"]["d_sae"] == M and info["3"]["k"] == 10
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(qwen_dir / "layer3.sae.pt"), str(out), "--dtype", "int8"]) == 0
    assert saehook.load(out).enc_dtype == "int8"
    assert main(["info", str(tmp_path / "missing.pt")]) == 2


# ---------------- the safetensors reader and writer ----------------
def test_reader_reads_the_official_writers(tmp_path):
    arrays = {"f32": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
              "f16": np.arange(7, dtype=np.float16), "i8": np.arange(-8, 8, dtype=np.int8).reshape(4, 4),
              "i64": np.arange(3, dtype=np.int64), "u8": np.arange(5, dtype=np.uint8),
              "flag": np.array([True, False]), "scalar": np.array(2.5, dtype=np.float64),
              "empty": np.zeros((0, 4), dtype=np.float32)}
    safetensors_numpy.save_file(arrays, str(tmp_path / "np.safetensors"), metadata={"who": "numpy"})
    got = safetensors_io.read(str(tmp_path / "np.safetensors"))
    assert got.metadata == {"who": "numpy"} and set(got.tensors) == set(arrays)
    for name, a in arrays.items():
        assert got.tensors[name].dtype == a.dtype and got.tensors[name].shape == a.shape, name
        np.testing.assert_array_equal(got.tensors[name], a)
    t = {"bf16": torch.randn(4, 3).to(torch.bfloat16), "f32": torch.randn(2)}
    safetensors_torch.save_file(t, str(tmp_path / "pt.safetensors"))
    got = safetensors_io.read(str(tmp_path / "pt.safetensors"))
    assert got.dtypes == {"bf16": "BF16", "f32": "F32"} and got.metadata == {}
    np.testing.assert_array_equal(got.tensors["bf16"], t["bf16"].view(torch.int16).numpy().view(np.uint16))
    assert not got.tensors["f32"].flags.writeable  # a read-only view of the mapping


def test_writer_is_read_by_the_official_reader(tmp_path):
    rng = np.random.default_rng(1)
    bf16 = torch.randn(5, 3).to(torch.bfloat16)
    tensors = {"a_f16": (rng.standard_normal(3).astype(np.float16), "f16"),  # narrow first: the writer realigns
               "b_f32": (rng.standard_normal((4, 6)).astype(np.float32), "f32"),
               "c_i8": (rng.integers(-127, 128, (2, 9)).astype(np.int8), "int8"),
               "d_bf16": (bf16.view(torch.int16).numpy().view(np.uint16), "bf16")}
    path = tmp_path / "ours.safetensors"
    safetensors_io.write(str(path), tensors, {"k": "10"})
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0 and (8 + n) % 64 == 0  # the data section starts on a cache line
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "10"} and set(f.keys()) == set(tensors)
        assert torch.equal(f.get_tensor("d_bf16"), bf16)
    with safe_open(str(path), framework="numpy") as f:
        for name in ("a_f16", "b_f32", "c_i8"):
            np.testing.assert_array_equal(f.get_tensor(name), tensors[name][0])
    got = safetensors_io.read(str(path))
    for name, (a, _) in tensors.items():
        assert got.tensors[name].ctypes.data % a.itemsize == 0, name  # aligned to its element size
        np.testing.assert_array_equal(got.tensors[name], a)


def test_reader_validates(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file({"a": torch.randn(3, 5), "b": torch.randn(7)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def rewrite(name, hdr=None, data=None, prefix=None):
        h = json.dumps(hdr if hdr is not None else header).encode()
        p = tmp_path / name
        p.write_bytes((prefix if prefix is not None else len(h).to_bytes(8, "little")) + h
                      + (data if data is not None else raw[8 + n:]))
        return str(p)

    def refused(p, message):
        with pytest.raises(safetensors_io.SafetensorsError, match=rf"{os.path.basename(p)}: {message}"):
            safetensors_io.read(p)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-10])
    refused(str(cut), r"tensor '\w' ends at byte \d+ of a \d+-byte data section: the file is truncated")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    refused(str(tmp_path / "tiny.safetensors"), r"truncated file \(2 bytes, no header\)")
    refused(rewrite("huge.safetensors", prefix=(1 << 40).to_bytes(8, "little")), "header length 1099511627776 does not fit")
    bad = dict(header, a=dict(header["a"], shape=[3, 6]))
    refused(rewrite("shape.safetensors", bad), r"tensor 'a' spans 60 bytes but dtype F32 and shape \[3, 6\] need 72")
    bad = dict(header, a=dict(header["a"], dtype="F8_E4M3"))
    refused(rewrite("dtype.safetensors", bad), "tensor 'a' has unsupported dtype F8_E4M3")
    bad = dict(header, a=dict(header["a"], data_offsets=[-4, 56]))
    refused(rewrite("neg.safetensors", bad), "malformed header entry for tensor 'a'")
    (tmp_path / "notjson.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{" + b"\0" * 8)
    refused(str(tmp_path / "notjson.safetensors"), "header is not valid JSON")
    refused(rewrite("meta.safetensors", dict(header, __metadata__={"k": 10})), "__metadata__ must map strings to strings")
