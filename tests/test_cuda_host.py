"""What of the CUDA path can be checked without a GPU (CI has nvcc but no device):

- the selection logic of the kernels (csrc/cuda/select.cuh: keys, radix select, bitonic sort,
  padding, candidate-list merging) and the encode planner (csrc/cuda/plan.cuh), compiled with
  the host compiler and run against a brute-force reference and the CPU kernels' own Top-K
  (tests/cuda_host/select_test.cpp);
- the cuBLAS declarations used for the run-time-loaded library, against a real cublas_v2.h
  where one is installed;
- a CUDA build loads and runs on the CPU without a driver, and refuses CUDA handles clearly.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import saehook
from saehook import _core

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cxx():
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no C++ compiler")


def test_selection_logic_on_host(tmp_path):
    exe = tmp_path / "select_test"
    subprocess.run([_cxx(), "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc", "include"),
                    os.path.join(HERE, "cuda_host", "select_test.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(", 0 failed")


def _cublas_include_dirs():
    """Directories of an installed cublas_v2.h (CUDA toolkit, or pip's nvidia-cublas wheels)
    plus the CUDA runtime headers it includes."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda", "/usr"]
    headers = [os.path.join(r, "include", "cublas_v2.h") for r in roots if r]
    for p in sys.path:
        headers += glob.glob(os.path.join(p, "nvidia", "*", "include", "cublas_v2.h"))
    found = [os.path.dirname(h) for h in headers if os.path.isfile(h)]
    if not found:
        return None
    runtime = [os.path.dirname(h) for h in
               [os.path.join(r, "include", "cuda_runtime_api.h") for r in roots if r] +
               [g for p in sys.path for g in glob.glob(os.path.join(p, "nvidia", "*", "include", "cuda_runtime_api.h"))]
               if os.path.isfile(h)]
    return found[:1] + runtime


def test_cublas_declarations_match_the_header(tmp_path):
    dirs = _cublas_include_dirs()
    if dirs is None:
        pytest.skip("no cublas_v2.h installed (the CUDA toolkit here has no cuBLAS; runtime.cpp loads it at run time)")
    args = [_cxx(), "-std=c++17", "-fsyntax-only", os.path.join(HERE, "cuda_host", "cublas_abi.cpp")]
    for d in dirs:
        args += ["-I", d]
    subprocess.run(args, check=True)


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_build_reports_cuda_and_runs_on_cpu():
    # Whatever the build, the CPU kernels work (a CUDA build links the CUDA runtime statically
    # and needs no driver until a CUDA handle is used).
    W = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    sae = saehook.SAE(W, W.copy(), k=3)
    vals, idx = sae.encode(np.ones((2, 12), np.float32))
    assert idx.shape == (2, 3)
    assert isinstance(_core.cuda_available(), bool)


def test_a_machine_with_nvcc_builds_the_cuda_kernels():
    # SAEHOOK_CUDA=AUTO builds csrc/cuda wherever nvcc is found, so on such a machine (CI
    # included) the suite only passes if every kernel compiled and linked into libsaehook.
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: this build is CPU-only by design")
    assert _core.cuda_available(), "nvcc is on PATH but saehook was built without its CUDA kernels"


def test_cuda_handles_without_a_device_are_refused_clearly():
    if _has_gpu():
        pytest.skip("a CUDA device is present (tests/test_cuda.py covers it)")
    W = np.ones((8, 4), np.float32)
    with pytest.raises(RuntimeError) as err:
        _core.create(4, 8, 2, 0, False, W.ctypes.data, 0, 0, 0, W.ctypes.data, 0, 0, 0, 0, False, True, 0)
    if _core.cuda_available():
        assert "no usable CUDA device" in str(err.value)
    else:
        assert "no CUDA kernels" in str(err.value)


def test_cuda_module_without_a_device():
    pytest.importorskip("torch")
    import saehook.cuda as sc

    if _has_gpu() and _core.cuda_available():
        pytest.skip("a CUDA device is present (tests/test_cuda.py covers it)")
    assert not sc.is_available()
    W = np.ones((8, 4), np.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        sc.to_device(saehook.SAE(W, W.copy(), k=2))


def test_describe_symbol_is_exported():
    if not _core.cuda_available():
        pytest.skip("saehook was built without CUDA kernels")
    import ctypes

    lib = ctypes.CDLL(saehook.get_library())
    lib.saehook_cuda_describe.restype = ctypes.c_char_p
    lib.saehook_cuda_describe.argtypes = [ctypes.c_int32]
    line = lib.saehook_cuda_describe(0).decode()
    assert line.startswith("gemm=") or "CUDA" in line


def test_steering_items_from_tuples_and_steering():
    # CudaSAE.steer's item conversion, on a bare object (no device needed).
    import saehook.cuda as sc

    g = sc.CudaSAE.__new__(sc.CudaSAE)
    g.d_sae, g.d_model = 10, 4
    items = g._items([("add", 3, 2.0), ("clamp", 9, 0.5, True), ("ablate", 0, 0.0)])
    assert items["feature"].tolist() == [3, 9, 0]
    assert items["op"].tolist() == [0, 1, 3]
    assert items["value"].tolist() == [2.0, 0.5, 0.0]
    assert items["normalize"].tolist() == [0, 1, 0]
    with pytest.raises(IndexError):
        g._items([("add", 10, 1.0)])
    with pytest.raises(ValueError, match="unknown steering op"):
        g._items([("push", 1, 1.0)])
    with pytest.raises(ValueError, match="not finite"):
        g._items([("add", 1, float("nan"))])
    W = np.ones((10, 4), np.float32)
    st = saehook.Steering(saehook.SAE(W, W.copy(), k=2)).scale(4, 2.0)
    assert g._items(st).tolist() == st.items().tolist()
    with pytest.raises(ValueError, match="another shape"):
        g._items(saehook.Steering(saehook.SAE(np.ones((12, 4), np.float32), np.ones((12, 4), np.float32), k=2)))
