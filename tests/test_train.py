"""The Top-K SAE trainer on activations with a planted sparse dictionary."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from saehook.workflows.train import shuffled_batches, train_sae  # noqa: E402

D, M, K = 32, 128, 4


def planted(n_batches, batch=256, seed=0):
    """x = sum of K of M unit directions with positive coefficients, plus an offset."""
    fixed = np.random.default_rng(1234)  # the same dictionary for every stream
    dictionary = fixed.standard_normal((M, D))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    offset = fixed.standard_normal(D)
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        idx = np.stack([rng.choice(M, K, replace=False) for _ in range(batch)])
        coef = rng.uniform(1, 3, (batch, K))
        yield (np.einsum("nk,nkd->nd", coef, dictionary[idx]) + offset).astype(np.float32)


def fve(sae, x):
    xh = sae.reconstruct(x)
    return 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_trainer_recovers_a_planted_dictionary():
    sae = train_sae(planted(600), D, M, K, steps=600, lr=1e-2, dead_tokens=5000)
    held_out = next(planted(1, batch=2000, seed=9))
    assert fve(sae, held_out) > 0.8  # an untrained SAE explains about 0.3
    fixed = np.random.default_rng(1234)
    atoms = fixed.standard_normal((M, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    best = (atoms @ sae.arrays()["W_dec"].T).max(axis=1)  # each planted atom's closest decoder row
    assert np.mean(best > 0.9) > 0.9
    W = sae.arrays()["W_dec"]
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, rtol=1e-4)  # unit-norm decoder rows
    assert sae.activation == "topk_relu" and sae.subtract_b_dec and sae.k == K


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    full = train_sae(planted(60), D, M, K, steps=60, lr=3e-3)
    ck = str(tmp_path / "ck.pt")
    train_sae(planted(60), D, M, K, steps=30, lr=3e-3, checkpoint=ck, checkpoint_every=10)
    resumed = train_sae(planted(60), D, M, K, steps=60, lr=3e-3, checkpoint=ck, checkpoint_every=10)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(resumed.arrays()[name], full.arrays()[name], rtol=1e-5, atol=1e-6)


def test_shuffled_batches_keep_every_row_once():
    blocks = [np.full((10, 2), i, np.float32) for i in range(50)]
    out = np.concatenate(list(shuffled_batches(blocks, batch=25, buffer=100)))
    assert sorted(out[:, 0].tolist()) == sorted(np.repeat(np.arange(50), 10).tolist())
    assert not np.array_equal(out[:10, 0], np.zeros(10))  # consecutive rows of one block are spread


def test_cli_train_on_a_model(tmp_path, capsys):
    import json

    import saehook
    from saehook.cli import main

    pytest.importorskip("transformers")
    import gguf_models as gm

    gm.build_hf_model(seed=1).save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    (tmp_path / "docs.txt").write_text("\n".join("".join(rng.choice(list("abcdefgh xyz"), 40)) for _ in range(20)))
    argv = ["train", str(tmp_path / "hf"), "--layer", "1", "--data", str(tmp_path / "docs.txt"), "--d-sae", "512",
            "--k", "16", "--steps", "120", "--batch", "64", "--lr", "3e-3", "--out", str(tmp_path / "s.safetensors"),
            "--checkpoint", str(tmp_path / "ck.pt"), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    sae = saehook.load(tmp_path / "s.safetensors")
    assert sae.layer == 1 and sae.d_sae == 512 and sae.k == 16
    assert res["fve"] > 0.5 and res["l0"] <= 16
