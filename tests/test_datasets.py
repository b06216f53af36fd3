"""capture -> Parquet shards (resumable), stats and compare, end to end on a tiny model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("pyarrow")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import saehook  # noqa: E402
from saehook.workflows import datasets  # noqa: E402
from saehook.cli import main  # noqa: E402
from saehook.engines import open_engine  # noqa: E402

import gguf_models as gm  # noqa: E402

LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    model = gm.build_hf_model(seed=5)
    model.save_pretrained(d / "hf")
    gm.write_gguf(model, d / "m.gguf")
    rng = np.random.default_rng(2)
    W = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    saehook.SAE(W, W, k=6, activation="topk_relu", metadata={"layer": LAYER}).save(d / "sae.safetensors")
    rng = np.random.default_rng(0)
    plain = "abcdefghijklmnopqrstuvw "
    def doc(extra):
        return "".join(rng.choice(list(plain + extra), size=30))
    a = [{"text": doc("xxxxxxxx")} for _ in range(10)]
    b = [{"text": doc("")} for _ in range(9)] + [dict(a[3])]  # B's last document duplicates A's fourth
    for name, docs in (("a.jsonl", a), ("b.jsonl", b)):
        (d / name).write_text("".join(json.dumps(x) + "\n" for x in docs))
    return d


def _capture(d, data, out, *extra):
    return main(["capture", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--data", str(d / data),
                 "--out", str(out), "--shard-docs", "3", *extra])


def test_interrupted_capture_resumes_to_the_same_rows(setup, tmp_path, monkeypatch):
    d = setup
    assert _capture(d, "a.jsonl", tmp_path / "full") == 0
    from saehook.engines import HFEngine

    class Boom(Exception):
        pass

    orig = HFEngine.features
    calls = [0]

    def dies_in_shard_2(self, tokens, saes):  # the 8th document is in shard 2 (documents 6..8)
        calls[0] += 1
        if calls[0] == 8:
            raise Boom()
        return orig(self, tokens, saes)

    monkeypatch.setattr(HFEngine, "features", dies_in_shard_2)
    with pytest.raises(Boom):
        _capture(d, "a.jsonl", tmp_path / "part")
    assert sorted(f for f in os.listdir(tmp_path / "part") if f.startswith("shard-")) == ["shard-00000.parquet", "shard-00001.parquet"]
    monkeypatch.setattr(HFEngine, "features", orig)
    assert _capture(d, "a.jsonl", tmp_path / "part") == 0
    full, part = datasets.FeatureData(str(tmp_path / "full")), datasets.FeatureData(str(tmp_path / "part"))
    assert full.n_tokens == part.n_tokens == 300
    np.testing.assert_array_equal(full.doc_id, part.doc_id)
    for x, y in zip(full.indices, part.indices):
        np.testing.assert_array_equal(x, y)
    # other settings in the same directory are refused instead of mixing captures
    assert _capture(d, "a.jsonl", tmp_path / "part", "--max-tokens", "5") == 2


def test_captured_features_equal_encode(setup, tmp_path):
    d = setup
    _capture(d, "a.jsonl", tmp_path / "c")
    data = datasets.FeatureData(str(tmp_path / "c"))
    eng = open_engine(str(d / "hf"))
    sae = saehook.load(d / "sae.safetensors")
    text = json.loads((d / "a.jsonl").read_text().splitlines()[0])["text"]
    x = eng.residuals(eng.tokenize(text), LAYER)
    vals, idx = sae.encode(x)
    rows = np.flatnonzero(data.doc_id == 0)
    for r, (v, i) in zip(rows, zip(vals, idx)):
        np.testing.assert_array_equal(data.indices[r], i[i >= 0])
        np.testing.assert_allclose(data.values[r], v[i >= 0], rtol=1e-6)


def test_capture_with_and_without_the_prefilter_agree(setup, tmp_path, capsys):
    """`capture` encodes the float32 SAE through the bf16 prefilter by default (--prefilter
    auto): the same features as --prefilter off, values to float32 rounding."""
    d = setup
    assert _capture(d, "a.jsonl", tmp_path / "auto") == 0
    assert _capture(d, "a.jsonl", tmp_path / "off", "--prefilter", "off") == 0
    a, b = datasets.FeatureData(str(tmp_path / "auto")), datasets.FeatureData(str(tmp_path / "off"))
    assert a.n_tokens == b.n_tokens == 300
    for r in range(a.n_tokens):
        np.testing.assert_array_equal(a.indices[r], b.indices[r])
        np.testing.assert_allclose(a.values[r], b.values[r], rtol=1e-5, atol=1e-6)
    from saehook.cli.dataset_commands import load_layers

    assert load_layers(str(d / "sae.safetensors"), None, None, "auto")[LAYER].prefilter == "bf16"
    assert load_layers(str(d / "sae.safetensors"), None, None, "off")[LAYER].prefilter is None


def test_stats_and_compare_find_the_planted_difference(setup, tmp_path, capsys):
    d = setup
    _capture(d, "a.jsonl", tmp_path / "A")
    _capture(d, "b.jsonl", tmp_path / "B")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--json", "--html", str(tmp_path / "c.html")]) == 0
    res = json.loads(capsys.readouterr().out)
    top = res["separating_features"][0]
    assert top["freq_a"] > top["freq_b"]
    # The feature that separates A from B is the one 'x' tokens (only in A) activate.
    eng = open_engine(str(d / "hf"))
    sae = saehook.load(d / "sae.safetensors")
    xs = eng.residuals(eng.tokenize("xxxx"), LAYER)
    fired_on_x = set(sae.encode(xs)[1][1:].ravel().tolist())
    assert top["feature"] in fired_on_x
    assert {"doc_b": 9, "doc_a": 3} == {k: v for k, v in res["redundant_docs_b"][0].items() if k != "similarity"}
    assert "<table>" in (tmp_path / "c.html").read_text()
    assert main(["stats", str(tmp_path / "A"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["summary"]["tokens"] == 300 and 0 < st["summary"]["dead_fraction"] < 1
    f0 = st["features"][0]
    assert f0["top_contexts"][0]["context"].count("[") == 1
    assert os.path.exists(tmp_path / "A" / f"stats-layer{LAYER}.html")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "A" / f"stats-layer{LAYER}.parquet").to_pydict()
    assert len(table["feature"]) == 256 and sum(table["count"]) == 300 * 6  # k = 6 features per token
    assert table["dead"].count(True) / 256 == st["summary"]["dead_fraction"]


def test_classify_separates_planted_classes(setup, tmp_path, capsys):
    d = setup
    rng = np.random.default_rng(7)
    docs = []
    for i in range(40):
        letters = "abcdefghijkl " if i % 2 == 0 else "mnopqrstuvw "
        docs.append({"text": "".join(rng.choice(list(letters), size=24)), "label": "first" if i % 2 == 0 else "second"})
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    assert main(["capture", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--data", str(tmp_path / "l.jsonl"),
                 "--out", str(tmp_path / "L")]) == 0
    capsys.readouterr()
    assert main(["classify", "train", str(tmp_path / "L"), "--probe", str(tmp_path / "p.npz"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_test"] == 10 and res["accuracy"] >= 0.9 and res["macro_f1"] >= 0.9
    assert main(["classify", "predict", str(tmp_path / "L"), "--probe", str(tmp_path / "p.npz"),
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert np.mean([p["label"] == docs[p["doc_id"]]["label"] for p in preds]) >= 0.9


def test_feature_reward_has_trl_signature(setup):
    from saehook.probe import feature_reward

    d = setup
    eng = open_engine(str(d / "hf"))
    sae = saehook.load(d / "sae.safetensors")
    _, vals, idx = eng.features(eng.tokenize("xxxx"), {LAYER: sae})[LAYER]
    f = int(idx[-1, 0])  # the strongest feature on an 'x' token
    reward = feature_reward(eng, sae, LAYER, {f: 1.0})
    scores = reward(completions=["xxxxxxxx", "abcabcab"], prompts=["p", "p"])
    assert scores[0] > scores[1] >= 0
    expect = float(np.where(idx == f, vals, 0).sum()) / 4
    assert abs(reward([[{"role": "assistant", "content": "xxxx"}]])[0] - expect) < 1e-6


def test_capture_on_llama_matches_transformers(setup, tmp_path):
    pytest.importorskip("llama_cpp")
    d = setup
    rng = np.random.default_rng(4)
    # letters that form none of the tiny vocabulary's merges: both engines see the same byte tokens
    docs = ["".join(rng.choice(list("abcdfgjklmopqrsuvwxyz"), 30)) for _ in range(7)]
    (tmp_path / "d.txt").write_text("\n".join(docs))
    for model, out in (("hf", "H"), ("m.gguf", "G")):
        assert main(["capture", str(d / model), "--sae", str(d / "sae.safetensors"), "--data", str(tmp_path / "d.txt"),
                     "--out", str(tmp_path / out)]) == 0
    h, g = datasets.FeatureData(str(tmp_path / "H")), datasets.FeatureData(str(tmp_path / "G"))
    np.testing.assert_array_equal(h.doc_id, g.doc_id)
    np.testing.assert_array_equal(h.position, g.position)
    same_top = np.mean([x[0] == y[0] for x, y in zip(h.indices, g.indices)])
    assert same_top > 0.95  # llama.cpp's f16 KV cache vs f32 attention: near-ties may swap
