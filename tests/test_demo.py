"""The shipped demo: model and SAE load, the recorded SAE quality is reproduced, and steering
the demo feature raises the probability of the tokens it stands for."""
import json
import os

import pytest

pytest.importorskip("llama_cpp")

import saehook  # noqa: E402
from saehook import demo  # noqa: E402


def _info():
    with open(os.path.join(demo.DATA, "demo_model.json")) as f:
        return json.load(f)


def test_shipped_files_load():
    sae = saehook.load(demo.SAE_FILE)
    rec = _info()
    assert (sae.layer, sae.d_sae, sae.k) == (rec["sae"]["layer"], rec["sae"]["d_sae"], rec["sae"]["k"])
    assert rec["loss_curve"][-1]["val_loss"] < rec["loss_curve"][0]["val_loss"]


def test_recorded_fve_is_reproduced():
    from saehook.demo.build import corpus
    from saehook.engines import LlamaEngine
    from saehook.workflows.evaluate import evaluate

    rec = _info()["sae"]["held_out_metrics"]
    sae = saehook.load(demo.SAE_FILE)
    held = [d for i, d in enumerate(corpus()) if i % 10 == 0]
    eng = LlamaEngine(demo.MODEL, n_ctx=300, logits_all=True)
    got = evaluate(eng, sae, sae.layer, held, max_tokens=256)  # the recorded run used transformers, f32
    assert got["n_tokens"] == rec["n_tokens"]
    assert abs(got["fve"] - rec["fve"]) < 0.03 and got["fve"] > 0.5
    assert abs(got["l0"] - rec["l0"]) < 0.5


def test_steering_the_demo_feature_raises_its_tokens(capsys):
    out = demo.run(max_tokens=12)
    assert out["p_steered"] > 2 * out["p_clean"]
    printed = capsys.readouterr().out
    assert "top features per token" in printed and "steered:" in printed


@pytest.fixture(scope="module")
def demo_hf(tmp_path_factory):
    pytest.importorskip("transformers")
    os.environ["SAEHOOK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield demo.hf_model_dir()
    finally:
        os.environ.pop("SAEHOOK_CACHE")


def test_transformers_copy_matches_the_gguf(demo_hf):
    """The transformers copy built from the shipped GGUF tokenizes like llama.cpp and gives the
    same features (engines compared on the same text)."""
    from saehook.demo.build import corpus
    from saehook.engines import HFEngine, LlamaEngine

    hf, ll = HFEngine(demo_hf), LlamaEngine(demo.MODEL)
    docs = corpus()[:40]
    assert all(hf.tokenize(d) == ll.tokenize(d) for d in docs)  # same ids for real documents
    sae = saehook.load(demo.SAE_FILE)
    tokens = ll.tokenize(docs[5])[:128]
    _, va, ia = hf.features(tokens, {sae.layer: sae})[sae.layer]
    _, vb, ib = ll.features(tokens, {sae.layer: sae})[sae.layer]
    top1 = (ia[:, 0] == ib[:, 0]).mean()  # llama.cpp keeps its KV cache in f16: near-ties may flip
    assert top1 > 0.95, top1
    assert demo.hf_model_dir() == demo_hf  # built once, then found


def test_cli_runs_on_the_transformers_copy(demo_hf, capsys):
    from saehook.cli import main

    assert main(["demo", "--paths"]) == 0
    assert f"hf:   {demo_hf}" in capsys.readouterr().out
    assert main(["features", demo_hf, "--engine", "hf", "--sae", demo.SAE_FILE, "--json", "The with"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["text"] for r in rows] == ["T", "he", " ", "w", "i", "t", "h"]  # as llama.cpp splits it
