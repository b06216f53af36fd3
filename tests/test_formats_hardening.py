"""Issue 14, formats: files that loaded silently wrong (or hung, or blew up memory) are refused
with the file and the problem named. Where the format's reference library has an opinion it is
the oracle: safetensors' own safe_open refuses the same files, torch.load without mmap refuses
the same shortened record; fixtures are written by torch.save / np.savez / safetensors."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

import _format_fixtures as ff  # noqa: E402
import saehook  # noqa: E402
from saehook.formats import safetensors_io  # noqa: E402

D, M = 24, 64  # d_model, d_sae
needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


def _x(n=8, seed=99):
    return ff.randn(n, D, seed=seed)


def _refused(path, message, **kw):
    with pytest.raises(saehook.SAEFormatError, match=message):
        saehook.load(path, **kw)


# ---------------- the safetensors reader against safetensors' own validation ----------------
def _reference_file(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors_torch.save_file({"a": torch.randn(3, 5), "b": torch.randn(7)}, str(path), metadata={"x": "1"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8:8 + n].decode(), raw[8 + n:]


def _write(tmp_path, name, header_text, data, n=None):
    h = header_text.encode()
    path = tmp_path / name
    path.write_bytes((len(h) if n is None else n).to_bytes(8, "little") + h + data)
    return str(path)


def _library_refuses(path):
    with pytest.raises(Exception):
        with safe_open(path, framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def _we_refuse(path, message):
    with pytest.raises(safetensors_io.SafetensorsError, match=rf"{os.path.basename(path)}: .*{message}"):
        safetensors_io.read(path)


def test_safetensors_layout_errors_the_library_refuses(tmp_path):
    text, data = _reference_file(tmp_path)
    hdr = json.loads(text)
    a, b = hdr["a"], hdr["b"]
    assert text.endswith(" ")  # the reference pads its header with spaces: one byte less still parses
    cases = [
        # Header length one byte short: the JSON still parses, every tensor would load one byte early.
        (_write(tmp_path, "short.safetensors", text[:-1], text[-1:].encode() + data),
         "the tensors cover 88 of the 89 bytes after the"),
        (_write(tmp_path, "trailing.safetensors", text, data + b"\0"), "cover 88 of the 89 bytes"),
        (_write(tmp_path, "overlap.safetensors", json.dumps(dict(hdr, b=dict(b, data_offsets=[56, 84]))), data[:-4]),
         "tensor 'b' begins at data byte 56: it overlaps the tensor before it"),
        (_write(tmp_path, "gap.safetensors", json.dumps(dict(hdr, b=dict(b, data_offsets=[64, 92]))), data + b"\0" * 4),
         r"tensor 'b' begins at data byte 64: it leaves bytes 60\.\.64 unused"),
        (_write(tmp_path, "reversed.safetensors", json.dumps(dict(hdr, a=dict(a, data_offsets=[60, 0]))), data),
         "tensor 'a' spans -60 bytes"),
        (_write(tmp_path, "dupmeta.safetensors", '{"__metadata__":{"x":"2"},' + text.strip()[1:], data),
         "duplicate key '__metadata__'"),
        (_write(tmp_path, "boolshape.safetensors", json.dumps(dict(hdr, b=dict(b, shape=[True, 7]))), data),
         "malformed header entry for tensor 'b'"),
        (_write(tmp_path, "floatshape.safetensors", json.dumps(dict(hdr, b=dict(b, shape=[7.0]))), data),
         "malformed header entry for tensor 'b'"),
        (_write(tmp_path, "overflow.safetensors",
                json.dumps(dict(hdr, z={"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [88, 88]})), data),
         r"tensor 'z' spans 0 bytes but dtype F32 and shape \[4294967296, 4294967296\] need"),
    ]
    for path, message in cases:
        _library_refuses(path)
        _we_refuse(path, message)
    # Entries listed out of offset order are valid (the reference sorts them): both read it.
    reordered = _write(tmp_path, "order.safetensors", json.dumps({"b": b, "__metadata__": {"x": "1"}, "a": a}), data)
    with safe_open(reordered, framework="np") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    got = safetensors_io.read(reordered).tensors
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name], want[name])


def test_safetensors_duplicate_keys_are_refused(tmp_path):
    """Stricter than the reference, which keeps the last copy of a repeated tensor or metadata
    key: a file whose meaning depends on which copy a reader keeps is refused."""
    text, data = _reference_file(tmp_path)
    a = json.dumps(json.loads(text)["a"])
    dup_tensor = _write(tmp_path, "duptensor.safetensors", text.rstrip()[:-1] + f', "a": {a}}}', data)
    dup_meta = _write(tmp_path, "dupmetakey.safetensors", text.replace('"x":"1"', '"x":"1","x":"2"'), data)
    with safe_open(dup_meta, framework="pt") as f:
        assert f.metadata() == {"x": "2"}  # what the reference makes of it
    _we_refuse(dup_tensor, "duplicate key 'a'")
    _we_refuse(dup_meta, "duplicate key 'x'")


def test_saehook_file_with_a_short_header_length_is_refused(tmp_path):
    good = tmp_path / "g.safetensors"
    ff_sae = saehook.SAE(ff.randn(M, D).numpy(), ff.randn(M, D, seed=1).numpy(), k=4)
    ff_sae.save(good)
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n - 1:8 + n] == b" "  # padded: one byte less still parses as JSON
    bad = tmp_path / "b.safetensors"
    bad.write_bytes((n - 1).to_bytes(8, "little") + raw[8:])
    _library_refuses(str(bad))
    _refused(bad, r"b\.safetensors: the tensors cover .* the header length or the file size is wrong")


# ---------------- saehook's own format ----------------
def _saehook_variant(tmp_path, name, edit=None, **meta):
    """A saehook file written by saehook, then rewritten with the tensors `edit` returns."""
    src = tmp_path / "src.safetensors"
    if not src.exists():
        rng = np.random.default_rng(0)
        saehook.SAE(rng.standard_normal((M, D)).astype(np.float32), rng.standard_normal((M, D)).astype(np.float32),
                    rng.standard_normal(M).astype(np.float32), rng.standard_normal(D).astype(np.float32),
                    k=4, activation="topk_relu", subtract_b_dec=True).save(src)
    c = safetensors_io.read(str(src))
    tensors = {n: (np.array(a), safetensors_io.tag_of(c.dtypes[n])) for n, a in c.tensors.items()}
    if edit:
        tensors = edit(tensors)
    path = tmp_path / name
    safetensors_io.write(str(path), tensors, {**c.metadata, **meta})
    return path


def test_saehook_bias_of_the_right_count_but_wrong_shape(tmp_path):
    def square(t):
        t["b_enc"] = (t["b_enc"][0].reshape(8, 8), "f32")
        return t
    _refused(_saehook_variant(tmp_path, "sq.safetensors", square),
             r"sq\.safetensors: inconsistent shapes: b_enc is \(8, 8\), expected \(64,\)")


@pytest.mark.parametrize("old, new", [("b_enc", "b_enb"), ("b_dec", "c_dec"), ("W_dec", "W_dex")])
def test_saehook_misspelt_tensor_is_not_dropped(tmp_path, old, new):
    def rename(t):
        t[new] = t.pop(old)
        return t
    message = (rf"unexpected tensor\(s\) '{new}'" if old != "W_dec" else r"missing tensor\(s\) W_dec \(the file has")
    _refused(_saehook_variant(tmp_path, "r.safetensors", rename), message)


def test_saehook_vectors_must_be_f32_and_flags_exact(tmp_path):
    def bf16_bias(t):  # uint16 bits would have been read as the integers 16256, ...
        t["b_enc"] = ((t["b_enc"][0].view(np.uint32) >> 16).astype(np.uint16), "bf16")
        return t
    _refused(_saehook_variant(tmp_path, "h.safetensors", bf16_bias), "b_enc is BF16; saehook stores vectors as F32")
    _refused(_saehook_variant(tmp_path, "t.safetensors", subtract_b_dec="True"), "bad metadata subtract_b_dec='True'")
    assert saehook.load(_saehook_variant(tmp_path, "ok.safetensors")).subtract_b_dec


# ---------------- Qwen-Scope .pt ----------------
def _rezip(src, dst, edit):
    """Rewrites a torch.save zip record by record (Python's zipfile: torch reads it as well)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            for data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(info.filename, data)


@needs_proc_maps
def test_qwenscope_shortened_record_is_refused(tmp_path):
    sd = ff.qwen_state(D, M)
    torch.save(sd, tmp_path / "layer1.sae.pt")
    bad = tmp_path / "layer2.sae.pt"
    _rezip(tmp_path / "layer1.sae.pt", bad, lambda n, d: [d[:128] if n.endswith("data/2") else d])  # b_enc
    # The oracle: torch.load without mmap compares the record with the declared size.
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(bad, weights_only=True)
    # With mmap it does not: b_enc's second half would be W_dec's... or b_dec's bytes.
    leaked = torch.load(bad, weights_only=True, mmap=True)["b_enc"]
    assert leaked.shape == (M,) and not torch.equal(leaked, sd["b_enc"])
    _refused(bad, r"layer2\.sae\.pt: b_enc declares a 256-byte storage but its record .*data/2 holds 128 bytes", k=4)
    # The same records rewritten unchanged load (the check is on sizes, not on who wrote the zip).
    _rezip(tmp_path / "layer1.sae.pt", tmp_path / "layer3.sae.pt", lambda n, d: [d])
    torch.testing.assert_close(torch.from_numpy(saehook.load(tmp_path / "layer3.sae.pt", k=4).arrays()["b_enc"]),
                               sd["b_enc"])


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_qwenscope_duplicate_record_is_refused(tmp_path):
    torch.save(ff.qwen_state(D, M), tmp_path / "layer1.sae.pt")
    bad = tmp_path / "layer2.sae.pt"
    zeros = np.zeros(M, np.float32).tobytes()
    _rezip(tmp_path / "layer1.sae.pt", bad, lambda n, d: [d, zeros] if n.endswith("data/2") else [d])
    assert bool((torch.load(bad, weights_only=True, mmap=True)["b_enc"] == 0).all())  # torch takes the second
    _refused(bad, r"layer2\.sae\.pt: the zip archive holds two records named .*data/2; refused", k=4)


def test_qwenscope_expanded_tensor_does_not_inflate(tmp_path):
    d_model, d_sae = 1024, 16384  # a 64 MiB W_enc if materialised; the file is a few KB
    sd = {"W_enc": torch.randn(1, d_model).expand(d_sae, d_model), "W_dec": torch.randn(d_model, 1).expand(d_model, d_sae),
          "b_enc": torch.zeros(1).expand(d_sae), "b_dec": torch.zeros(d_model)}
    path = tmp_path / "layer0.sae.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 16 << 10
    tracemalloc.start()
    try:
        _refused(path, r"layer0\.sae\.pt: W_enc has shape \(16384, 1024\) with strides \(0, 1\): its elements overlap",
                 k=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB allocated before the refusal"


@pytest.mark.parametrize("fmt", ["qwen", "saelens", "sparsify", "gemma"])
def test_formats_that_always_write_biases_name_a_missing_one(tmp_path, fmt):
    """A one-byte flip in a bias name: an error naming the missing tensor (these formats'
    reference tooling always writes b_enc and b_dec). Regression guard: this held before."""
    if fmt == "qwen":
        sd = ff.qwen_state(D, M)
        sd["b_enb"] = sd.pop("b_enc")
        torch.save(sd, tmp_path / "layer0.sae.pt")
        _refused(tmp_path / "layer0.sae.pt", r"missing tensor\(s\) b_enc \(the file has: W_dec, W_enc, b_dec, b_enb\)",
                 k=4)
    elif fmt == "saelens":
        t = {"W_enc": ff.randn(D, M), "W_dec": ff.randn(M, D), "b_enc": ff.randn(M), "c_dec": ff.randn(D)}
        ff.write_saelens(tmp_path / "s", t, "standard")
        _refused(tmp_path / "s", r"sae_weights\.safetensors: missing tensor\(s\) b_dec")
    elif fmt == "sparsify":
        coder = ff.SparseCoderLike(D, M)
        ff.write_sparsify(tmp_path / "layers.0", coder, k=4)
        w = tmp_path / "layers.0" / "sae.safetensors"
        t = safetensors_torch.load_file(str(w))
        t["encoder.bias_"] = t.pop("encoder.bias")
        safetensors_torch.save_file(t, str(w))
        _refused(tmp_path / "layers.0", r"missing tensor\(s\) encoder\.bias")
    else:
        p = {"W_enc": np.zeros((D, M), np.float32), "W_dec": np.zeros((M, D), np.float32),
             "b_enc": np.zeros(M, np.float32), "b_dex": np.zeros(D, np.float32), "threshold": np.ones(M, np.float32)}
        np.savez(tmp_path / "params.npz", **p)
        _refused(tmp_path / "params.npz", r"params\.npz: missing tensor\(s\) b_dec")


# ---------------- Gemma Scope .npz ----------------
def test_npz_declared_sizes_are_checked_before_inflating(tmp_path):
    """A small params.npz whose compressed threshold declares 256 MiB: refused on its shape
    before it is decompressed."""
    path = tmp_path / "params.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        small = {"W_enc": np.zeros((D, M), np.float32), "W_dec": np.zeros((M, D), np.float32),
                 "b_enc": np.zeros(M, np.float32), "b_dec": np.zeros(D, np.float32)}
        for name, arr in small.items():
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, arr)
        n = 64 << 20  # 256 MiB of float32 zeros, streamed in so the test itself stays small
        with z.open("threshold.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
            chunk = bytes(4 << 20)
            for _ in range(n * 4 // len(chunk)):
                f.write(chunk)
    assert path.stat().st_size < 1 << 20
    np.testing.assert_array_equal(np.load(path)["b_enc"], small["b_enc"])  # numpy reads the archive
    tracemalloc.start()
    try:
        _refused(path, r"params\.npz: inconsistent shapes: threshold is \(67108864,\), expected \(64,\)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB allocated before the shape check"


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_npz_duplicate_member_is_refused(tmp_path):
    p = {"W_enc": ff.randn(D, M).numpy(), "W_dec": ff.randn(M, D).numpy(), "b_enc": ff.randn(M).numpy(),
         "b_dec": ff.randn(D).numpy(), "threshold": np.abs(ff.randn(M).numpy())}
    np.savez(tmp_path / "a.npz", **p)
    with zipfile.ZipFile(tmp_path / "a.npz") as zin, zipfile.ZipFile(tmp_path / "params.npz", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(M, np.float32))
        zout.writestr("threshold.npy", buf.getvalue())
    _refused(tmp_path / "params.npz", r"params\.npz: the zip archive holds two records named threshold\.npy")


# ---------------- SAELens / sparsify configs ----------------
def _saelens(tmp_path, name="s", **fields):
    t = {"W_enc": ff.randn(D, M), "W_dec": ff.randn(M, D), "b_enc": ff.randn(M), "b_dec": ff.randn(D)}
    arch = "topk" if "rescale_acts_by_decoder_norm" in fields or "k" in fields else "standard"
    ff.write_saelens(tmp_path / name, t, arch, **fields)
    return tmp_path / name


@pytest.mark.parametrize("key", ["apply_b_dec_to_input", "rescale_acts_by_decoder_norm"])
@pytest.mark.parametrize("value", ["false", "no", "true", "False", 0, 1])
def test_saelens_boolean_fields_are_json_booleans(tmp_path, key, value):
    folder = _saelens(tmp_path, **{key: value})
    _refused(folder, rf"cfg\.json: {key} must be true or false \(a JSON boolean\), got {value!r}")


def test_saelens_json_false_and_strict_numbers(tmp_path):
    assert not saehook.load(_saelens(tmp_path, "f", apply_b_dec_to_input=False)).subtract_b_dec
    _refused(_saelens(tmp_path, "k", k=6.5), r"cfg\.json: k must be an integer, got 6\.5")
    assert saehook.load(_saelens(tmp_path, "k2", k=6.0)).k == 6
    _refused(_saelens(tmp_path, "d", d_sae="64"), r"cfg\.json: d_sae must be an integer, got '64'")
    folder = _saelens(tmp_path, "dup")
    text = (folder / "cfg.json").read_text()
    (folder / "cfg.json").write_text(text[:-1] + ', "apply_b_dec_to_input": false}')
    _refused(folder, r"cfg\.json: cannot read the config \(duplicate key 'apply_b_dec_to_input'\)")


def test_sparsify_flags_and_numbers_as_sparsify_reads_them(tmp_path):
    """sparsify's loader (simple_parsing's from_dict) converts "false"/"no"/"0" and "7" itself:
    they mean what sparsify makes of them (before: "false" was truthy, so a plain SAE was refused
    as a transcoder). What it would not convert, or would truncate, is refused."""
    for i, value in enumerate(["false", "No", " f ", 0, False]):
        ff.write_sparsify(tmp_path / f"ok{i}" / "layers.0", ff.SparseCoderLike(D, M), k=7, transcode=value)
        assert saehook.load(tmp_path / f"ok{i}" / "layers.0").activation == "topk_relu"
    ff.write_sparsify(tmp_path / "t" / "layers.0", ff.SparseCoderLike(D, M), k=7, skip_connection="yes")
    _refused(tmp_path / "t" / "layers.0", r"skip connections \(W_skip\) are not supported")
    ff.write_sparsify(tmp_path / "k" / "layers.0", ff.SparseCoderLike(D, M), k="5")
    assert saehook.load(tmp_path / "k" / "layers.0").k == 5
    cases = [({"transcode": "nope"}, r"transcode must be true or false \(a JSON boolean\) or one of yes, true"),
             ({"signed": 2}, "signed must be true or false"), ({"k": 6.5}, r"k must be an integer, got 6\.5"),
             ({"num_latents": 64.5}, "num_latents must be an integer")]
    for i, (fields, message) in enumerate(cases):
        ff.write_sparsify(tmp_path / f"r{i}" / "layers.0", ff.SparseCoderLike(D, M), **{"k": 7, **fields})
        _refused(tmp_path / f"r{i}" / "layers.0", message)


# ---------------- not a regular file ----------------
def _load_with_watchdog(path, fifo, message):
    """saehook.load(path) must refuse at once. Should it block opening the FIFO, a writer that
    opens and closes it every 50 ms after 5 s releases each blocked open (the reader sees an
    empty file), so the test fails instead of hanging."""
    done = threading.Event()

    def release():
        if done.wait(5):
            return
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader waits
            except OSError:
                pass
            done.wait(0.05)
    t = threading.Thread(target=release, daemon=True)
    t.start()
    try:
        _refused(path, message)
    finally:
        done.set()
        t.join()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("layout", ["layer3.sae.pt", "x.safetensors", "params.npz", "saelens/cfg.json",
                                    "saelens/sae_weights.safetensors", "run/config.json"])
def test_fifo_is_refused_at_once(tmp_path, layout):
    if layout.startswith("saelens/"):
        folder = _saelens(tmp_path, "saelens")
        os.remove(tmp_path / layout)
        os.mkfifo(tmp_path / layout)
        target = folder
    elif layout == "run/config.json":  # sparsify's optional run config next to the hook folders
        ff.write_sparsify(tmp_path / "run" / "layers.0", ff.SparseCoderLike(D, M), k=7)
        os.mkfifo(tmp_path / layout)
        target = tmp_path / "run" / "layers.0"
    else:
        os.mkfifo(tmp_path / layout)
        target = tmp_path / layout
    _load_with_watchdog(target, tmp_path / layout, rf"{os.path.basename(layout).replace('.', '[.]')}: not a regular file \(a FIFO\)")


# ---------------- NaN / Inf ----------------
def _poison(arr, bits=None, value=np.nan, at=5):
    """A copy of arr with one NaN/Inf (as `value`, or as raw 16-bit `bits` for bf16/f16)."""
    out = np.array(arr)
    flat = out.reshape(-1)
    if bits is not None:
        flat.view(np.uint16)[at] = bits
    else:
        flat[at] = value
    return out


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "b_dec"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_qwenscope_non_finite(tmp_path, name, value):
    sd = ff.qwen_state(D, M)
    sd[name] = torch.from_numpy(_poison(sd[name].numpy(), value=value))
    torch.save(sd, tmp_path / "layer0.sae.pt")
    _refused(tmp_path / "layer0.sae.pt", rf"layer0\.sae\.pt: {name} holds a non-finite value \({value}", k=4)
    assert saehook.load(tmp_path / "layer0.sae.pt", k=4, check_finite=False).d_sae == M


@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
def test_saelens_and_gemma_non_finite(tmp_path, name):
    t = {"W_enc": ff.randn(D, M), "W_dec": ff.randn(M, D), "b_enc": ff.randn(M), "b_dec": ff.randn(D),
         "threshold": ff.randn(M).abs()}
    t[name] = torch.from_numpy(_poison(t[name].numpy()))
    ff.write_saelens(tmp_path / "s", t, "jumprelu")
    _refused(tmp_path / "s", rf"s: {name} holds a non-finite value \(nan")
    np.savez(tmp_path / "params.npz", **{n: v.numpy() for n, v in t.items()})
    _refused(tmp_path / "params.npz", rf"params\.npz: {name} holds a non-finite value \(nan")


@pytest.mark.parametrize("bits, shown", [(0x7FC0, "nan"), (0x7F80, "inf"), (0xFF80, "-inf")])
@pytest.mark.parametrize("name", ["encoder.weight", "W_dec", "encoder.bias", "b_dec"])
def test_sparsify_bf16_non_finite_on_raw_bits(tmp_path, name, bits, shown):
    coder = ff.SparseCoderLike(D, M, dtype=torch.bfloat16)
    with torch.no_grad():
        dict(coder.named_parameters())[name].view(-1).view(torch.int16)[3] = torch.tensor(bits, dtype=torch.int32).to(torch.int16)
    assert not torch.isfinite(dict(coder.named_parameters())[name]).all()  # torch agrees it is not finite
    ff.write_sparsify(tmp_path / "layers.0", coder, k=4)
    ours = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}.get(name, name)
    _refused(tmp_path / "layers.0", rf"layers\.0: {ours} holds a non-finite value \({shown} at")


@pytest.mark.parametrize("dtype, bits", [("f16", 0x7C00), ("f16", 0x7E00), ("bf16", 0x7FC1), ("bf16", 0x7F80)])
@pytest.mark.parametrize("name", ["W_enc", "W_dec"])
def test_saehook_half_precision_non_finite(tmp_path, dtype, bits, name):
    src = saehook.SAE(ff.randn(M, D).numpy(), ff.randn(M, D, seed=1).numpy(), k=4)
    src.save(tmp_path / "h.safetensors", dtype=dtype)
    c = safetensors_io.read(str(tmp_path / "h.safetensors"))
    tensors = {n: (np.array(a), safetensors_io.tag_of(c.dtypes[n])) for n, a in c.tensors.items()}
    tensors[name] = (_poison(tensors[name][0], bits=bits, at=D * 3 + 2), tensors[name][1])
    safetensors_io.write(str(tmp_path / "p.safetensors"), tensors, c.metadata)
    _refused(tmp_path / "p.safetensors", rf"p\.safetensors: {name} holds a non-finite value \(.* at feature 3, "
                                         rf"dimension 2\)")


def test_int8_scales_non_finite(tmp_path):
    src = saehook.SAE(ff.randn(M, D).numpy(), ff.randn(M, D, seed=1).numpy(), k=4)
    src.save(tmp_path / "q.safetensors", dtype="int8")
    c = safetensors_io.read(str(tmp_path / "q.safetensors"))
    tensors = {n: (np.array(a), safetensors_io.tag_of(c.dtypes[n])) for n, a in c.tensors.items()}
    tensors["enc_scales"] = (_poison(tensors["enc_scales"][0], value=np.inf, at=7), "f32")
    safetensors_io.write(str(tmp_path / "p.safetensors"), tensors, c.metadata)
    _refused(tmp_path / "p.safetensors", r"enc_scales holds a non-finite value \(inf at index 7\)")


def test_half_precision_bit_check_matches_numpy_and_torch_on_every_pattern():
    from saehook.formats._finite import first_non_finite

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f16_bad = ~np.isfinite(every.view(np.float16))
    bf16_bad = ~torch.isfinite(torch.from_numpy(every.view(np.int16)).view(torch.bfloat16)).numpy()
    for tag, bad in (("f16", f16_bad), ("bf16", bf16_bad)):
        for i in range(0, 1 << 16, 97):  # one non-finite or finite pattern inside finite zeros
            arr = np.zeros(3000, np.uint16)
            arr[2999 - i % 3000] = every[i]
            assert (first_non_finite(arr, tag) is not None) == bad[i], (tag, hex(i))
        assert first_non_finite(every, tag) == int(np.flatnonzero(bad)[0])


def test_finite_check_is_chunked(tmp_path):
    """Checking a mapped 64 MiB f32 SAE allocates no full-size temporary."""
    d_model, d_sae = 1024, 8192
    rng = np.random.default_rng(0)
    sae = saehook.SAE(rng.standard_normal((d_sae, d_model), dtype=np.float32),
                      rng.standard_normal((d_sae, d_model), dtype=np.float32), k=8)
    sae.save(tmp_path / "big.safetensors")
    sae.save(tmp_path / "big16.safetensors", dtype="bf16")
    del sae
    for name in ("big.safetensors", "big16.safetensors"):
        tracemalloc.start()
        try:
            loaded = saehook.load(tmp_path / name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert loaded.metadata["mapped"] and peak < 4 << 20, f"{name}: {peak / 2**20:.1f} MiB"


# ---------------- memory mapping: info and the truncation hazard ----------------
@needs_proc_maps
def test_cli_info_says_what_is_mapped(tmp_path, capsys):
    from saehook.cli import main

    saehook.SAE(ff.randn(M, D).numpy(), ff.randn(M, D, seed=1).numpy(), ff.randn(M).numpy(), k=4).save(
        tmp_path / "m.safetensors")
    assert main(["info", str(tmp_path / "m.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["None"]
    assert info["mapped"] == ["W_enc", "W_dec", "b_enc"]
    assert os.path.samefile(info["mapped_from"], tmp_path / "m.safetensors")
    ff.write_saelens(tmp_path / "lens", {"W_enc": ff.randn(D, M), "W_dec": ff.randn(M, D), "b_enc": ff.randn(M),
                                         "b_dec": ff.randn(D)}, "standard")
    assert main(["info", str(tmp_path / "lens"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["5"]["mapped"] == ["W_dec"]  # W_enc is the transposed copy
    np.savez_compressed(tmp_path / "params.npz", W_enc=ff.randn(D, M).numpy(), W_dec=ff.randn(M, D).numpy(),
                        b_enc=ff.randn(M).numpy(), b_dec=ff.randn(D).numpy(), threshold=np.ones(M, np.float32))
    assert main(["info", str(tmp_path / "params.npz")]) == 0
    out = capsys.readouterr().out
    assert "mapped: no (weights in memory)" in out
    assert saehook.load(tmp_path / "params.npz").metadata["mapped"] is False
    assert saehook.load(tmp_path / "m.safetensors").metadata["mapped"] is True


@needs_proc_maps
def test_truncating_a_mapped_file_is_sigbus_as_documented(tmp_path):
    """README "Memory": a file truncated by another process while mapped ends the process on
    the next read (SIGBUS, as with any mmap, safetensors' included)."""
    path = tmp_path / "t.safetensors"
    saehook.SAE(ff.randn(4096, D).numpy(), ff.randn(4096, D, seed=1).numpy(), k=4).save(path)
    code = ("import numpy as np, os, saehook, sys\n"
            f"s = saehook.load({str(path)!r})\n"
            "assert s.metadata['mapped']\n"
            f"os.truncate({str(path)!r}, 4096)\n"
            f"s.encode(np.ones((1, {D}), np.float32))\n"
            "print('survived')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])


# ---------------- writing ----------------
def test_convert_into_a_missing_folder_names_the_folder(tmp_path, capsys):
    from saehook.cli import main

    saehook.SAE(ff.randn(M, D).numpy(), ff.randn(M, D, seed=1).numpy(), k=4).save(tmp_path / "a.safetensors")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "nope" / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"the folder {tmp_path / 'nope'} does not exist" in err and ".tmp" not in err
    with pytest.raises(FileNotFoundError, match=r"the folder .*nope does not exist"):
        saehook.load(tmp_path / "a.safetensors").save(tmp_path / "nope" / "c.safetensors")
