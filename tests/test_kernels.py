"""The compiled CPU kernels against the numpy reference (tests/reference.py), on every
instruction-set path this machine has, every activation and weight dtype, odd shapes."""
from __future__ import annotations

import numpy as np
import pytest

import saehook
from saehook.sae import convert_array, quantize_int8

import reference as ref
from conftest import make_sae

ISAS = saehook.available_isas()
ACTIVATIONS = ["topk", "topk_relu", "relu", "jumprelu"]
# Relative tolerance of the kernels' float32 accumulation against float64.
TOL = 2e-4


@pytest.fixture(params=ISAS)
def isa(request):
    saehook.set_isa(request.param)
    yield request.param
    saehook.set_isa("auto")


def _with_dtype(sae, enc, dec="f32"):
    return sae if (enc == "f32" and dec == "f32") else sae.to_dtype(enc, dec_dtype=dec)


SHAPES = [
    # d_model, d_sae, k, n
    (37, 301, 7, 5),      # d_model not a multiple of any vector width
    (64, 256, 1, 1),      # k = 1, batch 1
    (24, 40, 40, 3),      # k = d_sae
    (48, 1000, 16, 300),  # several row chunks and feature blocks
    (300, 500, 12, 9),    # several int8 input quantization blocks, the last one partial
]


