"""The bf16 prefilter of float32 encoders (csrc/core/prefilter.cpp, SAE.set_prefilter): its
encodes are the float32 encode's (same features, same values), checked against the float32
encode of the same SAE without it and against the numpy reference, on every instruction-set
path, every activation, the few-rows and many-rows kernels, near-ties that bf16 cannot tell
apart, and the cases that must fall back to the float32 encode."""
from __future__ import annotations

import numpy as np
import pytest

import saehook

import reference as ref
from conftest import make_sae

ISAS = saehook.available_isas()
ACTIVATIONS = ["topk", "topk_relu", "relu", "jumprelu"]
TOL = 2e-4
# d_model, d_sae, k, rows: batch 1, the few-rows order (3, 8 rows), the many-rows kernels (70,
# 300: several row chunks on small SAEs), widths that end inside a vector and a bf16 pair, k = d_sae.
SHAPES = [(300, 1037, 9, 1), (129, 515, 7, 3), (77, 1001, 16, 8), (64, 2000, 12, 70), (45, 203, 5, 300),
          (24, 40, 40, 3)]  # k = d_sae: every feature a candidate


@pytest.fixture(params=ISAS)
def isa(request):
    saehook.set_isa(request.param)
    yield request.param
    saehook.set_isa("auto")


def _pair(d_model, d_sae, k, activation="topk", seed=0, **kw):
    """The same float32 SAE twice: without and with the prefilter."""
    plain = make_sae(d_model, d_sae, k, activation=activation, seed=seed, **kw)
    a = plain.arrays()
    filtered = saehook.SAE(a["W_enc"], a["W_dec"], a["b_enc"], a["b_dec"], k=k, activation=activation,
                           threshold=a["threshold"], subtract_b_dec=plain.subtract_b_dec, prefilter="bf16")
    return plain, filtered


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("subtract_b_dec", [False, True])
def test_prefiltered_encode_is_the_f32_encode(isa, activation, subtract_b_dec):
    for d_model, d_sae, k, n in SHAPES:
        plain, filtered = _pair(d_model, d_sae, k, activation, seed=d_sae, subtract_b_dec=subtract_b_dec)
        x = (3 * np.random.default_rng(n).standard_normal((n, d_model))).astype(np.float32)
        before = filtered.prefilter_stats()
        v0, i0 = plain.encode(x)
        v1, i1 = filtered.encode(x)
        stats = filtered.prefilter_stats()
        assert stats["rows"] == before["rows"] + n and stats["fallbacks"] == before["fallbacks"], stats
        np.testing.assert_array_equal(i1, i0)
        if n <= 8:  # the float32 encode takes the same dot-product tiles: bit for bit
            np.testing.assert_array_equal(v1, v0)
        else:  # the many-rows kernels sum in another order
            np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
        ref.assert_topk_matches(v1, i1, ref.activate(plain, ref.preacts(plain, x)), k, TOL)


