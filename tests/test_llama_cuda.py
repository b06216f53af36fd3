"""The llama.cpp hook's device path (layers offloaded to a CUDA GPU with n_gpu_layers): the SAE
on the device, run on the residual's device memory, against the host path (the residual copied
to the host, saehook's CPU kernels, copied back) on the same GGUF and the same offloaded model,
and against the model on the CPU.

The first tests run everywhere (CI has nvcc but no GPU): which path a layer takes and why, the
buffer-type parsing, that libsaehook links no ggml symbol. The comparisons run twice: on an
emulated device (saehook_llama_hook_emulate_device: the device path's code on host memory, CPU
loops for its kernels, a CPU model), everywhere, which checks what the device path copies where
against the host path; and on a real CUDA device, which needs llama-cpp-python built with
-DGGML_CUDA=on, saehook built with CUDA and a GPU, skips with the reason otherwise and runs in
bench/device_check.sh."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import saehook  # noqa: E402
import saehook.cuda  # noqa: E402,F401 (describe)
import saehook.llama as shl  # noqa: E402
from saehook import _core  # noqa: E402
from saehook.llama import HookedLlama  # noqa: E402
from saehook.steering_spec import When  # noqa: E402

import gguf_models as gm  # noqa: E402

KV_F32 = dict(type_k=0, type_v=0)
TOKENS = [int(t) for t in np.random.default_rng(3).integers(0, 256, 24)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    gm.write_gguf(gm.build_hf_model(num_hidden_layers=3), path)
    return path


@pytest.fixture(scope="module")
def sae():
    return gm.random_sae()


def open_llm(path, **kw):
    args = dict(n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, seed=0, **KV_F32)
    args.update(kw)
    return HookedLlama(str(path), **args)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def overlap(a, b):
    k = a.shape[1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))


# ---------------------------------------------------------------------------------------------
# everywhere (no device needed)


def test_buffer_type_names_map_to_cuda_devices():
    f = shl._lib().lib.saehook_llama_buffer_type_device
    f.restype, f.argtypes = ctypes.c_int32, [ctypes.c_char_p]
    cases = {b"CUDA0": 0, b"CUDA1": 1, b"CUDA12": 12, b"CUDA_Host": -1, b"CUDA_Split": -1, b"CUDA": -1,
             b"ROCm0": -1, b"MUSA0": -1, b"CPU": -1, b"CPU_REPACK": -1, b"Vulkan0": -1, b"Metal": -1,
             b"CUDA0x": -1, None: -1}
    assert {n: f(n) for n in cases} == cases


def test_the_device_path_is_built_with_the_cuda_kernels():
    f = shl._lib().lib.saehook_llama_device_path_built
    f.restype = ctypes.c_int32
    assert f() == _core.cuda_available()


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_libsaehook_links_no_ggml_symbol():
    """The hook calls ggml only through the pointers its caller passes, so one libsaehook works
    with CPU-only and CUDA builds of llama.cpp (and loads where neither is installed)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", saehook.get_library()], capture_output=True, text=True,
                         check=True).stdout
    assert [ln for ln in out.splitlines() if "ggml_" in ln or "llama_" in ln] == []


def test_cpu_layers_report_the_host_path_and_why(model, sae):
    llm = open_llm(model)
    assert "no hooked layer" in repr(llm)
    with llm.capture({1: sae}) as rec:
        assert llm.hook_paths() == {1: "not run yet"}
        llm.eval(TOKENS)
        assert llm.hook_paths() == {1: "host (buffer type CPU is host memory)"}
        assert "layer 1: host (buffer type CPU is host memory)" in repr(llm)
        assert "layer 1: host (buffer type CPU is host memory)" in saehook.cuda.describe(llm=llm)
        assert llm.device_sae_copies() == (0, 0)
    assert rec[1].indices.shape == (len(TOKENS), sae.k)