@pytest.mark.parametrize("enc", ["f32", "f16", "bf16", "int8"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_matches_reference(isa, enc, activation):
    for d_model, d_sae, k, n in SHAPES:
        sae = _with_dtype(make_sae(d_model, d_sae, k, activation=activation, seed=d_model), enc)
        x = np.random.default_rng(n).standard_normal((n, d_model)).astype(np.float32)
        vals, idx = sae.encode(x)
        assert vals.shape == (n, k) and idx.dtype == np.int32
        pre_act = ref.activate(sae, ref.preacts(sae, x))
        ref.assert_topk_matches(vals, idx, pre_act, k, TOL)


@pytest.mark.parametrize("enc", ["f32", "bf16", "int8"])
def test_preacts_match_reference_at_tile_edges(isa, enc):
    # Row counts around the 16-row tiles and pairs of them (1, 2, 3 groups, 9 with a partial
    # one), widths that end inside a 64-byte tile row and inside an int8 quantization block,
    # feature counts that end inside a 16-feature group. bf16 from 17 rows with little padding to a
    # multiple of 16 takes the input panel (kernels_vnni_impl.hpp x_panel_tile): an odd d_model (the
    # last weight pair half past the row), feature counts off the 4-feature tiles, a last group of
    # 10 rows.
    for d_model, d_sae, n in [(37, 33, 2), (64, 100, 17), (200, 700, 40), (300, 129, 131), (40, 16, 8),
                              (37, 33, 30), (65, 101, 64), (37, 50, 250)]:
        sae = _with_dtype(make_sae(d_model, d_sae, 4, seed=n), enc)
        x = np.random.default_rng(d_sae).standard_normal((n, d_model)).astype(np.float32)
        got = sae.preacts(x)
        want = ref.preacts(sae, x)
        W_enc, _ = ref.sae_dense(sae)
        scale = np.abs(ref.kernel_operand(sae, x, isa)) @ np.abs(W_enc).T  # bound of the rounding error
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6), (d_model, d_sae, n)


def test_encode_subtract_b_dec_and_caller_k(isa):
    sae = make_sae(40, 200, 10, activation="topk_relu", subtract_b_dec=True)
    x = np.random.default_rng(1).standard_normal((7, 40)).astype(np.float32)
    for k in (3, 10, 50):
        vals, idx = sae.encode(x, k=k)
        ref.assert_topk_matches(vals, idx, ref.activate(sae, ref.preacts(sae, x)), k, TOL)


def test_relu_caps_and_pads():
    # All pre-activations negative except 2 features: relu returns 2 entries + padding.
    d, m = 8, 16
    W_enc = -np.eye(m, d, dtype=np.float32)
    W_enc[3] = np.ones(d, dtype=np.float32)
    W_enc[9] = 0.5 * np.ones(d, dtype=np.float32)
    sae = saehook.SAE(W_enc, np.zeros((m, d), np.float32), k=4, activation="relu")
    vals, idx = sae.encode(np.ones((1, d), np.float32))
    assert idx.tolist() == [[3, 9, -1, -1]]
    np.testing.assert_allclose(vals, [[8.0, 4.0, 0.0, 0.0]])


def test_topk_ties_prefer_lower_index(isa):
    d, m = 16, 64
    W_enc = np.zeros((m, d), np.float32)
    W_enc[[5, 17, 40, 41, 63]] = 1.0  # five identical features
    sae = saehook.SAE(W_enc, np.zeros((m, d), np.float32), k=3)
    vals, idx = sae.encode(np.ones((2, d), np.float32))
    assert idx.tolist() == [[5, 17, 40]] * 2
    # Negative values are kept as they are by the plain topk activation (Qwen-Scope).
    vals, idx = sae.encode(-np.ones((1, d), np.float32))
    assert (vals < 0).sum() == 0 and idx[0].tolist() == [0, 1, 2]


def test_encode_is_deterministic_across_thread_counts():
    sae = make_sae(64, 2048, 32)
    x = np.random.default_rng(3).standard_normal((33, 64)).astype(np.float32)
    a = sae.encode(x, threads=1)
    b = sae.encode(x, threads=2)
    c = sae.encode(x, threads=7)
    for other in (b, c):
        np.testing.assert_array_equal(a[0], other[0])
        np.testing.assert_array_equal(a[1], other[1])


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dec", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("d_model", [45, 981])  # 981: every register-chunk width of the gather, then scalars
def test_decode_matches_reference(isa, layout, dec, d_model):
    sae = make_sae(d_model, 130, 9, dec_layout=layout)
    sae = sae if dec == "f32" else sae.to_dtype("f32", dec_dtype=dec)
    rng = np.random.default_rng(0)
    n = 6
    idx = np.stack([rng.choice(130, 9, replace=False) for _ in range(n)]).astype(np.int32)
    vals = rng.standard_normal((n, 9)).astype(np.float32)
    idx[0, 4:] = -1  # padding is skipped
    out = sae.decode(vals, idx)
    np.testing.assert_allclose(out, ref.decode(sae, vals, idx), rtol=1e-5, atol=1e-5)


def test_decoder_layout_conversion():
    cols = make_sae(24, 90, 5, dec_layout="cols")
    rows = cols.to_dtype(dec_layout="rows")
    assert rows.dec_layout == "rows" and rows.arrays()["W_dec"].shape == (90, 24)
    x = np.random.default_rng(0).standard_normal((4, 24)).astype(np.float32)
    np.testing.assert_allclose(rows.reconstruct(x), cols.reconstruct(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rows.decoder_direction(7), cols.decoder_direction(7))


def test_decode_errors():
    sae = make_sae(16, 32, 4)
    with pytest.raises(IndexError, match="out of range"):
        sae.decode(np.ones((1, 2), np.float32), np.array([[0, 32]]))
    with pytest.raises(ValueError, match="NaN"):
        sae.decode(np.array([[np.nan, 1]], np.float32), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="same shape"):
        sae.decode(np.ones((1, 2), np.float32), np.array([[0, 1, 2]]))


def test_reconstruct_in_place_nan_leaves_rows_untouched():
    sae = make_sae(16, 64, 4)
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    x[299, 5] = np.nan  # in the second 256-row chunk
    h = x.copy()
    with pytest.raises(ValueError, match="row 299, column 5"):
        sae.reconstruct(h, inplace=True)
    np.testing.assert_array_equal(h, x)


def test_reconstruct_is_decode_of_encode(isa):
    sae = make_sae(40, 300, 12, dec_layout="cols")
    x = np.random.default_rng(0).standard_normal((9, 40)).astype(np.float32)
    expect = sae.decode(*sae.encode(x))
    got = sae.reconstruct(x)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    y = x.copy()
    assert sae.reconstruct(y, inplace=True) is y
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_steer_matches_formulas(isa, layout):
    sae = make_sae(32, 200, 8, dec_layout=layout)
    x = np.random.default_rng(5).standard_normal((11, 32)).astype(np.float32)
    vals, idx = sae.encode(x)
    active = int(idx[0, 0])  # a feature that fires on row 0: clamp/scale must use its z
    st = (saehook.Steering(sae, layer=3)
          .add(7, 2.5).clamp(active, 4.0).scale(int(idx[1, 1]), 3.0).ablate(int(idx[2, 0]))
          .add(11, -1.0, normalize=True))
    expect = ref.steer(sae, x, [(o.op, o.feature, o.value, o.normalize) for o in st.ops])
    h = x.copy()
    assert st.apply(h) is h
    np.testing.assert_allclose(h, expect, rtol=1e-4, atol=1e-4)


def test_steer_mask_and_add_only(isa):
    sae = make_sae(32, 64, 4)
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    h = x.copy()
    st = saehook.Steering(sae).add(3, 2.0)
    assert st.additive_only
    st.apply(h, mask=[True, False, True, False])
    d3 = sae.decoder_direction(3)
    np.testing.assert_allclose(h[[0, 2]], x[[0, 2]] + 2.0 * d3, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(h[[1, 3]], x[[1, 3]])
    np.testing.assert_allclose(st.vector(), 2.0 * d3, rtol=1e-6)


def test_steering_errors():
    sae = make_sae(16, 32, 4)
    with pytest.raises(IndexError, match="out of range"):
        saehook.Steering(sae).add(32, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        saehook.Steering(sae).clamp(1, float("nan"))
    with pytest.raises(ValueError, match="positions"):
        saehook.Steering(sae, positions="middle")
    with pytest.raises(TypeError, match="in place"):
        saehook.Steering(sae).add(1, 1.0).apply(np.zeros((2, 16), np.float64))
    with pytest.raises(ValueError, match="add-only"):
        saehook.Steering(sae).clamp(1, 0.0).vector()


def test_bad_inputs_are_refused_clearly():
    sae = make_sae(16, 32, 4)
    x = np.zeros((2, 16), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN at row 1, column 5"):
        sae.encode(x)
    x[1, 5] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        sae.encode(x)
    with pytest.raises(ValueError, match="d_model mismatch"):
        sae.encode(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="k = 33"):
        sae.encode(np.zeros((1, 16), np.float32), k=33)
    with pytest.raises(ValueError, match="W_dec has shape"):
        saehook.SAE(np.zeros((32, 16), np.float32), np.zeros((16, 32), np.float32), k=4)
    with pytest.raises(ValueError, match="between 1 and d_sae"):
        saehook.SAE(np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32), k=0)
    with pytest.raises(ValueError, match="threshold"):
        saehook.SAE(np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32), k=4, activation="jumprelu")
    with pytest.raises(ValueError, match="unknown activation"):
        saehook.SAE(np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32), k=4, activation="gelu")


def test_batch_shapes_and_strided_rows():
    sae = make_sae(16, 64, 5)
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    vals, idx = sae.encode(x)
    assert vals.shape == (2, 3, 5) and idx.shape == (2, 3, 5)
    assert sae.decode(vals, idx).shape == (2, 3, 16)
    # A view of every other row of a wider buffer is used with its row stride, not copied.
    wide = np.random.default_rng(1).standard_normal((8, 20)).astype(np.float32)
    view = wide[::2, :16]
    v1, i1 = sae.encode(view)
    v2, i2 = sae.encode(np.ascontiguousarray(view))
    np.testing.assert_array_equal(i1, i2)
    before = wide.copy()
    saehook.Steering(sae).add(1, 1.0).apply(wide[:, :16])
    np.testing.assert_allclose(wide[:, :16], before[:, :16] + sae.decoder_direction(1), rtol=1e-6)
    np.testing.assert_array_equal(wide[:, 16:], before[:, 16:])  # stride respected


def test_torch_tensors_in_torch_out():
    torch = pytest.importorskip("torch")
    sae = make_sae(32, 128, 6)
    x = torch.randn(4, 32)
    vals, idx = sae.encode(x)
    assert isinstance(vals, torch.Tensor) and vals.dtype == torch.float32 and idx.dtype == torch.int32
    v_np, i_np = sae.encode(x.numpy())
    np.testing.assert_array_equal(idx.numpy(), i_np)
    xh = sae.decode(vals, idx)
    assert isinstance(xh, torch.Tensor)
    np.testing.assert_allclose(xh.numpy(), sae.decode(v_np, i_np), rtol=1e-6)
    # bf16 input is accepted for reading (converted), steering in place needs float32
    v_b, _ = sae.encode(x.to(torch.bfloat16))
    assert v_b.shape == (4, 6)
    h = x.clone()
    saehook.Steering(sae).add(2, 1.5).apply(h)
    np.testing.assert_allclose(h.numpy(), x.numpy() + 1.5 * sae.decoder_direction(2), rtol=1e-6, atol=1e-6)


def test_torch_weights_are_borrowed_without_copy():
    torch = pytest.importorskip("torch")
    W_enc = torch.randn(64, 16)
    W_dec = torch.randn(16, 64).to(torch.bfloat16)
    sae = saehook.SAE(W_enc, W_dec, k=4, dec_layout="cols")
    a = sae.arrays()
    assert a["W_enc"].ctypes.data == W_enc.data_ptr()
    assert a["W_dec"].ctypes.data == W_dec.data_ptr() and sae.dec_dtype == "bf16"


def test_quantize_int8_matches_numpy():
    W = np.random.default_rng(0).standard_normal((50, 37)).astype(np.float32)
    q, s = quantize_int8(W, "f32")
    s_ref = np.abs(W).max(axis=1) / 127
    np.testing.assert_allclose(s, s_ref, rtol=1e-7)
    q_ref = np.clip(np.rint(W / s_ref[:, None].astype(np.float32)), -127, 127)
    assert np.abs(q.astype(np.int32) - q_ref).max() <= 1  # reciprocal vs division rounding
    assert np.abs(q * s[:, None] - W).max() <= s.max() * 0.5001 + 1e-7


def test_int8_encoder_error_is_bounded():
    # Documented: int8 keeps >= 95% of the f32 Top-K on Gaussian-ish activations.
    sae = make_sae(256, 2048, 32)
    q = sae.to_dtype("int8")
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    _, i32 = sae.encode(x)
    _, i8 = q.encode(x)
    overlap = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(i32.tolist(), i8.tolist())])
    assert overlap >= 0.95, overlap