def test_prefilter_recomputes_few_features_and_holds_half_the_encoder():
    plain, filtered = _pair(256, 4096, 16, seed=1)
    assert filtered.prefilter == "bf16" and plain.prefilter is None
    assert filtered.prefilter_stats()["bytes"] == 4096 * 256 * 2 + 4096 * 12
    x = np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)
    filtered.encode(x)
    st = filtered.prefilter_stats()
    assert st["rows"] == 32 and st["fallbacks"] == 0
    # The point of it: a few times k features per row are recomputed, not d_sae.
    assert 16 * 32 <= st["recomputed"] < 0.1 * 4096 * 32, st
    filtered.set_prefilter(None)
    assert filtered.prefilter is None and filtered.prefilter_stats() == {"bytes": 0, "rows": 0, "recomputed": 0, "fallbacks": 0}
    np.testing.assert_array_equal(filtered.encode(x)[1], plain.encode(x)[1])
    filtered.set_prefilter("bf16")
    assert "prefilter='bf16'" in repr(filtered.to_dtype("f32", dec_dtype="f16"))  # carried on
    assert filtered.to_dtype("bf16").prefilter is None


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_near_ties_bf16_cannot_see_are_decided_in_float32(isa, rows):
    # Features in pairs whose rows round to the same bf16 row: the copy sees every pair tied, the
    # float32 values differ by about 1e-5 relative, and the prefilter must order them as float32
    # does. Plus exact duplicates (ties: the lower index first).
    rng = np.random.default_rng(3)
    d_model, half = 128, 600
    base = rng.standard_normal((half, d_model)).astype(np.float32) / np.sqrt(d_model)
    base = ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(base))  # exactly representable in bf16
    nudge = base * np.float32(1 + 2.0 ** -17)  # below bf16's resolution: rounds back to base
    assert (ref.f32_to_bf16_bits(nudge) == ref.f32_to_bf16_bits(base)).all()
    W = np.empty((2 * half, d_model), np.float32)
    W[0::2], W[1::2] = base, nudge
    W[-4:] = W[:4]  # exact duplicates of the first features
    plain = saehook.SAE(W, W, k=10)
    filtered = saehook.SAE(W, W, k=10, prefilter="bf16")
    x = rng.standard_normal((rows, d_model)).astype(np.float32)
    v0, i0 = plain.encode(x)
    v1, i1 = filtered.encode(x)
    np.testing.assert_array_equal(i1, i0)
    if rows <= 8:  # the same tiles: bit for bit
        np.testing.assert_array_equal(v1, v0)
    else:
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
    ref.assert_topk_matches(v1, i1, ref.activate(plain, ref.preacts(plain, x)), 10, 1e-6)
    assert filtered.prefilter_stats()["fallbacks"] == 0


def test_candidates_that_do_not_fit_fall_back_to_the_f32_encode(isa):
    # 3000 identical features (and one a little larger): every feature is a candidate, more than
    # the candidate buffers hold, so the call takes the float32 encode and says so.
    rng = np.random.default_rng(4)
    w = rng.standard_normal(64).astype(np.float32)
    W = np.tile(w, (3000, 1))
    W[1234] *= np.float32(1.001)
    filtered = saehook.SAE(W, W, k=5, prefilter="bf16")
    plain = saehook.SAE(W, W, k=5)
    x = np.abs(rng.standard_normal((2, 64))).astype(np.float32) * np.sign(w)
    v1, i1 = filtered.encode(x)
    v0, i0 = plain.encode(x)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(v1, v0)
    assert i1[0, 0] == 1234 and list(i1[0, 1:]) == [0, 1, 2, 3]
    assert filtered.prefilter_stats()["fallbacks"] == 1


