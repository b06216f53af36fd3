"""CPU classes (csrc/cpu/cpu_class.cpp): the class cpuid puts this machine in, the parameter
overrides, and that every class's parameters (and the extremes of each parameter) give the
numpy reference's results on every instruction-set path this machine runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import saehook

import reference as ref
from conftest import make_sae

ISAS = saehook.available_isas()
CLASSES = saehook.cpu_info()["classes"]
# Each class's table row, and each parameter at an extreme (through the same kernels).
SPECS = CLASSES + [
    "generic,stream_prefetch=0",
    "generic,stream_prefetch=4096",
    "generic,stream_prefetch_i8=0",
    "generic,stream_prefetch_i8=16384",
    "generic,batch1_rows_bf16=1",
    "generic,batch1_rows_bf16=2",
    "generic,batch1_rows_bf16=4",
    "generic,batch1_quarters=1",  # batch 1 from the block's four quarters (zen4's choice)
    "generic,batch1_quarters=1,block_bytes_1=1024",  # 8-feature blocks: quarters of 2 rows
    "zen4,batch1_quarters=0",
    "generic,block_bytes_1=1024,block_bytes_n=1024",  # smallest blocks: many tasks per call
    "generic,block_bytes_n=4194304",
    "generic,panel_chunk=128",
    "zen5,panel_prefetch_next=0",
    "generic,panel_prefetch_next=1,block_bytes_n=1024",  # prefetching the next of many small blocks
    "generic,gather_ahead=0",
    "generic,gather_ahead=64",
    "generic,gather_rows_f32=1",  # float32 decoders by whole rows (zen3's choice) on every class
    "zen3,gather_rows_f32=0",
    "generic,gather_l2=1",  # the decode prefetch into L2 (zen4's choice), chunked walk
    "zen3,gather_l2=1",  # and the row walk
    "zen4,gather_l2=0",
    "zen5,few_rows=0",  # 2 .. 16 rows on the many-rows kernels
    "generic,few_rows=64",  # every shape but the 70-row one on the few-rows tiles
    "generic,few_rows_l2=1",  # the few-rows tiles' prefetch into L2 (zen4's choice)
    "zen4,few_rows_l2=0",
    "generic,few_rows=64,few_rows_l2=1",
]
TOL = 2e-4
# d_model, d_sae, k, n: batch 1 with feature counts that end inside every interleave width, the
# few-row tiles (2, 3, 5, 11, 16 rows: every partial row tile, feature counts that end inside a
# 4- and a 6-feature group), the packed panels (4, 17 and more rows; the avx2 float32 panels from 24
# rows, bf16/f16 from 128: 130 rows end inside a 6-row tile, 203 features inside an 8-feature
# group, 45 inputs inside an 8-input transpose), several int8 quantization blocks.
SHAPES = [(300, 1037, 9, 1), (129, 515, 7, 2), (200, 301, 5, 3), (96, 700, 8, 5), (77, 1001, 6, 11),
          (40, 523, 5, 16), (300, 333, 6, 17), (64, 2000, 12, 70), (45, 203, 5, 130)]


@pytest.fixture(params=SPECS)
def spec(request):
    saehook.set_cpu_class(request.param)
    yield request.param
    saehook.set_cpu_class("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    saehook.set_isa(request.param)
    yield request.param
    saehook.set_isa("auto")


def _proc_cpuinfo() -> dict:
    out = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or os.uname().machine not in ("x86_64", "i686"),
                    reason="needs an x86 Linux /proc/cpuinfo")
def test_cpu_info_matches_proc_cpuinfo():
    info, proc = saehook.cpu_info(), _proc_cpuinfo()
    assert info["vendor"] == proc["vendor_id"]
    assert info["family"] == int(proc["cpu family"]) and info["model"] == int(proc["model"])
    flags = set(proc["flags"].split())
    # The class from the same rules written independently of cpu_class.cpp.
    if info["vendor"] == "AuthenticAMD" and info["family"] == 0x1A:
        want = "zen5"
    elif info["vendor"] == "AuthenticAMD" and info["family"] == 0x19 and info["model"] >= 0x10 and "avx512f" in flags:
        want = "zen4"
    elif info["vendor"] == "AuthenticAMD" and info["family"] == 0x19 and "avx512f" not in flags:
        want = "zen3"
    elif info["vendor"] == "GenuineIntel" and (info["model"] in (0x8F, 0xCF, 0xAD, 0xAE) and info["family"] == 6
                                               or "amx_tile" in flags):
        want = "spr"
    else:
        want = "generic"
    assert info["detected_class"] == want and info["class"] == want
    assert info["isa"] == saehook.get_isa()


def test_set_cpu_class_and_overrides():
    try:
        saehook.set_cpu_class("zen4")
        row = saehook.cpu_info()["params"]
        saehook.set_cpu_class("zen4,stream_prefetch=7,panel_chunk=256")
        info = saehook.cpu_info()
        assert info["class"] == "zen4"
        assert info["params"] == dict(row, stream_prefetch=7, panel_chunk=256)
        saehook.set_cpu_class("zen4")  # a class alone restores its row
        assert saehook.cpu_info()["params"] == row
        saehook.set_cpu_class("auto")
        assert saehook.cpu_info()["class"] == saehook.cpu_info()["detected_class"]
    finally:
        saehook.set_cpu_class("auto")


@pytest.mark.parametrize("spec, message", [
    ("zen9", "unknown CPU class 'zen9'"),
    ("zen5,foo=1", "unknown CPU tuning key 'foo'"),
    ("zen5,stream_prefetch", "'stream_prefetch' is not key=value"),
    ("zen5,stream_prefetch=-5", "'stream_prefetch=-5' is not key=value with a non-negative integer"),
    ("zen5,stream_prefetch=1k", "'stream_prefetch=1k' is not key=value"),
    ("zen5,batch1_rows_bf16=3", "batch1_rows_bf16 must be 1, 2, 4 or 8, not 3"),
    ("zen5,batch1_rows_bf16=0", "batch1_rows_bf16 must be 1, 2, 4 or 8, not 0"),
    ("zen5,panel_chunk=100", "panel_chunk must be a positive multiple of 128 (at most 1048576), not 100"),
    ("zen5,panel_chunk=0", "panel_chunk must be a positive multiple of 128 (at most 1048576), not 0"),
    ("zen5,block_bytes_n=10", "block_bytes_n must be 1024 to 1073741824 (bytes), not 10"),
    ("zen5,block_bytes_1=1073741825", "block_bytes_1 must be 1024 to 1073741824 (bytes), not 1073741825"),
    ("zen5,stream_prefetch=1048577", "stream_prefetch must be at most 1048576 (bytes), not 1048577"),
    # beyond int64: strtoll's overflow, not a wrapped or clamped value
    ("zen5,stream_prefetch_i8=99999999999999999999", "'stream_prefetch_i8=99999999999999999999' is not key=value"),
    ("zen5,gather_ahead=65", "gather_ahead must be at most 64, not 65"),
    ("zen5,panel_prefetch_next=2", "panel_prefetch_next must be 0 or 1, not 2"),
    ("zen5,few_rows=65", "few_rows must be at most 64, not 65"),
    ("zen3,gather_rows_f32=2", "gather_rows_f32 must be 0 or 1, not 2"),
    ("zen4,gather_l2=2", "gather_l2 must be 0 or 1, not 2"),
    ("zen4,few_rows_l2=2", "few_rows_l2 must be 0 or 1, not 2"),
    ("zen4,batch1_quarters=2", "batch1_quarters must be 0 or 1, not 2"),
])
def test_bad_cpu_class_specs_are_refused(spec, message):
    before = saehook.cpu_info()
    with pytest.raises(ValueError, match=re.escape(message)):
        saehook.set_cpu_class(spec)
    assert saehook.cpu_info() == before  # nothing changed


def test_the_unknown_key_error_lists_every_key_cpu_info_reports():
    with pytest.raises(ValueError) as e:
        saehook.set_cpu_class("zen5,foo=1")
    listed = str(e.value).split("keys: ")[1].split(", ")
    assert listed == list(saehook.cpu_info()["params"])
    for key, value in saehook.cpu_info()["params"].items():  # each key is accepted with its own value
        saehook.set_cpu_class(f"auto,{key}={value}")
    saehook.set_cpu_class("auto")


def _child_info(env_value: str) -> tuple:
    env = dict(os.environ, SAEHOOK_CPU_CLASS=env_value)
    p = subprocess.run([sys.executable, "-c", "import json, saehook; print(json.dumps(saehook.cpu_info()))"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_env_override_at_start_up():
    info, _ = _child_info("spr,stream_prefetch=2048")
    assert info["class"] == "spr" and info["params"]["stream_prefetch"] == 2048
    info, err = _child_info("nonsense")
    assert info["class"] == info["detected_class"]
    assert "SAEHOOK_CPU_CLASS ignored: unknown CPU class 'nonsense'" in err


@pytest.mark.parametrize("enc", ["f32", "f16", "bf16", "int8"])
def test_every_class_encodes_as_the_reference(spec, isa, enc):
    for d_model, d_sae, k, n in SHAPES:
        sae = make_sae(d_model, d_sae, k, seed=d_sae)
        sae = sae if enc == "f32" else sae.to_dtype(enc, dec_dtype="f32")
        x = np.random.default_rng(n).standard_normal((n, d_model)).astype(np.float32)
        vals, idx = sae.encode(x)
        ref.assert_topk_matches(vals, idx, ref.activate(sae, ref.preacts(sae, x)), k, TOL)
        got, want = sae.preacts(x), ref.preacts(sae, x)
        W_enc, _ = ref.sae_dense(sae)
        bound = np.abs(ref.kernel_operand(sae, x, isa)) @ np.abs(W_enc).T  # the rounding error's bound
        assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-6), (spec, isa, enc, d_model, d_sae, n)


@pytest.mark.parametrize("dec", ["f32", "bf16"])
def test_every_class_decodes_as_the_reference(spec, isa, dec):
    for d_model in (45, 981):
        sae = make_sae(d_model, 300, 20)
        sae = sae if dec == "f32" else sae.to_dtype("f32", dec_dtype=dec)
        rng = np.random.default_rng(d_model)
        idx = np.stack([rng.choice(300, 20, replace=False) for _ in range(4)]).astype(np.int32)
        vals = rng.standard_normal((4, 20)).astype(np.float32)
        idx[1, 15:] = -1
        np.testing.assert_allclose(sae.decode(vals, idx), ref.decode(sae, vals, idx), rtol=1e-5, atol=1e-5)
