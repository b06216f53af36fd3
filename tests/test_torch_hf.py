"""torch custom ops and the transformers integration, on a tiny random Qwen3 built in-process."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import saehook
import saehook.hf as shf
import saehook.torch_ops as ops

import reference as ref
from conftest import make_sae

LAYER = 1


def test_custom_ops_match_sae_methods_and_trace():
    sae = make_sae(32, 256, 8)
    x = torch.randn(5, 32)
    v, i = ops.encode(sae, x)
    v2, i2 = sae.encode(x)
    assert torch.equal(i, i2) and torch.equal(v, v2)
    assert torch.allclose(ops.decode(sae, v, i), sae.decode(v, i))
    h = x.clone()
    st = saehook.Steering(sae).clamp(int(i[0, 0]), 3.0).add(4, 1.0)
    ops.steer_(st, h)
    np.testing.assert_allclose(h.numpy(), st.apply(x.numpy().copy()), rtol=1e-6, atol=1e-6)
    # The fake implementations let torch.compile trace the ops (eager backend: no C compiler needed).
    f = torch.compile(lambda t: ops.decode(sae, *ops.encode(sae, t)), backend="eager", fullgraph=True)
    assert torch.allclose(f(x), sae.reconstruct(x), atol=1e-6)
    torch.library.opcheck(torch.ops.saehook.encode.default, (x, sae.handle, 8), test_utils=("test_schema", "test_faketensor"))


def test_encode_gradient_is_encoder_rows():
    sae = make_sae(24, 128, 6, activation="topk_relu")
    x = torch.randn(3, 24, requires_grad=True)
    vals, idx = ops.encode(sae, x)
    w = torch.randn_like(vals)
    (vals * w).sum().backward()
    W_enc, _ = ref.sae_dense(sae)
    expect = np.zeros((3, 24))
    for r in range(3):
        for j in range(6):
            if idx[r, j] >= 0:
                expect[r] += w[r, j].item() * W_enc[idx[r, j]]
    np.testing.assert_allclose(x.grad.numpy(), expect, rtol=1e-5, atol=1e-6)


def _sae_for(model, **kw):
    return make_sae(model.config.hidden_size, 512, 16, seed=7, **kw)


def test_capture_equals_encode_of_hidden_states(tiny_qwen3):
    sae = _sae_for(tiny_qwen3)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        with shf.capture(tiny_qwen3, {LAYER: sae}, residuals=True) as rec:
            out = tiny_qwen3(ids, output_hidden_states=True)
    hs = out.hidden_states[LAYER + 1].reshape(-1, sae.d_model)
    np.testing.assert_allclose(rec[LAYER].residuals, hs.numpy(), rtol=1e-6, atol=1e-6)
    v, i = sae.encode(hs)
    np.testing.assert_array_equal(rec[LAYER].indices, i.numpy())
    np.testing.assert_array_equal(rec[LAYER].values, v.numpy())
    assert rec[LAYER].shapes == [(2, 9)]


def test_steering_changes_logits_as_the_formula_says(tiny_qwen3):
    model = tiny_qwen3
    sae = _sae_for(model)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        clean = model(ids, output_hidden_states=True)
    h = clean.hidden_states[LAYER + 1][0].numpy()
    v, i = sae.encode(h)
    st = saehook.Steering(sae, layer=LAYER).clamp(int(i[3, 0]), 6.0).ablate(int(i[0, 1])).add(5, 2.0)
    with torch.no_grad(), shf.steer(model, st):
        steered = model(ids).logits
    # Oracle: the formula in numpy, injected with a plain forward hook returning the result.
    expect_h = ref.steer(sae, h, [(o.op, o.feature, o.value, o.normalize) for o in st.ops])
    layer_mod = shf.decoder_layers(model)[LAYER]
    handle = layer_mod.register_forward_hook(
        lambda m, a, out: torch.from_numpy(expect_h.astype(np.float32)).reshape(out.shape))
    try:
        with torch.no_grad():
            oracle = model(ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(steered, clean.logits, atol=1e-3)
    torch.testing.assert_close(steered, oracle, rtol=1e-4, atol=1e-4)
    # Leaving the block removes the hook.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, clean.logits)


def test_capture_reads_the_residual_before_steering_in_either_order(tiny_qwen3):
    model = tiny_qwen3
    sae = _sae_for(model)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        clean = model(ids, output_hidden_states=True).hidden_states[LAYER + 1].reshape(-1, sae.d_model)
    st = saehook.Steering(sae, layer=LAYER).add(3, 40.0)
    with torch.no_grad():
        with shf.steer(model, st), shf.capture(model, {LAYER: sae}, residuals=True) as inner:
            model(ids)
        with shf.capture(model, {LAYER: sae}, residuals=True) as outer, shf.steer(model, st):
            model(ids)
    for rec in (inner, outer):
        np.testing.assert_allclose(rec[LAYER].residuals, clean.numpy(), rtol=1e-6, atol=1e-6)


def test_steer_positions_in_generate(tiny_qwen3):
    model = tiny_qwen3
    sae = _sae_for(model)
    ids = torch.randint(0, 256, (1, 5))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = model.generate(ids, **gen)
        with shf.steer(model, saehook.Steering(sae, layer=LAYER, positions="generated").add(3, 50.0)):
            later = model.generate(ids, **gen)
        with shf.steer(model, saehook.Steering(sae, layer=LAYER, positions="prompt").add(3, 50.0)):
            first = model.generate(ids, **gen)
    # Steering only generated positions leaves the first new token (computed from the prompt) alone.
    assert later[0, 5] == base[0, 5]
    assert not torch.equal(first, base)


def test_hf_errors(tiny_qwen3):
    with pytest.raises(ValueError, match="d_model mismatch"):
        with shf.capture(tiny_qwen3, {0: make_sae(32, 64, 4)}):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with shf.steer(tiny_qwen3, saehook.Steering(_sae_for(tiny_qwen3), layer=99).add(1, 1.0)):
            pass