def test_switching_the_device_path_off_and_a_missing_backend_api_say_why(model, sae):
    llm = open_llm(model)
    llm.device_hook = False
    with llm.capture({1: sae}):
        llm.eval(TOKENS[:4])
        assert llm.hook_paths()[1].startswith("host (the device path is off")
        llm.device_hook = True
        shl._lib().set_backend_api(llm._hook, None)  # what a caller without those ggml functions gets
        llm.reset()
        llm.eval(TOKENS[:4])
        assert llm.hook_paths()[1].startswith("host (the caller gave no ggml backend-buffer functions")


def test_a_device_that_cannot_run_the_kernels_falls_back_to_the_host_path(model, sae):
    """A device whose setup fails (here the emulated stand-in for a GPU this build has no kernels
    for) is not used: its layers run on the host path, the path report says why, nothing fails."""
    llm = open_llm(model, logits_all=True)
    st = saehook.Steering(sae, layer=1).clamp(3, 2.0)
    outs = {}
    for emulate in (2, 0):
        shl._lib().emulate_device(llm._hook, emulate)
        llm.reset()
        with llm.steer(st), llm.capture({1: sae}) as rec:
            llm.eval(TOKENS)
            paths, copies = llm.hook_paths(), llm.device_sae_copies()
        outs[emulate] = (rec[1], np.array(llm.scores[: len(TOKENS)]), paths, copies)
    rec, logits, paths, copies = outs[2]
    assert paths == {1: "host (emulated device cannot run the device path: this saehook build cannot run on the "
                        "emulated broken device (a stand-in for a GPU without kernels of this build))"}, paths
    assert copies == (0, 0)
    np.testing.assert_array_equal(logits, outs[0][1])
    np.testing.assert_array_equal(rec.indices, outs[0][0].indices)


# ---------------------------------------------------------------------------------------------
# on a CUDA device


def _device_reason():
    supported = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    if not (supported and supported()):
        return "llama-cpp-python has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)"
    if not _core.cuda_available():
        return "saehook was built without CUDA kernels (no CUDA toolkit at build time, or SAEHOOK_CUDA=OFF)"
    try:
        import torch
    except ImportError:
        return "needs torch to see the CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


@pytest.fixture(params=["emulated", "cuda"])
def mode(request):
    """Where the device path runs: the emulated device (a CPU model) or a real GPU (every layer offloaded)."""
    if request.param == "cuda" and _device_reason() is not None:
        pytest.skip(_device_reason())
    return request.param


def open_in(mode, path, **kw):
    return open_llm(path, n_gpu_layers=-1 if mode == "cuda" else 0, **kw)


DEVICE_PATH = {"cuda": "device 0 (CUDA0)",
               "emulated": "emulated device (the device path on host memory, for tests: saehook_llama_hook_emulate_device)"}


def runs(llm, fn, mode):
    """fn() on the device path and on the host path of the same model."""
    out = {}
    for on in (True, False):
        if mode == "cuda":
            llm.device_hook = on
        else:
            shl._lib().emulate_device(llm._hook, int(on))
        llm.reset()
        out[on] = fn()
    llm.device_hook = True
    shl._lib().emulate_device(llm._hook, 0)
    return out[True], out[False]