def test_non_finite_values_give_the_f32_encode_errors():
    plain, filtered = _pair(64, 300, 4, seed=5)
    x = np.ones((2, 64), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN at row 1, column 3"):
        filtered.encode(x)
    big = np.full((1, 64), 3e38, np.float32)
    with pytest.raises(OverflowError) as e1:
        filtered.encode(big)
    with pytest.raises(OverflowError) as e0:
        plain.encode(big)
    assert str(e1.value) == str(e0.value)
    # A NaN weight: the float32 encode's error too.
    a = plain.arrays()
    W = a["W_enc"].copy()
    W[7, 9] = np.nan
    bad = saehook.SAE(W, a["W_dec"], k=4, prefilter="bf16")
    with pytest.raises(OverflowError, match="overflow"):
        bad.encode(np.ones((1, 64), np.float32))
    assert bad.prefilter_stats()["fallbacks"] == 1


def test_prefilter_refuses_what_it_cannot_filter():
    sae = make_sae(64, 256, 4)
    with pytest.raises(TypeError, match="this encoder is bf16 already"):
        sae.to_dtype("bf16").set_prefilter("bf16")
    with pytest.raises(TypeError, match="int8 already"):
        sae.to_dtype("int8").set_prefilter("bf16")
    with pytest.raises(ValueError, match="prefilter must be 'bf16' or None"):
        sae.set_prefilter("int4")
    with pytest.raises(ValueError, match="prefilter must be 'bf16' or None"):
        make_sae(64, 256, 4, prefilter="fp8")


@pytest.mark.parametrize("spec", ["generic", "zen4", "zen5", "spr", "generic,batch1_quarters=1", "zen4,few_rows=0"])
def test_prefilter_on_every_cpu_class(spec):
    saehook.set_cpu_class(spec)
    try:
        for n in (1, 5, 24):
            plain, filtered = _pair(200, 1500, 8, seed=n)
            x = np.random.default_rng(n).standard_normal((n, 200)).astype(np.float32)
            v0, i0 = plain.encode(x)
            v1, i1 = filtered.encode(x)
            np.testing.assert_array_equal(i1, i0)
            np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
            assert filtered.prefilter_stats()["fallbacks"] == 0
    finally:
        saehook.set_cpu_class("auto")


def test_reconstruct_and_steer_go_through_the_prefilter():
    plain, filtered = _pair(96, 700, 8, seed=6)
    x = np.random.default_rng(7).standard_normal((4, 96)).astype(np.float32)
    np.testing.assert_array_equal(filtered.reconstruct(x), plain.reconstruct(x))
    rows = filtered.prefilter_stats()["rows"]
    assert rows == 4


def test_encodes_in_other_threads_survive_the_prefilter_being_swapped():
    # saehook_sae_set_prefilter while other threads encode with the same handle: each encode
    # keeps the copy it started with, so every result stays the float32 encode's.
    import threading

    plain, filtered = _pair(128, 3000, 8, seed=8)
    x = np.random.default_rng(9).standard_normal((4, 128)).astype(np.float32)
    want = plain.encode(x)
    stop, errors = threading.Event(), []

    def work():
        while not stop.is_set():
            v, i = filtered.encode(x, threads=1)
            if not (np.array_equal(i, want[1]) and np.array_equal(v, want[0])):
                errors.append((v, i))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for j in range(30):
        filtered.set_prefilter(None if j % 2 else "bf16", threads=1)
    stop.set()
    for t in threads:
        t.join()
    assert not errors


def test_the_commands_policy_auto_bf16_off():
    """saehook.sae.apply_prefilter, behind `saehook serve --prefilter` and `saehook capture
    --prefilter`: auto takes float32 encoders on the CPU while the copies fit in a quarter of the
    available memory (and says what it left out), bf16 takes all or refuses a narrow one by name,
    off takes none."""
    from saehook.sae import AUTO_PREFILTER_MEMORY_SHARE, apply_prefilter, prefilter_bytes

    def fresh():
        a, b = make_sae(64, 300, 5, seed=1), make_sae(64, 300, 5, seed=2)
        return {"a": a, "b": b, "narrow": make_sae(64, 300, 5, seed=3).to_dtype("bf16")}

    saes = fresh()
    need = prefilter_bytes(saes["a"])
    got, note = apply_prefilter(saes, "auto", available=10 * need / AUTO_PREFILTER_MEMORY_SHARE)
    assert (got, note) == (["a", "b"], None)
    assert [s.prefilter for s in saes.values()] == ["bf16", "bf16", None]
    assert saes["a"].prefilter_stats()["bytes"] == need  # what the policy budgets is what the copy holds
    saes = fresh()
    got, note = apply_prefilter(saes, "auto", available=1.5 * need / AUTO_PREFILTER_MEMORY_SHARE)
    assert got == ["a"] and saes["b"].prefilter is None
    assert note.startswith("--prefilter auto: the bf16 prefilter on 1 of 2 float32 SAEs"), note
    saes = fresh()
    assert apply_prefilter(saes, "auto", on_cpu=False) == ([], None)
    assert apply_prefilter(saes, "off") == ([], None) and apply_prefilter(saes, None) == ([], None)
    assert all(s.prefilter is None for s in saes.values())
    with pytest.raises(ValueError, match=r"--prefilter bf16: SAE narrow has a bf16 encoder"):
        apply_prefilter(saes, "bf16", name_of=lambda n: f"SAE {n}")
    assert all(s.prefilter is None for s in saes.values())  # refused before any copy is built
    del saes["narrow"]
    assert apply_prefilter(saes, "bf16") == (["a", "b"], None)
    with pytest.raises(ValueError, match=r"--prefilter must be one of auto, bf16, off, got 'int8'"):
        apply_prefilter(saes, "int8")