def test_cpu_kernels_prefetch_only_through_asm():
    # GCC 12 at -O3 deleted loops of __builtin_prefetch / _mm_prefetch in the batch-1 row kernels
    # of the VNNI and AMX paths (no prefetch was left in their object code; int8 at batch 1 read
    # 0.70 of the bandwidth on a Sapphire Rapids-class VM instead of 1.0). The kernels prefetch
    # through kernels_impl.hpp's prefetch_to (asm the compiler keeps) and nowhere else.
    import pathlib
    import re

    cpu = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cpu"
    raw = {}
    for f in sorted(cpu.iterdir()):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if re.search(r"\b(__builtin_prefetch|_mm_prefetch)\s*\(", code):
                raw.setdefault(f.name, []).append(n)
    # The helper's own fallback for non-x86 targets is the only place left.
    assert set(raw) <= {"kernels_impl.hpp"} and len(raw.get("kernels_impl.hpp", [])) == 1, raw


def test_weights_saehook_makes_start_on_a_cache_line():
    # numpy puts large arrays 16 bytes past a page; saehook's conversions, quantization and
    # transposed copies (what the kernels then read) start at a multiple of 64 bytes.
    sae = make_sae(64, 4096, 8)
    buf = np.empty(4096 * 64 * 4 + 128, np.uint8)
    start = -buf.ctypes.data % 64 + 16  # the inputs 16 bytes past a cache line, as numpy often has them
    W = buf[start:start + 4096 * 64 * 4].view(np.float32).reshape(4096, 64)
    W[...] = np.random.default_rng(0).standard_normal((4096, 64))
    assert W.ctypes.data % 64 == 16
    for a in (convert_array(W, "f32", "bf16"), convert_array(W, "f32", "f16"), quantize_int8(W, "f32")[0],
              sae.to_dtype("bf16").arrays()["W_enc"], sae.to_dtype("int8").arrays()["W_enc"],
              sae.to_dtype("int8").to_dtype("bf16").arrays()["W_enc"],
              sae.to_dtype(dec_layout="cols").arrays()["W_dec"]):
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0
    np.testing.assert_array_equal(sae.to_dtype(dec_layout="cols").arrays()["W_dec"], sae.arrays()["W_dec"].T)


