"""Issue 14 (hardening) for the SAE object, Steering, the C core and bindings, and the torch ops:
no silent wrong answers (index conversion, in-place writes that cannot happen, Inf/NaN results
from finite input, float32 overflow of steering values, autograd through in-place steering, a
steering layer that is not the SAE's), no hangs (fork, threads), bounded scratch, no crashes
(size overflow, exit with work in flight). Crash and hang cases run in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import saehook

import reference as ref
from conftest import make_sae

HERE = os.path.dirname(os.path.abspath(__file__))
F32_MAX = float(np.finfo(np.float32).max)


def run_py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (tests/ on the path); a crash or hang fails the test only."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"subprocess hung for {timeout} s; stderr: {e.stderr!r}")


# ---- item 4: index conversion ----

BAD_NUMPY_INDICES = [
    (np.int64, 2**32 + 5, IndexError),    # would wrap to 5
    (np.int64, 2**32 - 1, IndexError),    # would wrap to -1 (padding)
    (np.int64, 2**31, IndexError),
    (np.int64, -2, IndexError),
    (np.uint64, 2**64 - 1, IndexError),   # would wrap to -1
    (np.uint32, 2**32 - 3, IndexError),   # would wrap to -3
]


@pytest.mark.parametrize("dtype,bad,exc", BAD_NUMPY_INDICES)
def test_decode_refuses_indices_that_do_not_fit(dtype, bad, exc):
    sae = make_sae(16, 64, 4)
    vals = np.ones((2, 4), np.float32)
    idx = np.array([[1, 2, 3, 4], [5, 6, 7, bad]], dtype=dtype)
    with pytest.raises(exc, match=f"feature index {bad} is out of range"):
        sae.decode(vals, idx)


def test_decode_refuses_bool_and_float_indices():
    torch = pytest.importorskip("torch")
    sae = make_sae(16, 64, 4)
    vals = np.ones((1, 4), np.float32)
    with pytest.raises(TypeError, match="bool"):
        sae.decode(vals, np.array([[True, False, True, False]]))
    with pytest.raises(TypeError, match="float"):
        sae.decode(vals, np.array([[3.7, 1, 2, 3]]))
    tv = torch.ones(1, 4)
    with pytest.raises(TypeError, match="float32"):
        sae.decode(tv, torch.tensor([[3.7, 1.0, 2.0, 3.0]]))
    with pytest.raises(TypeError, match="bool"):
        sae.decode(tv, torch.tensor([[True, False, True, False]]))
    with pytest.raises(IndexError, match="2147483653"):
        sae.decode(tv, torch.tensor([[2**31 + 5, 1, 2, 3]], dtype=torch.int64))
    import saehook.torch_ops as ops

    with pytest.raises(TypeError, match="float32"):
        ops.decode(sae, tv, torch.tensor([[3.7, 1.0, 2.0, 3.0]]))
    with pytest.raises(IndexError, match="4294967301"):
        ops.decode(sae, tv, torch.tensor([[2**32 + 5, 1, 2, 3]], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.uint64])
def test_decode_accepts_any_integer_dtype_in_range(dtype):
    sae = make_sae(16, 64, 4)
    rng = np.random.default_rng(1)
    vals = rng.standard_normal((3, 4)).astype(np.float32)
    idx = rng.integers(0, 64, (3, 4))
    got = sae.decode(vals, idx.astype(dtype))
    np.testing.assert_allclose(got, ref.decode(sae, vals, idx), rtol=1e-5, atol=1e-5)
    # -1 is the documented padding index (value ignored).
    idx[0, 1] = -1
    if np.dtype(dtype).kind == "i":
        expect = ref.decode(sae, vals, idx)
        np.testing.assert_allclose(sae.decode(vals, idx.astype(dtype)), expect, rtol=1e-5, atol=1e-5)


# ---- item 5: in-place ops on rows they cannot write ----

def _inplace_calls(sae):
    st = saehook.Steering(sae).add(1, 2.0).clamp(3, 0.5)
    return {"steer": lambda x: st.apply(x), "reconstruct": lambda x: sae.reconstruct(x, inplace=True)}


@pytest.mark.parametrize("call", ["steer", "reconstruct"])
def test_inplace_refuses_overlapping_and_misaligned_numpy_rows(call):
    sae = make_sae(16, 64, 4)
    f = _inplace_calls(sae)[call]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(10 * 16 + 16).astype(np.float32)
    keep = base.copy()
    overlapping = np.lib.stride_tricks.as_strided(base, (10, 16), (8, 4))
    with pytest.raises(ValueError, match="overlap"):
        f(overlapping)
    broadcast = np.lib.stride_tricks.as_strided(base, (4, 16), (0, 4))
    with pytest.raises(ValueError, match="overlap"):
        f(broadcast)
    raw = rng.integers(0, 255, 3 * 66 + 8, dtype=np.uint8)
    raw_keep = raw.copy()
    misaligned = np.ndarray((3, 16), np.float32, buffer=raw, offset=0, strides=(66, 4))
    with pytest.raises(ValueError, match="66 bytes is not a whole number"):
        f(misaligned)
    np.testing.assert_array_equal(base, keep)
    np.testing.assert_array_equal(raw, raw_keep)


@pytest.mark.parametrize("call", ["steer", "reconstruct"])
def test_inplace_refuses_overlapping_torch_rows(call):
    torch = pytest.importorskip("torch")
    sae = make_sae(16, 64, 4)
    f = _inplace_calls(sae)[call]
    base = torch.randn(10 * 16 + 16)
    keep = base.clone()
    with pytest.raises(ValueError, match="overlap"):
        f(base.as_strided((10, 16), (2, 1)))
    with pytest.raises(ValueError, match="overlap"):
        f(base[:16].expand(4, 16))
    torch.testing.assert_close(base, keep, rtol=0, atol=0)


def test_inplace_writes_strided_rows_correctly():
    # Rows with a stride larger than d_model (a column slice) are written where they are.
    sae = make_sae(16, 64, 4)
    st = saehook.Steering(sae).add(1, 2.0).clamp(3, 0.5).scale(5, 2.0)
    big = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32)
    view = big[:, 8:24]
    expect = ref.steer(sae, view.copy(), [(o.op, o.feature, o.value, o.normalize) for o in st.ops])
    before = big.copy()
    st.apply(view)
    np.testing.assert_allclose(big[:, 8:24], expect, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(big[:, :8], before[:, :8])
    np.testing.assert_array_equal(big[:, 24:], before[:, 24:])
    # A 3-D array whose rows form one strided view is written in place as well.
    big3 = np.random.default_rng(3).standard_normal((2, 3, 40)).astype(np.float32)
    expect3 = ref.decode(sae, *ref.encode(sae, big3[..., 4:20].reshape(-1, 16), 4)).reshape(2, 3, 16)
    sae.reconstruct(big3[..., 4:20], inplace=True)
    np.testing.assert_allclose(big3[..., 4:20], expect3, rtol=2e-4, atol=2e-4)


# ---- item 6: non-finite results from finite input ----

@pytest.mark.parametrize("activation", ["topk", "topk_relu", "relu", "jumprelu"])
def test_encode_refuses_overflowing_preactivations(activation):
    sae = make_sae(32, 128, 4, activation=activation)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    x[3] = 3e38 * np.sign(x[3])  # finite input whose dot products overflow (Inf, and NaN from Inf - Inf)
    with pytest.raises(OverflowError, match="row 3 overflow float32"):
        sae.encode(x)
    assert not np.isfinite(sae.preacts(x)[3]).all()  # the dense analysis output shows them as they are
    keep = x.copy()
    with pytest.raises(OverflowError, match="row 3"):
        sae.reconstruct(x, inplace=True)
    np.testing.assert_array_equal(x, keep)
    with pytest.raises(OverflowError, match="row 3"):
        saehook.Steering(sae).clamp(2, 1.0).apply(x)
    np.testing.assert_array_equal(x, keep)


def test_decode_and_reconstruct_refuse_overflowing_reconstructions():
    # A finite encode whose decode overflows: decoder rows near 1e38, only row 300 with large
    # values (a later chunk: earlier chunks must not be written either).
    base = make_sae(16, 64, 4)
    a = base.arrays()
    sae = saehook.SAE(a["W_enc"], a["W_dec"] * np.float32(1e37), a["b_enc"], a["b_dec"], k=4)
    x = np.random.default_rng(0).standard_normal((301, 16)).astype(np.float32) * 0.01
    x[300] *= 1e4
    vals, idx = sae.encode(x)
    assert np.isfinite(vals).all()
    with pytest.raises(OverflowError, match="decode: the reconstruction of row 300 overflows"):
        sae.decode(vals, idx)
    keep = x.copy()
    with pytest.raises(OverflowError, match="row 300 overflows float32.*h is unchanged"):
        sae.reconstruct(x, inplace=True)
    np.testing.assert_array_equal(x, keep)
    # Without the overflowing row everything is finite and matches the reference.
    ok = x[:300].copy()
    np.testing.assert_allclose(sae.reconstruct(ok), ref.decode(sae, *ref.encode(sae, ok, 4)), rtol=2e-4)


def test_steer_refuses_rows_that_overflow_and_leaves_them_unchanged():
    base = make_sae(8, 16, 4)
    a = base.arrays()
    W_dec = np.zeros_like(a["W_dec"])
    W_dec[:, 0] = 1.0  # every direction has a component of 1 at dimension 0
    sae = saehook.SAE(a["W_enc"], W_dec, a["b_enc"], a["b_dec"], k=4)
    st = saehook.Steering(sae).add(1, 3e38).add(2, 3e38)  # each finite; their sum overflows
    with pytest.raises(OverflowError, match="steering vector overflows"):
        st.vector()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    keep = x.copy()
    with pytest.raises(OverflowError, match="row 0 overflows float32"):
        st.apply(x)
    np.testing.assert_array_equal(x, keep)
    mask = np.array([False, False, True, False])
    with pytest.raises(OverflowError, match="row 2 overflows"):
        st.apply(x, mask=mask)
    np.testing.assert_array_equal(x, keep)


# ---- item 9: steering values that overflow float32 ----

def test_steering_values_must_be_finite_float32():
    sae = make_sae(16, 64, 4)
    for op in ("add", "clamp", "scale"):
        with pytest.raises(ValueError, match="overflows float32"):
            getattr(saehook.Steering(sae), op)(3, 1e39)
        with pytest.raises(ValueError, match="overflows float32"):
            getattr(saehook.Steering(sae), op)(3, -1e39)
    # Finite in float32 but times a direction component > 1: overflows.
    a = sae.arrays()
    W_dec = a["W_dec"].copy()
    W_dec[3, 0] = 4.0
    sae4 = saehook.SAE(a["W_enc"], W_dec, a["b_enc"], a["b_dec"], k=4)
    with pytest.raises(ValueError, match="decoder direction.*overflows float32"):
        saehook.Steering(sae4).add(3, 3e38)
    assert np.isfinite(saehook.Steering(sae4).add(3, 3e38, normalize=True).vector()).all()


# ---- item 7: autograd and in-place steering ----

@pytest.mark.parametrize("call", ["steer", "reconstruct", "steer_op"])
def test_inplace_on_a_tensor_autograd_saved_raises_in_backward(call):
    torch = pytest.importorskip("torch")
    import saehook.torch_ops as ops

    sae = make_sae(16, 64, 4)
    st = saehook.Steering(sae).add(1, 2.0).clamp(3, 0.5)
    f = {"steer": lambda x: st.apply(x), "reconstruct": lambda x: sae.reconstruct(x, inplace=True),
         "steer_op": lambda x: ops.steer_(st, x)}[call]
    w = torch.randn(16, requires_grad=True)
    x = torch.randn(4, 16)
    y = (w * x).sum()  # autograd saves x for dy/dw
    f(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("call", ["steer", "reconstruct", "steer_op"])
def test_inplace_refuses_a_tensor_that_requires_grad(call):
    torch = pytest.importorskip("torch")
    import saehook.torch_ops as ops

    sae = make_sae(16, 64, 4)
    st = saehook.Steering(sae).add(1, 2.0)
    f = {"steer": lambda x: st.apply(x), "reconstruct": lambda x: sae.reconstruct(x, inplace=True),
         "steer_op": lambda x: ops.steer_(st, x)}[call]
    leaf = torch.randn(4, 16, requires_grad=True)
    h = leaf * 2.0
    keep = h.detach().clone()
    with pytest.raises(RuntimeError, match="requires grad"):
        f(h)
    torch.testing.assert_close(h.detach(), keep, rtol=0, atol=0)
    with torch.no_grad():  # allowed without autograd
        f(h)
    assert not torch.equal(h.detach(), keep)


# ---- item 11: a steering layer other than the SAE's ----

def test_steering_warns_on_a_layer_other_than_the_saes():
    sae = make_sae(16, 64, 4, metadata={"layer": 3})
    with pytest.warns(UserWarning, match="layer 5 with an SAE trained for layer 3"):
        st = saehook.Steering(sae, layer=5)
    assert st.layer == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert saehook.Steering(sae, layer=3).layer == 3
        assert saehook.Steering(sae).layer == 3
        assert saehook.Steering(make_sae(16, 64, 4), layer=7).layer == 7  # SAE layer unknown


# ---- torch ops: decode is differentiable ----

def test_decode_gradient_matches_embedding_bag_and_dense():
    torch = pytest.importorskip("torch")
    import saehook.torch_ops as ops

    for layout in ("rows", "cols"):
        sae = make_sae(24, 96, 6, dec_layout=layout, seed=4)
        W_dec_rows = torch.from_numpy(np.ascontiguousarray(
            sae.arrays()["W_dec"] if layout == "rows" else sae.arrays()["W_dec"].T))
        b_dec = torch.from_numpy(sae.arrays()["b_dec"])
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 96, (5, 6), generator=g, dtype=torch.int32)
        idx[1, 2] = -1  # padding contributes nothing and gets no gradient
        vals = torch.randn(5, 6, generator=g, requires_grad=True)
        target = torch.randn(5, 24, generator=g)
        loss = ((ops.decode(sae, vals, idx) - target) ** 2).sum()
        loss.backward()

        # Oracle 1: torch's EmbeddingBag (sum mode, per-sample weights).
        bag = torch.nn.EmbeddingBag.from_pretrained(W_dec_rows.clone(), mode="sum")
        v2 = vals.detach().clone().requires_grad_(True)
        keep = (idx >= 0).to(torch.float32)
        out = bag(idx.clamp(min=0).long(), per_sample_weights=(v2 * keep).reshape(5, 6)) + b_dec
        ((out - target) ** 2).sum().backward()
        torch.testing.assert_close(vals.grad, v2.grad, rtol=1e-4, atol=1e-4)
        assert vals.grad[1, 2] == 0

        # Oracle 2: a dense (n, d_sae) code times the decoder.
        v3 = vals.detach().clone().requires_grad_(True)
        code = torch.zeros(5, 96).scatter_add(1, idx.clamp(min=0).long(), v3 * keep)
        ((code @ W_dec_rows + b_dec - target) ** 2).sum().backward()
        torch.testing.assert_close(vals.grad, v3.grad, rtol=1e-4, atol=1e-4)


def test_reconstruction_loss_backpropagates_to_x():
    torch = pytest.importorskip("torch")
    import saehook.torch_ops as ops

    sae = make_sae(24, 96, 6, seed=5)
    a = sae.arrays()
    W_enc, W_dec = torch.from_numpy(a["W_enc"]), torch.from_numpy(a["W_dec"])
    b_enc, b_dec = torch.from_numpy(a["b_enc"]), torch.from_numpy(a["b_dec"])
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    vals, idx = ops.encode(sae, x)
    x_hat = ops.decode(sae, vals, idx)
    ((x_hat - x.detach()) ** 2).sum().backward()
    # Oracle: the same Top-K selection computed densely in torch.
    x2 = x.detach().clone().requires_grad_(True)
    pre = x2 @ W_enc.T + b_enc
    v2 = pre.gather(1, idx.long())
    x_hat2 = (v2.unsqueeze(-1) * W_dec[idx.long()]).sum(1) + b_dec
    torch.testing.assert_close(x_hat.detach(), x_hat2.detach(), rtol=1e-4, atol=1e-4)
    ((x_hat2 - x.detach()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


# ---- threads: fork safety, the thread cap, bounded scratch ----

def test_fork_after_a_multithreaded_encode():
    p = run_py("""
        import multiprocessing as mp, os
        import numpy as np
        from conftest import make_sae
        sae = make_sae(64, 4096, 8)
        x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
        v0, i0 = sae.encode(x, threads=4)

        def work(_):
            v, i = sae.encode(x, threads=4)
            return bool(np.array_equal(i, i0))

        pid = os.fork()
        if pid == 0:
            os._exit(0 if work(0) else 5)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0, st
        with mp.get_context("fork").Pool(2) as pool:
            assert all(pool.map(work, range(4)))
        print("ok")
    """, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_threads_are_capped():
    p = run_py("""
        import os, numpy as np, saehook
        from conftest import make_sae
        sae = make_sae(8, 300_000, 4)   # 586 feature blocks: room for 586 threads
        x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
        before = len(os.listdir("/proc/self/task"))
        sae.encode(x, threads=1000)
        saehook.set_num_threads(1000)
        print(len(os.listdir("/proc/self/task")) - before, saehook.get_num_threads(), os.cpu_count())
    """)
    assert p.returncode == 0, p.stderr
    new_threads, default_threads, cpus = map(int, p.stdout.split())
    assert default_threads <= 4 * cpus
    assert 0 < new_threads < 4 * cpus  # the pool's workers (the caller is the first of at most 4 x CPUs)


def test_encode_scratch_is_bounded_for_large_k():
    # k = d_sae = 65536 on 16 threads and 128 rows: a 64 MiB result. Scratch used to be 2.4 GiB.
    p = run_py("""
        import resource, numpy as np
        from conftest import make_sae
        sae = make_sae(16, 65536, 8)
        x = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
        vals = np.empty((128, 65536), np.float32); idx = np.empty((128, 65536), np.int32)
        vals[:] = 0; idx[:] = 0   # touch the result before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import saehook._core as core
        core.encode(sae._handle, x.ctypes.data, 128, 16, 65536, vals.ctypes.data, idx.ctypes.data, 16, 0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pre = x.astype(np.float64) @ sae.arrays()["W_enc"].T.astype(np.float64) + sae.arrays()["b_enc"]
        assert (np.sort(idx, axis=1) == np.arange(65536)).all()          # every feature, once
        np.testing.assert_allclose(vals, np.take_along_axis(pre, idx.astype(np.int64), 1), rtol=1e-4, atol=1e-4)
        assert (np.diff(vals, axis=1) <= 0).all()                          # sorted descending
        print((after - before) // 1024)
    """, timeout=300)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) <= 128, f"encode scratch grew the peak RSS by {p.stdout.strip()} MiB"


def test_encode_with_few_rows_per_pass_matches_reference():
    # Large k with many threads takes several passes of few rows over W_enc; same result.
    sae = make_sae(32, 4096, 2000, seed=3)
    x = np.random.default_rng(4).standard_normal((40, 32)).astype(np.float32)
    vals, idx = sae.encode(x, threads=8)
    ref.assert_topk_matches(vals, idx, ref.activate(sae, ref.preacts(sae, x)), 2000, 2e-4)


# ---- crashes: size overflow, exit with work in flight ----

def test_create_refuses_sizes_that_overflow():
    p = run_py("""
        import numpy as np, saehook._core as core
        buf = np.zeros(64, np.float32)
        a = buf.ctypes.data
        for copy in (True, False):
            try:
                h = core.create(2**32, 2**30, 1, 0, False, a, 0, 0, 0, a, 0, 0, 0, 0, copy)
                out = np.empty(8, np.float32)
                core.decoder_direction(h, 0, False, out.ctypes.data)
                print("created")
            except ValueError as e:
                print("refused:", e)
        ok = core.create(4, 16, 1, 0, False, a, 0, 0, 0, a, 0, 0, 0, 0, True)
        for n, ld in ((2**40, 2**40), (2**62, 4)):
            try:
                core.encode(ok, a, n, ld, 1, a, a, 1, 0)
                print("encoded")
            except ValueError as e:
                print("refused:", e)
    """)
    assert p.returncode == 0, (p.returncode, p.stderr)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4 and all(l.startswith("refused:") and "overflows" in l for l in lines), p.stdout


def test_exit_with_work_in_flight_is_clean():
    code = """
        import sys, threading, time, numpy as np, saehook
        from conftest import make_sae
        sae = make_sae(128, 4096, 16)
        st = saehook.Steering(sae).clamp(3, 1.0)
        x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)

        def work():
            while True:
                v, i = sae.encode(x, threads=2)
                sae.decode(v, i)
                st.apply(x.copy())

        for _ in range(3):
            threading.Thread(target=work, daemon=True).start()
        time.sleep(0.2)
        sys.exit(3)
    """
    for _ in range(4):
        p = run_py(code, timeout=60)
        assert p.returncode == 3 and "terminate" not in p.stderr, (p.returncode, p.stderr)
