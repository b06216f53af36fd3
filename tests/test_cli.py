"""The command line end to end on a tiny model written both as GGUF (llama.cpp engine) and as a
transformers directory (hf engine)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import saehook  # noqa: E402
from saehook.cli import main  # noqa: E402

import gguf_models as gm  # noqa: E402

LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = gm.build_hf_model(seed=3)
    gm.write_gguf(model, d / "m.gguf")
    model.save_pretrained(d / "hf")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((512, 256)) / 16).astype(np.float32)
    sae = saehook.SAE(W, W, k=8, metadata={"layer": LAYER, "hook_point": "resid_post"})
    sae.save(d / "sae.safetensors")
    return d


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_features_same_on_both_engines(setup, capsys, tmp_path):
    d = setup
    text = "cat sat"  # no merge pair of the tiny vocabulary: the same byte tokens for both engines
    a = run_json(capsys, "features", str(d / "m.gguf"), "--sae", str(d / "sae.safetensors"), text, "--json",
                 "--html", str(tmp_path / "f.html"))
    b = run_json(capsys, "features", str(d / "hf"), "--sae", str(d / "sae.safetensors"), text, "--json", "--top", "8")
    assert [r["position"] for r in a["rows"]] == list(range(len(text.encode())))
    assert [r["token"] for r in a["rows"]] == [r["token"] for r in b["rows"]]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["features"][0][0] == rb["features"][0][0]  # same strongest feature per token
        assert abs(ra["features"][0][1] - rb["features"][0][1]) < 1e-2
    page = (tmp_path / "f.html").read_text()
    assert page.count('class="t"') == len(text.encode()) and "rgba(255, 120, 0, 1.000)" in page


def test_steer_changes_the_continuation(setup, capsys):
    d = setup
    out = run_json(capsys, "steer", str(d / "m.gguf"), "--sae", str(d / "sae.safetensors"), "--add", "3=60",
                   "--max-tokens", "6", "--json", "cat")
    assert out["clean_tokens"] != out["steered_tokens"] and 1 <= len(out["clean_tokens"]) <= 6
    hf = run_json(capsys, "steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--add", "3=60",
                  "--max-tokens", "6", "--json", "cat")
    # same greedy continuations (the first tokens: later ones may flip on near-ties between
    # llama.cpp's f16 KV cache and transformers' f32 attention)
    assert hf["clean_tokens"][:2] == out["clean_tokens"][:2] and hf["steered_tokens"][:3] == out["steered_tokens"][:3]


def test_export_cvec(setup, tmp_path, capsys):
    d = setup
    out = tmp_path / "cv.gguf"
    assert main(["export-cvec", str(d / "sae.safetensors"), str(out), "--add", "5=2.5", "--add", "7=-1"]) == 0
    sae = saehook.load(d / "sae.safetensors")
    expect = saehook.Steering(sae).add(5, 2.5).add(7, -1.0).vector()
    r = gguf.GGUFReader(str(out))
    assert [t.name for t in r.tensors] == [f"direction.{LAYER}"]
    np.testing.assert_allclose(np.asarray(r.tensors[0].data), expect, rtol=1e-6)
    assert main(["export-cvec", str(d / "sae.safetensors"), str(out), "--clamp", "5=1"]) == 2
    assert "only add-only" in capsys.readouterr().err


def test_cli_errors(setup, capsys):
    d = setup
    assert main(["steer", str(d / "m.gguf"), "--sae", str(d / "sae.safetensors"), "hello"]) == 2
    assert "no intervention" in capsys.readouterr().err
    assert main(["features", str(d / "m.gguf"), "--sae", str(d / "sae.safetensors"), "--layer", "9", "x"]) == 2
    assert "outside the model" in capsys.readouterr().err


def _identity_sae(tmp_path):
    eye = np.eye(256, dtype=np.float32)
    sae = saehook.SAE(eye, eye, k=256, activation="topk", metadata={"layer": LAYER})  # reconstructs exactly
    sae.save(tmp_path / "identity.safetensors")
    return tmp_path / "identity.safetensors"


@pytest.mark.parametrize("model", ["m.gguf", "hf"])
def test_eval_perfect_and_random_sae(setup, tmp_path, capsys, model):
    d = setup
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "cat sat on a mat"}\n{"text": "dogs run far away"}\n')
    perfect = run_json(capsys, "eval", str(d / model), "--sae", str(_identity_sae(tmp_path)), "--data", str(data), "--json")
    assert perfect["n_tokens"] == 33 and perfect["l0"] == 256
    assert perfect["fve"] > 0.9999 and abs(perfect["ce_increase"]) < 1e-3
    rand = run_json(capsys, "eval", str(d / model), "--sae", str(d / "sae.safetensors"), "--data", str(data), "--json")
    # A random SAE explains little and moves the loss far (a random model's loss can go either way).
    assert rand["fve"] < 0.5 and abs(rand["ce_increase"]) > 0.05 and rand["l0"] == 8
    assert 0 < rand["dead_fraction"] < 1


def test_bench_subcommand_runs_the_kernel_benchmark(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "b.json"
    assert main(["bench", "--shapes", "64x512", "--batches", "1,3", "--k", "8", "--reps", "1", "--no-torch",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} >= {"encode (saehook)", "decode (saehook)", "encode (numpy)"}
