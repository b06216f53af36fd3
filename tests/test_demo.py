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
