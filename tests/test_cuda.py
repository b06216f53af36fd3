"""The CUDA kernels against the CPU kernels and the float64 reference: every kernel, every weight
dtype and activation, both decoder layouts, odd shapes (d_model not a multiple of 16, k = 1,
k = d_sae, batch 1 and large), both GEMM paths (cuBLAS and saehook's own), errors and streams.

Runs where torch sees a CUDA device and saehook was built with CUDA; skips with the reason
otherwise (CI has nvcc but no GPU: there, tests/test_cuda_host.py checks the selection logic on
the CPU and the build compiles every kernel).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import saehook
from saehook import _core

if not _core.cuda_available():
    pytest.skip("saehook was built without CUDA kernels (no CUDA toolkit at build time, or SAEHOOK_CUDA=OFF)",
                allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: torch.cuda.is_available() is False", allow_module_level=True)

import saehook.cuda as sc  # noqa: E402

import reference as ref  # noqa: E402
from conftest import make_sae  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
ACTIVATIONS = ["topk", "topk_relu", "relu", "jumprelu"]
ENC = ["f32", "f16", "bf16", "int8"]
TOL = 2e-4
# Which GEMM a call uses (csrc/cuda/plan.cuh, choose_gemm): up to SKINNY_ROWS rows saehook's f32
# kernel; 16-bit/int8 weights with rows of whole 16-byte loads the tensor-core kernel (operand
# split in hi + lo halves: near-f32) up to MMA_ROWS (16-bit) or MMA_ROWS_I8 rows; else cuBLAS.
SKINNY_ROWS = 8
MMA_ROWS, MMA_ROWS_I8 = 16, 64


@pytest.fixture(params=["auto", "own"])
def gemm(request, monkeypatch):
    """'auto': cuBLAS where it loads; 'own': SAEHOOK_CUBLAS=0, saehook's own GEMM kernels."""
    if request.param == "own":
        monkeypatch.setenv("SAEHOOK_CUBLAS", "0")
    else:
        monkeypatch.delenv("SAEHOOK_CUBLAS", raising=False)
    return request.param


def uses_mma(sae, n_rows: int) -> bool:
    per_load = {"f16": 8, "bf16": 8, "int8": 16}.get(sae.enc_dtype)
    return (per_load is not None and sae.d_model % per_load == 0
            and n_rows <= (MMA_ROWS_I8 if sae.enc_dtype == "int8" else MMA_ROWS))


def uses_cublas(sae, n_rows: int) -> bool:
    import os

    return (n_rows > SKINNY_ROWS and not uses_mma(sae, n_rows) and os.environ.get("SAEHOOK_CUBLAS") != "0"
            and sc.describe(DEV).startswith("gemm=cublas"))


