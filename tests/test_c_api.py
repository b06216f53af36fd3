"""The C API used from a C program (no Python in the loop), against the numpy reference."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import saehook

import reference as ref

HERE = os.path.dirname(__file__)


def test_c_program_against_reference(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = saehook.get_library()
    exe = tmp_path / "c_api_smoke"
    subprocess.run([cc, "-std=c99", "-O1", os.path.join(HERE, "c_api", "c_api_smoke.c"), "-I", saehook.get_include(),
                    lib, f"-Wl,-rpath,{os.path.dirname(lib)}", "-lm", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()

    D, M, K = 20, 50, 4
    i = np.arange(M * D, dtype=np.float32)
    W_enc = np.sin(np.float32(0.37) * i).reshape(M, D)
    W_dec = np.cos(np.float32(0.11) * i).reshape(M, D)
    b_enc = np.float32(0.01) * np.arange(M, dtype=np.float32)
    x = np.cos(np.float32(0.5) * np.arange(2 * D, dtype=np.float32)).reshape(2, D)
    sae = saehook.SAE(W_enc, W_dec, b_enc, k=K)

    pairs = [line.split() for line in out[: 2 * K]]
    idx = np.array([int(p[0]) for p in pairs]).reshape(2, K)
    vals = np.array([float(p[1]) for p in pairs]).reshape(2, K)
    ref.assert_topk_matches(vals, idx, ref.activate(sae, ref.preacts(sae, x)), K, 1e-4)
    decoded = np.array([float(v) for v in out[2 * K: 2 * K + 2 * D]]).reshape(2, D)
    np.testing.assert_allclose(decoded, ref.decode(sae, vals, idx), rtol=1e-4, atol=1e-4)
    assert out[2 * K + 2 * D].startswith("nan-status 5 input contains NaN at row 0, column 3")
    assert out[2 * K + 2 * D + 1].startswith("index-status 4 steering feature 55 is out of range")
    assert out[-3] == f"prefilter same 1 bytes {M * D * 2 + M * 12} rows 2 fallbacks 0"
    assert out[-2].startswith("prefilter-status 3 the prefilter's dtype must be bf16 (or f32 to drop it), not int8")
    assert out[-1] == f"isa {saehook.get_isa()}"