def test_capture_on_the_device_equals_the_host_path_and_the_cpu_model(mode, model, sae):
    llm = open_in(mode, model, logits_all=True)

    def capture():
        with llm.capture({0: sae, 1: sae}, residuals=True) as rec:
            llm.eval(TOKENS)
            paths, copies = llm.hook_paths(), llm.device_sae_copies()
        return rec, paths, copies, np.array(llm.scores[: len(TOKENS)])

    (dev, dpaths, dcopies, dlogits), (host, hpaths, hcopies, hlogits) = runs(llm, capture, mode)
    assert dpaths == {0: DEVICE_PATH[mode], 1: DEVICE_PATH[mode]}, dpaths
    assert all(p.startswith("host (") for p in hpaths.values()) and hcopies == (0, 0)
    # one copy of the SAE for both layers, W_enc + W_dec + b_enc (256-byte aligned parts)
    assert dcopies[0] == 1 and dcopies[1] >= sae.d_sae * sae.d_model * 8 + sae.d_sae * 4
    assert llm.device_sae_copies() == (0, 0)  # dropped with the last entry using the SAE
    assert rel_err(dlogits, hlogits) < 1e-6  # capture alone changes nothing (same model, same graph splits)
    for L in (0, 1):
        assert np.array_equal(dev[L].tokens, host[L].tokens) and np.array_equal(dev[L].positions, host[L].positions)
        np.testing.assert_allclose(dev[L].residuals, host[L].residuals, rtol=1e-6, atol=1e-6)
        assert overlap(dev[L].indices, host[L].indices) >= 0.99
        same = dev[L].indices == host[L].indices
        np.testing.assert_allclose(dev[L].values[same], host[L].values[same], rtol=1e-4, atol=1e-5)
    # The same GGUF on the CPU (independent numerics: llama.cpp's CPU backend, saehook's CPU kernels).
    cpu = open_llm(model, n_gpu_layers=0)
    with cpu.capture({1: sae}) as rec:
        cpu.eval(TOKENS)
    assert overlap(rec[1].indices, dev[1].indices) >= 0.97


def _steerings(sae, rec):
    """Every op of the CPU hook at layer 1 (clamp/scale/ablate read the encode; cap/rescale the
    projection; conditions with a latch), generated-only and position-window entries, with
    features the clean run activates."""
    top = np.bincount(rec.indices[:, :3].ravel(), minlength=sae.d_sae).argsort()[::-1]
    f = [int(x) for x in top[:6]]
    thr = float(np.median(rec.values[:, 0]))
    st1 = (saehook.Steering(sae, layer=1).clamp(f[0], 3.0).scale(f[1], 2.0).ablate(f[2])
           .cap(f[3], max=0.5).rescale(f[4], 0.5)
           .add(f[5], 2.0, when=When(f[0], above=thr, latch=True)))
    st2 = saehook.Steering(sae, layer=2, positions="generated").clamp(f[1], 4.0)
    st3 = saehook.Steering(sae, layer=2, positions=(4, 12)).add(f[2], 1.5)
    # after st1 changed every row: rows 4..11 encoded again (gathered, scattered back on the device)
    st4 = saehook.Steering(sae, layer=1, positions=(4, 12)).scale(f[0], 0.5)
    return [st1, st2, st3, st4]


def test_every_steering_op_on_the_device_equals_the_host_path(mode, model, sae):
    llm = open_in(mode, model, logits_all=True)
    with llm.capture({1: sae}) as rec:
        llm.eval(TOKENS)
    sts = _steerings(sae, rec[1])

    def steer_eval():
        with llm.steer(*sts), llm.capture({1: sae, 2: sae}) as r:
            llm.eval(TOKENS)
            paths = llm.hook_paths()
        return np.array(llm.scores[: len(TOKENS)]), r, paths

    def steer_generate():
        out = []
        with llm.steer(*sts), llm.capture({2: sae}) as r:
            for t in llm.generate(TOKENS[:8], top_k=1, temp=0.0):
                out.append(t)
                if len(out) == 8:
                    break
        return out, r[2]

    (dl, dr, dp), (hl, hr, _) = runs(llm, steer_eval, mode)
    assert set(dp.values()) == {DEVICE_PATH[mode]}
    assert rel_err(dl, hl) < 1e-4
    for L in (1, 2):
        assert overlap(dr[L].indices, hr[L].indices) >= 0.99
    (dt, dg), (ht, hg) = runs(llm, steer_generate, mode)
    assert dt == ht  # the greedy tokens under prompt/generated/window steering
    assert np.array_equal(dg.generated, hg.generated) and overlap(dg.indices, hg.indices) >= 0.99
    # and the steering did something
    llm.reset()
    llm.eval(TOKENS)
    assert rel_err(np.array(llm.scores[: len(TOKENS)]), dl) > 1e-2