def test_convert_matches_numpy_rounding():
    x = np.random.default_rng(0).standard_normal(100_001).astype(np.float32) * 1000
    x[:4] = [0.0, -0.0, 1e-8, 70000.0]  # zero, subnormal-in-f16, overflow-in-f16
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    np.testing.assert_array_equal(convert_array(x, "f32", "f16"), h)
    np.testing.assert_array_equal(convert_array(x, "f32", "bf16"), ref.f32_to_bf16_bits(x))
    np.testing.assert_array_equal(convert_array(h, "f16", "f32"), h.astype(np.float32))


def test_isa_selection():
    assert "baseline" in ISAS
    with pytest.raises(RuntimeError, match="not available"):
        saehook.set_isa("neon9000")
    saehook.set_isa("baseline")
    assert saehook.get_isa() == "baseline"
    saehook.set_isa("auto")
    assert saehook.get_isa() == ISAS[0]


def test_large_dictionary_batch_one():
    # d_sae = 131072 as in the widest Qwen-Scope release (narrow d_model keeps the test quick).
    sae = make_sae(16, 131072, 100)
    x = np.random.default_rng(9).standard_normal((1, 16)).astype(np.float32)
    vals, idx = sae.encode(x)
    ref.assert_topk_matches(vals, idx, ref.activate(sae, ref.preacts(sae, x)), 100, TOL)