def gpu_operand(sae, x: np.ndarray) -> np.ndarray:
    """The rows as the CUDA GEMM multiplies them (float64): exact float32 for the own kernels,
    rounded to the weights' 16-bit type (after a power-of-two row scale) for cuBLAS."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, sae.d_model)
    if sae.subtract_b_dec:
        x = x - sae.arrays()["b_dec"]
    if not uses_cublas(sae, x.shape[0]) or sae.enc_dtype == "f32":
        return x.astype(np.float64)
    amax = np.abs(x).max(axis=1, keepdims=True)
    _, e = np.frexp(amax)
    s = np.where(amax > 0, np.ldexp(np.float32(1), e), 1).astype(np.float32)
    y = x / s
    if sae.enc_dtype == "bf16":
        y = ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(y))
    else:  # f16, and int8 weights through f16
        y = y.astype(np.float16).astype(np.float32)
    return y.astype(np.float64) * s


def ref_act(sae, x):
    W_enc, _ = ref.sae_dense(sae)
    pre = gpu_operand(sae, x) @ W_enc.T
    b = sae.arrays()["b_enc"]
    if b is not None:
        pre = pre + b
    return ref.activate(sae, pre)


def cuda_x(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(DEV)


def host_sae(d_model, d_sae, k, enc="f32", dec=None, **kw):
    sae = make_sae(d_model, d_sae, k, seed=d_model + d_sae, **kw)
    if enc == "f32" and dec in (None, "f32"):
        return sae
    return sae.to_dtype(enc, dec_dtype=dec)


SHAPES = [
    # d_model, d_sae, k, n
    (37, 301, 7, 5),      # d_model not a multiple of 16 (scalar loads), skinny GEMM
    (64, 256, 1, 1),      # k = 1, batch 1
    (24, 40, 40, 3),      # k = d_sae
    (48, 1000, 16, 300),  # large batch: cuBLAS / tiled GEMM
    (20, 9000, 64, 9),    # several selection segments, just past the skinny limit
    (16, 5000, 4100, 2),  # k beyond the shared-memory sort: the global-memory sort
    (40, 500, 8, 12),     # tensor cores, 2 n-tiles, a partial last chunk (16-bit); int8: d % 16 != 0
    (32, 700, 10, 20),    # int8: tensor cores, 4 n-tiles; a partial feature block
    (64, 3000, 20, 50),   # int8: tensor cores in chunks of 32 rows; 16-bit: cuBLAS
]


@pytest.mark.parametrize("enc", ENC)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_matches_reference(gemm, enc, activation):
    for d_model, d_sae, k, n in SHAPES:
        sae = host_sae(d_model, d_sae, k, enc, activation=activation)
        gpu = sc.to_device(sae, DEV)
        x = np.random.default_rng(n).standard_normal((n, d_model)).astype(np.float32)
        vals, idx = gpu.encode(cuda_x(x))
        assert vals.shape == (n, k) and vals.device == DEV and idx.dtype == torch.int32
        ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(sae, x), k, TOL)


@pytest.mark.parametrize("enc", ENC)
def test_encode_agrees_with_cpu_kernels(enc):
    sae = host_sae(64, 2048, 32, enc, activation="topk_relu")
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(3).standard_normal((100, 64)).astype(np.float32)
    for rows in (1, 8, 20, 40, 100):  # skinny or tensor-core GEMM, then cuBLAS (16-bit operand) or tiled
        cv, ci = sae.encode(x[:rows])
        gv, gi = (t.cpu().numpy() for t in gpu.encode(cuda_x(x[:rows])))
        same = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(ci.tolist(), gi.tolist())])
        # The CPU's bf16/int8 paths round or quantize the rows too (avx512_vnni), differently.
        exact = enc in ("f32", "f16") and not uses_cublas(sae, rows)
        assert same >= (0.999 if exact else 0.9), (rows, same)
        match = ci == gi
        scale = np.abs(cv).max()
        np.testing.assert_allclose(gv[match], cv[match], rtol=1e-4 if exact else 0, atol=1e-4 if exact else 0.05 * scale)


def test_encode_subtract_b_dec_and_caller_k(gemm):
    sae = make_sae(40, 200, 10, activation="topk_relu", subtract_b_dec=True)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(1).standard_normal((12, 40)).astype(np.float32)
    for k in (1, 3, 10, 50, 200):
        vals, idx = gpu.encode(cuda_x(x), k=k)
        ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(sae, x), k, TOL)


def test_ties_prefer_lower_index_and_padding():
    W = np.zeros((64, 8), np.float32)
    W[[5, 17, 40], 0] = 1.0  # three features tie
    gpu = sc.to_device(saehook.SAE(W, W.copy(), k=3), DEV)
    vals, idx = gpu.encode(cuda_x(np.eye(8, dtype=np.float32)[:2] * 2))
    assert idx.tolist()[0] == [5, 17, 40]
    # row 1 has all zero pre-activations: topk keeps the lowest indices
    assert idx.tolist()[1] == [0, 1, 2] and vals[1].abs().max().item() == 0
    relu = sc.to_device(saehook.SAE(W, W.copy(), k=4, activation="relu"), DEV)
    vals, idx = relu.encode(cuda_x(np.eye(8, dtype=np.float32)[:2] * 2))
    assert idx.tolist() == [[5, 17, 40, -1], [-1, -1, -1, -1]]
    assert vals.tolist()[0] == [2.0, 2.0, 2.0, 0.0]


def test_many_row_chunks():
    # Past the rows of one chunk (8192, or fewer for a large k): several chunks per call.
    sae = make_sae(16, 100, 4)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(2).standard_normal((8200, 16)).astype(np.float32)
    vals, idx = gpu.encode(cuda_x(x))
    ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(sae, x), 4, TOL)
    big_k = make_sae(16, 5000, 4100, activation="relu")
    g2 = sc.to_device(big_k, DEV)
    x2 = np.random.default_rng(4).standard_normal((600, 16)).astype(np.float32)
    vals, idx = g2.encode(cuda_x(x2))
    ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(big_k, x2), 4100, TOL)


@pytest.mark.parametrize("n", [1, 20])
def test_widest_dictionary(n):
    sae = make_sae(16, 131072, 100)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(9).standard_normal((n, 16)).astype(np.float32)
    vals, idx = gpu.encode(cuda_x(x))
    ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(sae, x), 100, TOL)


@pytest.mark.parametrize("enc", ENC)
def test_preacts(gemm, enc):
    sae = host_sae(37, 301, 7, enc)
    gpu = sc.to_device(sae, DEV)
    for n in (3, 30):
        x = np.random.default_rng(n).standard_normal((n, 37)).astype(np.float32)
        got = gpu.preacts(cuda_x(x)).cpu().numpy()
        W_enc, _ = ref.sae_dense(sae)
        want = gpu_operand(sae, x) @ W_enc.T + sae.arrays()["b_enc"]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("enc", ["f32", "bf16", "int8"])
def test_preacts_in_tiles_and_chunks(gemm, enc):
    # 2100 rows x 9000 features: two row chunks (2048 rows), three feature tiles (4096) per chunk,
    # every tile through the P scratch and the epilogue into its place in the output.
    sae = host_sae(16, 9000, 8, enc)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(21).standard_normal((2100, 16)).astype(np.float32)
    got = gpu.preacts(cuda_x(x)).cpu().numpy()
    W_enc, _ = ref.sae_dense(sae)
    want = gpu_operand(sae, x) @ W_enc.T + sae.arrays()["b_enc"]
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("enc", ["f32", "bf16", "int8"])
def test_preacts_failed_call_leaves_the_output_untouched(gemm, enc):
    # The GEMM writes a scratch tile, never the output: cuBLAS cannot skip its work once the
    # input check found a NaN (it used to write the product of an unprepared operand there).
    sae = host_sae(37, 301, 7, enc)
    gpu = sc.to_device(sae, DEV)
    for n in (3, 30):  # saehook's skinny GEMM; cuBLAS ('auto') or the tiled kernel ('own')
        x = np.random.default_rng(n).standard_normal((n, 37)).astype(np.float32)
        x[n - 1, 5] = np.nan
        xt = cuda_x(x)
        out = torch.full((n, 301), 7.0, device=DEV)
        with pytest.raises(ValueError, match=f"input contains NaN at row {n - 1}, column 5"):
            _core.preacts(gpu._handle, xt.data_ptr(), n, 37, out.data_ptr(), 0,
                          torch.cuda.current_stream(DEV).cuda_stream)
        assert bool((out == 7.0).all())


def test_final_select_beyond_48k_of_shared_memory_from_several_threads():
    # d_sae = 4096 is one selection segment, so a row's pool is k keys, staged in shared memory
    # next to the sort buffer: k = 1000 needs 16 KiB, k = 3000 56 KiB and k = 4096 64 KiB (over
    # the default 48 KiB: the kernel's limit is raised). The limit is one per kernel for the
    # whole process; calls from several threads (the GIL is released) must not lower it under
    # one another's launches (each used to set it to its own size).
    import threading

    sae = make_sae(32, 4096, 8)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(12).standard_normal((6, 32)).astype(np.float32)  # skinny GEMM: deterministic
    want = {}
    for k in (1000, 3000, 4096):
        vals, idx = gpu.encode(cuda_x(x), k=k)
        ref.assert_topk_matches(vals.cpu().numpy(), idx.cpu().numpy(), ref_act(sae, x), k, TOL)
        want[k] = (vals.cpu(), idx.cpu())
    errors = []

    def work(k):
        try:
            s = torch.cuda.Stream(DEV)
            with torch.cuda.stream(s):
                xt = cuda_x(x)
                for _ in range(30):
                    v, i = gpu.encode(xt, k=k)
                    s.synchronize()
                    if not (torch.equal(v.cpu(), want[k][0]) and torch.equal(i.cpu(), want[k][1])):
                        errors.append(f"k={k}: result differs")
                        return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"k={k}: {e!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in (3000, 4096, 1000, 3000, 4096)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dec", ["f32", "f16", "bf16"])
def test_decode_matches_cpu(layout, dec):
    for d_model, d_sae, k, n in [(37, 301, 7, 5), (64, 256, 1, 1), (24, 40, 40, 3), (128, 1000, 16, 300),
                                 (1030, 500, 300, 2)]:
        sae = host_sae(d_model, d_sae, k, "f32", dec, dec_layout=layout)
        gpu = sc.to_device(sae, DEV)
        rng = np.random.default_rng(k)
        vals = rng.standard_normal((n, k)).astype(np.float32)
        idx = np.stack([rng.permutation(d_sae)[:k] for _ in range(n)]).astype(np.int32)
        idx[:, k // 2:] = np.where(rng.random((n, k - k // 2)) < 0.3, -1, idx[:, k // 2:])  # padding
        got = gpu.decode(cuda_x(vals), torch.from_numpy(idx).to(DEV)).cpu().numpy()
        np.testing.assert_allclose(got, sae.decode(vals, idx), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, ref.decode(sae, vals, idx), rtol=1e-4, atol=1e-4)


def test_decode_layout_conversion_on_device():
    sae = make_sae(48, 300, 8, dec_layout="cols")
    a, b = sc.to_device(sae, DEV), sc.to_device(sae, DEV, dec_layout="rows")
    assert b.dec_layout == "rows"
    x = cuda_x(np.random.default_rng(0).standard_normal((6, 48)))
    torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("enc", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_reconstruct_is_decode_of_encode(enc, layout):
    sae = host_sae(37, 301, 7, enc, "bf16" if enc == "bf16" else None, dec_layout=layout)
    gpu = sc.to_device(sae, DEV)
    for n in (1, 5, 40):
        x = cuda_x(np.random.default_rng(n).standard_normal((n, 37)))
        want = gpu.decode(*gpu.encode(x))
        got = gpu.reconstruct(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        y = x.clone()
        assert gpu.reconstruct(y, inplace=True) is y
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def expected_steer(sae, x, steering, vals, idx):
    want = np.asarray(x, np.float64).copy()
    for r in range(want.shape[0]):
        z = dict(zip(idx[r].tolist(), vals[r].tolist()))
        for o in steering.ops:
            d = sae.decoder_direction(o.feature, o.normalize).astype(np.float64)
            zf = z.get(o.feature, 0.0)
            c = {"add": o.value, "clamp": o.value - zf, "scale": (o.value - 1) * zf, "ablate": -zf}[o.op]
            want[r] += c * d
    return want


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dec", ["f32", "bf16"])
def test_steer_matches_formulas(layout, dec):
    sae = host_sae(40, 300, 12, "f32", dec, dec_layout=layout, activation="topk_relu")
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(5).standard_normal((9, 40)).astype(np.float32)
    _, idx0 = gpu.encode(cuda_x(x))
    f_active = int(idx0[0, 0])
    st = (saehook.Steering(sae).add(3, 2.0).clamp(f_active, 0.5).scale(int(idx0[1, 1]), 3.0)
          .ablate(int(idx0[2, 0])).add(7, -1.0, normalize=True))
    h = cuda_x(x)
    _, vals, idx = gpu.steer(st, h, return_codes=True)
    vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
    np.testing.assert_allclose(h.cpu().numpy(), expected_steer(sae, x, st, vals, idx), rtol=1e-4, atol=1e-4)
    # the codes are the encode of the unsteered rows
    ev, ei = gpu.encode(cuda_x(x))
    assert (ei.cpu().numpy() == idx).all()


def test_steer_add_only_mask_and_many_items():
    sae = make_sae(33, 200, 8)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(6).standard_normal((5, 33)).astype(np.float32)
    st = saehook.Steering(sae)
    for f in range(150):  # more than one kernel batch of items (64)
        st.add(f, 0.01 * (f % 7 - 3))
    h, hc = cuda_x(x), x.copy()
    mask = np.array([1, 0, 1, 1, 0], bool)
    gpu.steer(st, h, mask=torch.from_numpy(mask).to(DEV))
    st.apply(hc, mask=mask)  # the CPU kernels
    np.testing.assert_allclose(h.cpu().numpy(), hc, rtol=1e-5, atol=1e-5)
    assert (h.cpu().numpy()[~mask] == x[~mask]).all()
    mixed = saehook.Steering(sae)
    for f in range(100):  # needs the encode, in two kernel batches
        if f % 2:
            mixed.clamp(f, 0.1)
        else:
            mixed.scale(f, 0.5)
    h = cuda_x(x)
    _, vals, idx = gpu.steer(mixed, h, return_codes=True)
    want = expected_steer(sae, x, mixed, vals.cpu().numpy(), idx.cpu().numpy())
    np.testing.assert_allclose(h.cpu().numpy(), want, rtol=1e-4, atol=1e-4)


def test_decoder_direction():
    for layout in ("rows", "cols"):
        for dec in ("f32", "f16", "bf16"):
            sae = host_sae(37, 120, 4, "f32", dec, dec_layout=layout)
            gpu = sc.to_device(sae, DEV)
            for f in (0, 77, 119):
                for norm in (False, True):
                    np.testing.assert_allclose(gpu.decoder_direction(f, norm), sae.decoder_direction(f, norm),
                                               rtol=1e-7, atol=1e-7)


def test_errors_match_cpu_and_leave_outputs_untouched():
    sae = make_sae(16, 64, 4)
    gpu = sc.to_device(sae, DEV)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[1, 3] = bad
        with pytest.raises(ValueError) as cpu_err:
            sae.encode(xb)
        with pytest.raises(ValueError) as gpu_err:
            gpu.encode(cuda_x(xb))
        assert str(gpu_err.value) == str(cpu_err.value)
        h = cuda_x(xb)
        with pytest.raises(ValueError, match="row 1, column 3"):
            gpu.reconstruct(h, inplace=True)
        with pytest.raises(ValueError, match="row 1, column 3"):
            gpu.steer(saehook.Steering(sae).clamp(2, 1.0), h)
        with pytest.raises(ValueError, match="row 1, column 3"):
            gpu.steer(saehook.Steering(sae).add(2, 1.0), h)
        np.testing.assert_array_equal(h.cpu().numpy(), xb)
    vals = np.ones((2, 4), np.float32)
    idx = np.array([[0, 1, 2, 3], [0, 64, 1, 2]], np.int32)
    with pytest.raises(IndexError) as cpu_err:
        sae.decode(vals, idx)
    with pytest.raises(IndexError) as gpu_err:
        gpu.decode(cuda_x(vals), torch.from_numpy(idx).to(DEV))
    assert str(gpu_err.value) == str(cpu_err.value)
    vals[0, 2] = np.nan
    with pytest.raises(ValueError, match="values contain NaN or Inf at row 0"):
        gpu.decode(cuda_x(vals), torch.from_numpy(idx).to(DEV))
    from saehook.steering import ITEM_DTYPE

    items = np.zeros(1, ITEM_DTYPE)
    items["feature"] = 80
    h = cuda_x(x)
    with pytest.raises(IndexError, match=r"steering feature 80 is out of range \[0, 64\)"):
        _core.steer(gpu._handle, h.data_ptr(), 3, 16, items.ctypes.data, 1, 0, 0, 0, 0, 0,
                    torch.cuda.current_stream(DEV).cuda_stream)
    with pytest.raises(ValueError, match="k = 65"):
        gpu.encode(cuda_x(x), k=65)


def test_zero_direction_cannot_be_normalised():
    W = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    Wd = W.copy()
    Wd[5] = 0
    sae = saehook.SAE(W, Wd, k=2)
    gpu = sc.to_device(sae, DEV)
    h = cuda_x(np.ones((2, 8)))
    with pytest.raises(ValueError, match="feature 5 has a zero decoder direction"):
        gpu.steer(saehook.Steering(sae).add(1, 1.0).add(5, 1.0, normalize=True), h)
    assert (h.cpu().numpy() == 1).all()


def test_async_mode_skips_the_report_but_not_the_guard(monkeypatch):
    monkeypatch.setenv("SAEHOOK_CUDA_SYNC", "0")
    sae = make_sae(16, 64, 4)
    gpu = sc.to_device(sae, DEV)
    xb = np.ones((2, 16), np.float32)
    xb[0, 0] = np.nan
    h = cuda_x(xb)
    gpu.reconstruct(h, inplace=True)  # no error raised, and nothing written
    torch.cuda.synchronize()
    np.testing.assert_array_equal(h.cpu().numpy(), xb)


def test_host_pointers_are_refused():
    W = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _core.create(4, 8, 2, 0, False, W.ctypes.data, 0, 0, 0, W.ctypes.data, 0, 0, 0, 0, False, True,
                     DEV.index)


def test_strided_rows_batch_shapes_and_other_streams():
    sae = make_sae(16, 128, 5)
    gpu = sc.to_device(sae, DEV)
    x = cuda_x(np.random.default_rng(7).standard_normal((6, 16)))
    wide = torch.zeros((6, 40), device=DEV)
    wide[:, :16] = x
    v1, i1 = gpu.encode(x)
    v2, i2 = gpu.encode(wide[:, :16])
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    v3, i3 = gpu.encode(x.reshape(2, 3, 16))
    assert v3.shape == (2, 3, 5) and torch.equal(i3.reshape(6, 5), i1)
    s = torch.cuda.Stream(DEV)
    s.wait_stream(torch.cuda.current_stream(DEV))
    with torch.cuda.stream(s):
        v4, i4 = gpu.encode(x)
        gpu.steer(saehook.Steering(sae).add(1, 1.0), wide[:, :16])
    torch.cuda.current_stream(DEV).wait_stream(s)
    assert torch.equal(i4, i1)
    torch.testing.assert_close(wide[:, :16], x + torch.from_numpy(sae.decoder_direction(1)).to(DEV))
    x16 = x.to(torch.float16)  # converted (a copy) when not changed in place
    assert gpu.encode(x16)[0].dtype == torch.float32
    with pytest.raises(TypeError):
        gpu.reconstruct(x16, inplace=True)


def test_int8_encoder_error_is_bounded():
    sae = make_sae(256, 2048, 32)
    q = sc.to_device(sae.to_dtype("int8"), DEV)
    f = sc.to_device(sae, DEV)
    x = cuda_x(np.random.default_rng(0).standard_normal((64, 256)))
    _, i32 = f.encode(x)
    _, i8 = q.encode(x)
    overlap = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(i32.tolist(), i8.tolist())])
    assert overlap >= 0.95, overlap


def test_from_tensors_uses_device_weights_in_place():
    W_enc = torch.randn(300, 48, device=DEV, dtype=torch.bfloat16)
    W_dec = torch.randn(300, 48, device=DEV, dtype=torch.bfloat16)
    gpu = sc.from_tensors(W_enc, W_dec, k=6, activation="topk_relu")
    assert gpu.W_enc.data_ptr() == W_enc.data_ptr()
    x = torch.randn(4, 48, device=DEV)
    vals, idx = gpu.encode(x)
    pre = torch.relu(x @ W_enc.float().T)
    tv, ti = torch.topk(pre, 6)
    torch.testing.assert_close(vals, tv, rtol=1e-4, atol=1e-4)


def test_cuda_graph_capture_and_replay():
    sae = make_sae(64, 4096, 16)
    gpu = sc.to_device(sae, DEV)
    x = cuda_x(np.random.default_rng(8).standard_normal((4, 64)))
    want_v, want_i = gpu.encode(x)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(DEV)
    s.wait_stream(torch.cuda.current_stream(DEV))
    with torch.cuda.stream(s):
        gpu.encode(x)  # warm-up outside capture
    torch.cuda.current_stream(DEV).wait_stream(s)
    with torch.cuda.graph(g):
        v, i = gpu.encode(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(i, want_i) and torch.equal(v, want_v)


def test_describe_and_cache():
    line = sc.describe(DEV)
    assert line.startswith("gemm=")
    sae = make_sae(16, 64, 4)
    assert sc.cached(sae, DEV) is sc.cached(sae, DEV)


def test_torch_ops_dispatch_cuda_tensors_to_the_kernels():
    import saehook.torch_ops as ops

    sae = make_sae(40, 500, 8)
    x = np.random.default_rng(11).standard_normal((6, 40)).astype(np.float32)
    v_cpu, i_cpu = sae.encode(x)
    v, i = ops.encode(sae, cuda_x(x))
    assert v.device == DEV and i.device == DEV
    np.testing.assert_array_equal(i.cpu().numpy(), i_cpu)
    np.testing.assert_allclose(v.cpu().numpy(), v_cpu, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(ops.decode(sae, v, i).cpu().numpy(), sae.decode(v_cpu, i_cpu), rtol=TOL, atol=TOL)
    st = saehook.Steering(sae).clamp(int(i_cpu[0, 0]), 3.0).add(4, 1.0)
    h = cuda_x(x)
    ops.steer_(st, h)
    np.testing.assert_allclose(h.cpu().numpy(), st.apply(x.copy()), rtol=TOL, atol=TOL)
    # The gradient of the kept values is their encoder rows, on the GPU too.
    xg = cuda_x(x).requires_grad_(True)
    vals, idx = ops.encode(sae, xg)
    vals.sum().backward()
    W_enc, _ = ref.sae_dense(sae)
    expect = np.stack([W_enc[r[r >= 0]].sum(0) for r in idx.cpu().numpy()])
    np.testing.assert_allclose(xg.grad.cpu().numpy(), expect, rtol=1e-5, atol=1e-5)


def test_transformers_hooks_run_on_the_gpu():
    from conftest import build_tiny_qwen3
    import saehook.hf as shf

    model = build_tiny_qwen3().to(DEV)
    sae = make_sae(model.config.hidden_size, 512, 16, seed=7)
    ids = torch.randint(0, 256, (2, 9), device=DEV)
    with torch.no_grad(), shf.capture(model, {1: sae}, residuals=True) as rec:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states[2].reshape(-1, sae.d_model).cpu().numpy()
    np.testing.assert_allclose(rec[1].residuals, hs, rtol=1e-6, atol=1e-6)
    v, i = sae.encode(hs)
    same = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(i.tolist(), rec[1].indices.tolist())])
    assert same >= 0.99, same  # 18 rows: cuBLAS f32, another summation order than the CPU's
    match = i == rec[1].indices
    np.testing.assert_allclose(rec[1].values[match], v[match], rtol=TOL, atol=TOL)
    assert sae in sc._CACHE  # the capture ran on the SAE's device copy
    # Steering on the GPU gives the logits of the formula injected by a plain hook.
    st = saehook.Steering(sae, layer=1).clamp(int(i[3, 0]), 6.0).add(5, 2.0)
    with torch.no_grad(), shf.steer(model, st):
        steered = model(ids).logits
    expect_h = torch.from_numpy(ref.steer(sae, hs, [(o.op, o.feature, o.value, o.normalize) for o in st.ops])
                                .astype(np.float32)).to(DEV).reshape(2, 9, -1)
    handle = shf.decoder_layers(model)[1].register_forward_hook(lambda m, a, o: (expect_h,) + tuple(o[1:])
                                                                 if isinstance(o, tuple) else expect_h)
    try:
        with torch.no_grad():
            oracle = model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(steered, oracle, rtol=1e-3, atol=1e-3)