def test_control_vector_and_capture_at_its_layer_on_the_device(mode, model, sae):
    llm = open_in(mode, model, logits_all=True)
    add = saehook.Steering(sae, layer=2).add(7, 4.0)  # additive, all positions: a control vector

    def run():
        with llm.steer(add), llm.capture({2: sae}, residuals=True) as r:
            llm.eval(TOKENS)
        return r[2], np.array(llm.scores[: len(TOKENS)])

    (dr, dl), (hr, hl) = runs(llm, run, mode)
    np.testing.assert_allclose(dr.residuals, hr.residuals, rtol=1e-6, atol=1e-6)
    llm.reset()
    with llm.capture({2: sae}, residuals=True) as clean:  # what block 2 computes, before the vector
        llm.eval(TOKENS)
    np.testing.assert_allclose(dr.residuals, clean[2].residuals, rtol=1e-5, atol=1e-5)
    assert rel_err(np.array(llm.scores[: len(TOKENS)]), dl) > 1e-3  # and the vector steers
    assert overlap(dr.indices, hr.indices) >= 0.99
    assert rel_err(dl, hl) < 1e-5


def test_splice_on_the_device_equals_the_host_path(mode, model, sae):
    llm = open_in(mode, model, logits_all=True)

    def run():
        with llm.splice({1: sae}):
            llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)])

    d, h = runs(llm, run, mode)
    assert rel_err(d, h) < 1e-4


def test_per_sequence_steering_at_batch_8_on_the_device_shares_one_encode(mode, model, sae):
    """8 sequences, each with its own clamp, in one decode per step: the device path samples what
    the host path samples, captures the same features, and runs one encode per step."""
    n = 8
    prompts = [[int(t) for t in np.random.default_rng(40 + s).integers(0, 256, 5 + s % 3)] for s in range(n)]
    llm = open_in(mode, model, context_overrides={"n_seq_max": n, "kv_unified": True})
    sts = [saehook.Steering(sae, layer=1).clamp(10 + 7 * s, 6.0 + 2 * s) for s in range(n)]

    def run():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)  # every sequence's cache
        batch = llama_cpp.llama_batch_init(128, 0, 1)
        hooks = [llm.hook_sequence(s, steerings=[sts[s]], capture={1: sae}) for s in range(n)]
        per_step = []
        try:
            def decode(entries, generated):
                for j, (s, tok, pos, out) in enumerate(entries):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = tok, pos, 1, s
                    batch.logits[j] = out
                batch.n_tokens = len(entries)
                llm.announce_batch(batch, generated=generated)
                before = llm.encode_count
                assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
                llm.raise_hook_error()
                per_step.append(llm.encode_count - before)
                nv = llm.n_vocab()
                return {s: int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, j),
                                                               shape=(nv,))))
                        for j, (s, _, _, out) in enumerate(entries) if out}

            out = {s: [] for s in range(n)}
            entries = [(s, t, p, p == len(prompts[s]) - 1) for s in range(n) for p, t in enumerate(prompts[s])]
            for s, t in decode(entries, False).items():
                out[s].append(t)
            for step in range(3):
                for s, t in decode([(s, out[s][-1], len(prompts[s]) + step, True) for s in range(n)], True).items():
                    out[s].append(t)
            recs = [h.take()[1] for h in hooks]
            return out, recs, per_step
        finally:
            for h in hooks:
                h.close()
            llama_cpp.llama_batch_free(batch)

    (dout, drecs, dsteps), (hout, hrecs, hsteps) = runs(llm, run, mode)
    assert dout == hout
    assert dsteps[1:] == [1, 1, 1] and hsteps[1:] == [1, 1, 1]  # 8 rows, 8 clamps, one encode
    for d, h in zip(drecs, hrecs):
        assert np.array_equal(d.positions, h.positions) and overlap(d.indices, h.indices) >= 0.99
