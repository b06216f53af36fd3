"""Every loader against fixture files written the way each format's own tooling writes them
(torch.save, safetensors, numpy.savez), checked with each format's own encode/decode written
out in torch; bad files are refused with the file named."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

import saehook  # noqa: E402
from saehook import safetensors_io  # noqa: E402

D, M = 24, 64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g)


def _x(n=5):
    return _rand(n, D, seed=99)


def _sets_close(vals, idx, ref_vals, ref_idx):
    """Same active features and values, order-insensitive for exact ties (none in random data)."""
    for r in range(vals.shape[0]):
        ours = {int(i): float(v) for i, v in zip(idx[r], vals[r]) if i >= 0 and v != 0}
        theirs = {int(i): float(v) for i, v in zip(ref_idx[r], ref_vals[r]) if v != 0}
        assert ours.keys() == theirs.keys(), f"row {r}: {sorted(ours)} vs {sorted(theirs)}"
        np.testing.assert_allclose([ours[i] for i in sorted(ours)], [theirs[i] for i in sorted(ours)], rtol=1e-4, atol=1e-5)


# ---------------- Qwen-Scope ----------------
def _qwen_state(seed=0):
    return {"W_enc": _rand(M, D, seed=seed), "W_dec": _rand(D, M, seed=seed + 1),
            "b_enc": _rand(M, seed=seed + 2), "b_dec": _rand(D, seed=seed + 3)}


@pytest.fixture
def qwen_dir(tmp_path):
    d = tmp_path / "SAE-Res-Qwen3.5-2B-Base-W32K-L0_10"
    d.mkdir()
    for layer in (3, 7):
        torch.save(_qwen_state(layer), d / f"layer{layer}.sae.pt")
    return d


def test_qwenscope_matches_model_card_definition(qwen_dir):
    sae = saehook.load(qwen_dir / "layer3.sae.pt")
    assert (sae.k, sae.layer, sae.activation, sae.dec_layout) == (10, 3, "topk", "cols")
    assert sae.metadata["model"] == "Qwen3.5-2B-Base" and sae.hook_point == "resid_post"
    sd = _qwen_state(3)
    x = _x()
    pre = x @ sd["W_enc"].T + sd["b_enc"]          # the card's demo: pre.topk(k), kept as is
    ref_vals, ref_idx = pre.topk(10)
    vals, idx = sae.encode(x)
    _sets_close(vals.numpy(), idx.numpy(), ref_vals.numpy(), ref_idx.numpy())
    acts = torch.zeros(5, M).scatter_(1, ref_idx, ref_vals)
    np.testing.assert_allclose(sae.reconstruct(x).numpy(), (acts @ sd["W_dec"].T + sd["b_dec"]).numpy(), rtol=1e-4, atol=1e-4)


def test_qwenscope_is_mmapped_not_copied(qwen_dir):
    sae = saehook.load(qwen_dir / "layer7.sae.pt")
    W = sae.arrays()["W_enc"]
    assert not W.flags.owndata  # a view of torch's mmapped storage
    keep = sae._keepalive["W_enc"]
    assert W.ctypes.data == keep.data_ptr()


def test_qwenscope_directory_is_a_layer_set(qwen_dir):
    s = saehook.load(qwen_dir)
    assert isinstance(s, saehook.SAESet) and s.layers == [3, 7] and s[7].layer == 7
    assert saehook.load(qwen_dir, layer=7).layer == 7
    with pytest.raises(saehook.SAEFormatError, match="no layer 5"):
        saehook.load(qwen_dir, layer=5)


def test_qwenscope_needs_k(tmp_path):
    torch.save(_qwen_state(), tmp_path / "layer0.sae.pt")
    with pytest.raises(saehook.SAEFormatError, match=r"layer0.sae.pt.*pass k="):
        saehook.load(tmp_path / "layer0.sae.pt")
    assert saehook.load(tmp_path / "layer0.sae.pt", k=4).k == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/saehook-pwned",))


def test_qwenscope_bad_files_are_refused(tmp_path):
    d = tmp_path / "R-L0_4"
    d.mkdir()
    good = d / "layer1.sae.pt"
    torch.save(_qwen_state(), good)
    raw = good.read_bytes()
    (d / "layer2.sae.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(saehook.SAEFormatError, match="layer2.sae.pt"):
        saehook.load(d / "layer2.sae.pt")
    st = _qwen_state()
    del st["b_dec"]
    torch.save(st, d / "layer3.sae.pt")
    with pytest.raises(saehook.SAEFormatError, match=r"layer3.sae.pt: missing tensor\(s\) b_dec"):
        saehook.load(d / "layer3.sae.pt")
    st = _qwen_state()
    st["W_dec"] = _rand(D, M + 1)
    torch.save(st, d / "layer4.sae.pt")
    with pytest.raises(saehook.SAEFormatError, match=r"layer4.sae.pt: inconsistent shapes: W_dec is \(24, 65\)"):
        saehook.load(d / "layer4.sae.pt")
    if os.path.exists("/tmp/saehook-pwned"):
        os.remove("/tmp/saehook-pwned")
    with open(d / "layer5.sae.pt", "wb") as f:
        pickle.dump({"W_enc": _Evil()}, f)
    torch.save({"W_enc": _Evil()}, d / "layer6.sae.pt")
    for name in ("layer5.sae.pt", "layer6.sae.pt"):
        with pytest.raises(saehook.SAEFormatError, match=name):
            saehook.load(d / name)
    assert not os.path.exists("/tmp/saehook-pwned"), "a pickle payload was executed"
    with pytest.raises(saehook.SAEFormatError, match="unknown SAE format"):
        (tmp_path / "x.bin").write_bytes(b"0")
        saehook.load(tmp_path / "x.bin")
    with pytest.raises(saehook.SAEFormatError, match="unknown SAE directory"):
        (tmp_path / "empty").mkdir()
        saehook.load(tmp_path / "empty")


# ---------------- SAELens ----------------
def _saelens_dir(tmp_path, arch, **cfg_extra):
    d = tmp_path / f"saelens-{arch}"
    d.mkdir()
    t = {"W_enc": _rand(D, M), "W_dec": _rand(M, D, seed=1), "b_enc": _rand(M, seed=2) * 0.5, "b_dec": _rand(D, seed=3)}
    if arch == "jumprelu":
        t["threshold"] = _rand(M, seed=4).abs() * 0.5
    safetensors_torch.save_file(t, str(d / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "hook_name": "blocks.5.hook_resid_post", "model_name": "tiny"}
    if arch == "topk":
        cfg["k"] = 6
    cfg.update(cfg_extra)
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d, t


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_matches_its_definition(tmp_path, arch):
    d, t = _saelens_dir(tmp_path, arch)
    sae = saehook.load(d, k=M if arch != "topk" else None)
    assert sae.layer == 5 and sae.hook_point == "blocks.5.hook_resid_post" and sae.subtract_b_dec
    x = _x()
    hidden_pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        acts = torch.relu(hidden_pre)
    elif arch == "jumprelu":
        acts = torch.relu(hidden_pre) * (hidden_pre > t["threshold"])
    else:  # SAELens TopK: top-k of the pre-activations, then ReLU
        v, i = hidden_pre.topk(6)
        acts = torch.zeros_like(hidden_pre).scatter_(1, i, torch.relu(v))
    ref_vals, ref_idx = acts.topk(sae.k)
    vals, idx = sae.encode(x)
    _sets_close(vals.numpy(), idx.numpy(), ref_vals.numpy(), ref_idx.numpy())
    np.testing.assert_allclose(sae.reconstruct(x).numpy(), (acts @ t["W_dec"] + t["b_dec"]).numpy(), rtol=1e-4, atol=1e-4)
    # W_dec is a view of the mapped file; W_enc had to be transposed (one copy)
    assert not sae.arrays()["W_dec"].flags.owndata


def test_saelens_refuses_what_it_cannot_reproduce(tmp_path):
    d, _ = _saelens_dir(tmp_path, "standard", normalize_activations="expected_average_only_in")
    with pytest.raises(saehook.SAEFormatError, match="normalize_activations"):
        saehook.load(d)
    d2 = tmp_path / "g"
    d2.mkdir()
    (d2 / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    safetensors_torch.save_file({"W_enc": _rand(D, M)}, str(d2 / "sae_weights.safetensors"))
    with pytest.raises(saehook.SAEFormatError, match="gated"):
        saehook.load(d2)


# ---------------- sparsify ----------------
def test_sparsify_matches_its_definition(tmp_path):
    root = tmp_path / "sparsify-release"
    d = root / "layers.4"
    d.mkdir(parents=True)
    t = {"encoder.weight": _rand(M, D), "encoder.bias": _rand(M, seed=1) * 0.1, "W_dec": _rand(M, D, seed=2),
         "b_dec": _rand(D, seed=3)}
    safetensors_torch.save_file(t, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": M,
                                            "k": 7, "multi_topk": False, "d_in": D}))
    sae = saehook.load(d)
    assert sae.k == 7 and sae.layer == 4 and sae.activation == "topk_relu" and sae.subtract_b_dec
    x = _x()
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify: ReLU, then top-k
    ref_vals, ref_idx = pre.topk(7)
    vals, idx = sae.encode(x)
    _sets_close(vals.numpy(), idx.numpy(), ref_vals.numpy(), ref_idx.numpy())
    recon = torch.zeros(5, M).scatter_(1, ref_idx, ref_vals) @ t["W_dec"] + t["b_dec"]
    np.testing.assert_allclose(sae.reconstruct(x).numpy(), recon.numpy(), rtol=1e-4, atol=1e-4)
    assert not sae.arrays()["W_enc"].flags.owndata  # encoder.weight is already feature-major: zero copy
    assert saehook.load(root).layers == [4]


# ---------------- Gemma Scope ----------------
@pytest.mark.parametrize("compressed", [False, True])
def test_gemmascope_jumprelu(tmp_path, compressed):
    p = {"W_enc": _rand(D, M).numpy(), "W_dec": _rand(M, D, seed=1).numpy(), "b_enc": _rand(M, seed=2).numpy(),
         "b_dec": _rand(D, seed=3).numpy(), "threshold": np.abs(_rand(M, seed=4).numpy())}
    path = tmp_path / "layer_9" / "params.npz"
    path.parent.mkdir()
    (np.savez_compressed if compressed else np.savez)(path, **p)
    sae = saehook.load(path.parent, k=M)
    assert sae.layer == 9 and sae.activation == "jumprelu"
    if not compressed:
        assert isinstance(sae.arrays()["W_dec"], np.memmap) or isinstance(sae.arrays()["W_dec"].base, np.memmap)
    x = _x().numpy().astype(np.float64)
    pre = x @ p["W_enc"] + p["b_enc"]                      # Gemma Scope's reference JumpReLU
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    np.testing.assert_allclose(sae.reconstruct(x.astype(np.float32)), acts @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4)


def test_gemmascope_missing_array(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D, M), np.float32))
    with pytest.raises(saehook.SAEFormatError, match=r"params.npz: missing tensor\(s\) W_dec"):
        saehook.load(tmp_path / "params.npz")


# ---------------- saehook format and the safetensors reader ----------------
@pytest.mark.parametrize("dtype", [None, "f16", "bf16", "int8"])
def test_saehook_format_roundtrip(qwen_dir, tmp_path, dtype):
    src = saehook.load(qwen_dir / "layer3.sae.pt")
    out = tmp_path / "l3.safetensors"
    src.save(out, dtype=dtype)
    back = saehook.load(out)
    assert (back.k, back.layer, back.activation, back.dec_layout) == (src.k, 3, "topk", "rows")
    assert back.metadata["model"] == "Qwen3.5-2B-Base"
    assert back.enc_dtype == (dtype or "f32")
    assert not back.arrays()["W_enc"].flags.owndata  # mmapped
    x = _x().numpy()
    ref = src.to_dtype(dtype) if dtype else src
    np.testing.assert_allclose(back.reconstruct(x), ref.reconstruct(x), rtol=1e-5, atol=1e-5)
    # The official safetensors library reads our file.
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "saehook"
        w = f.get_tensor("W_dec")
    assert tuple(w.shape) == (M, D)


def test_safetensors_reader_against_reference_writer(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randint(-100, 100, (4, 4), dtype=torch.int8)}
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(t, str(path), metadata={"hello": "world"})
    arrs, dtypes, meta = safetensors_io.read(str(path))
    assert meta == {"hello": "world"} and dtypes["b"] == "BF16"
    np.testing.assert_array_equal(arrs["a"], t["a"].numpy())
    np.testing.assert_array_equal(arrs["b"], t["b"].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(arrs["c"], t["c"].numpy())
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
        safetensors_io.read(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(safetensors_io.SafetensorsError, match="header length"):
        safetensors_io.read(str(tmp_path / "junk.safetensors"))


def test_saehook_file_without_metadata_is_refused(tmp_path):
    safetensors_torch.save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(saehook.SAEFormatError, match="without saehook metadata"):
        saehook.load(tmp_path / "w.safetensors")


def test_load_dtype_int8(qwen_dir):
    sae = saehook.load(qwen_dir / "layer3.sae.pt", dtype="int8")
    assert sae.enc_dtype == "int8" and sae.dec_dtype == "f32"
    s = saehook.load(qwen_dir, dtype="bf16")
    assert all(x.enc_dtype == "bf16" and x.dec_dtype == "bf16" for x in s.values())


def test_cli_info_and_convert(qwen_dir, tmp_path, capsys):
    from saehook.cli import main

    assert main(["info", str(qwen_dir / "layer3.sae.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["3"]["d_sae"] == M and info["3"]["k"] == 10
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(qwen_dir / "layer3.sae.pt"), str(out), "--dtype", "int8"]) == 0
    assert saehook.load(out).enc_dtype == "int8"
    assert main(["info", str(tmp_path / "missing.pt")]) == 2