@pytest.mark.parametrize("n", [0, 5, 1000, (2 << 20) // 4 * 3 + 7])  # empty, tail only, one block, several
def test_read_probe_sums_what_it_reads(n):
    from saehook import _core

    a = (np.arange(n, dtype=np.float32) % 13) - 6
    got = _core.read_probe(a.ctypes.data, a.nbytes, 2)
    assert got == pytest.approx(float(a.sum(dtype=np.float64)), abs=1e-3 * max(1, n) ** 0.5)


@pytest.mark.parametrize("enc", ["f32", "bf16"])
def test_non_finite_weights_stay_in_their_feature(isa, enc):
    # Kernels read whole vectors / tile rows: bytes past the end of a feature's row (the next
    # feature's weights) must never enter its dot product, even where they are Inf (0 * Inf).
    d_model, d_sae = 37, 33
    sae = _with_dtype(make_sae(d_model, d_sae, 4, seed=5), enc)
    W = sae.arrays()["W_enc"].copy()
    inf = np.float32(np.inf) if enc == "f32" else ref.f32_to_bf16_bits(np.array([np.inf], np.float32))[0]
    W[6, :] = inf  # feature 6 is all Inf; features 5 and 7 are its neighbours in memory
    a = sae.arrays()
    bad = saehook.SAE(W, a["W_dec"], a.get("b_enc"), a.get("b_dec"), k=4, enc_dtype=enc, dec_dtype=sae.dec_dtype)
    x = np.random.default_rng(0).standard_normal((20, d_model)).astype(np.float32)
    got = bad.preacts(x)
    keep = np.arange(d_sae) != 6
    assert np.all(np.isfinite(got[:, keep]))
    np.testing.assert_allclose(got[:, keep], sae.preacts(x)[:, keep], rtol=0, atol=0)
