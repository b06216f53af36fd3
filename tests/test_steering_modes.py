"""Steering modes (issue 16): cap, rescale, conditions (When, &, |), latches, stop_when, position
windows and the JSON spec, against numpy references written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import saehook
from saehook import When
from saehook.steering_spec import SpecError, load_spec, steering_to_json

import reference as ref
from conftest import make_sae

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the numpy reference: formulas, conditions and latches, one row at a time ----
def _unit(sae, f):
    _, W_dec = ref.sae_dense(sae)
    return W_dec[f] / np.linalg.norm(W_dec[f])


def _holds(c, z, latch, slot):
    """Condition c on a row with activations z ({feature: value}); latch: {(slot, leaf): bool}."""
    if isinstance(c, When):
        v = (c.above is None or z.get(c.feature, 0.0) > c.above) and \
            (c.below is None or z.get(c.feature, 0.0) < c.below)
        if c.latch:
            v = v or latch.get((slot, c), False)
            latch[(slot, c)] = v
        return v
    a, b = _holds(c.a, z, latch, slot), _holds(c.b, z, latch, slot)
    return (a and b) if c.kind == "and" else (a or b)


def ref_steer(st, h, *, mask=None, latch=None, slots=None, codes=None, coefs=None):
    """(steered h in float64, per row the list of stop conditions that held). z comes from the
    SAE's own encode of the unsteered rows (the encode is tested in test_kernels). coefs (a list)
    receives (row, feature, c, unit) for every change h[row] += c * direction."""
    _, W_dec = ref.sae_dense(st.sae)
    h = np.asarray(h, np.float64).reshape(-1, st.sae.d_model).copy()
    vals, idx = codes if codes is not None else st.sae.encode(h.astype(np.float32))
    latch = {} if latch is None else latch
    stops = []
    for r in range(h.shape[0]):
        slot = 0 if slots is None else int(slots[r])
        z = {int(i): float(v) for v, i in zip(vals[r], idx[r]) if i >= 0}
        # every condition is evaluated on every row (latches follow the sequence), masked or not
        cond = {id(o): _holds(o.when, z, latch, slot) for o in st.ops if o.when is not None}
        stops.append([j for j, c in enumerate(st.stops) if _holds(c, z, latch, slot)])
        if mask is not None and not mask[r]:
            continue
        for o in st.ops:
            if o.when is not None and not cond[id(o)]:
                continue
            if o.op in ("cap", "rescale"):
                u = _unit(st.sae, o.feature)
                p = h[r] @ u
                c = (np.clip(p, o.value2, o.value) - p) if o.op == "cap" else (o.value - 1) * p
                h[r] += c * u
                if coefs is not None:
                    coefs.append((r, o.feature, c, True))
            else:
                d = W_dec[o.feature] / np.linalg.norm(W_dec[o.feature]) if o.normalize else W_dec[o.feature]
                zf = z.get(o.feature, 0.0)
                c = {"add": o.value, "clamp": o.value - zf, "scale": (o.value - 1) * zf, "ablate": -zf}[o.op]
                h[r] += c * d
                if coefs is not None:
                    coefs.append((r, o.feature, c, o.normalize))
    return h, stops


def _rows(d, n=12, seed=1, scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# ---- formulas ----
@pytest.mark.parametrize("dec_layout", ["rows", "cols"])
def test_cap_and_rescale_match_numpy(dec_layout):
    sae = make_sae(48, 192, 8, dec_layout=dec_layout, seed=3)
    x = _rows(48, 20)
    u = [_unit(sae, f) for f in (5, 9, 11)]
    p = [x.astype(np.float64) @ v for v in u]
    # bounds inside the spread of p, so some rows move and some do not
    hi, lo = float(np.median(p[0])), float(np.percentile(p[1], 30))
    st = (saehook.Steering(sae).cap(5, max=hi).cap(9, min=lo).cap(11, max=0.5, min=-0.5)
          .rescale(5, 0.0).rescale(9, 2.5).add(3, 1.5))
    assert not st.needs_encode and not st.additive_only
    got = st.apply(x.copy())
    want, _ = ref_steer(st, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    moved = np.abs(got - x).max(axis=1)
    assert (moved > 1e-3).all()
    # cap alone: p within the bound after, rows already inside untouched (bitwise)
    y = saehook.Steering(sae).cap(5, max=hi).apply(x.copy())
    p_after = y.astype(np.float64) @ u[0]
    assert (p_after <= hi + 1e-5).all()
    inside = p[0] <= hi
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(y[inside], x[inside])
    np.testing.assert_allclose(p_after[~inside], hi, atol=1e-5)
    # rescale 0 removes the direction
    y = saehook.Steering(sae).rescale(9, 0.0).apply(x.copy())
    np.testing.assert_allclose(y.astype(np.float64) @ u[1], 0.0, atol=1e-5)


def _basis_sae(d=8, m=4, zero_feature=None):
    """An SAE whose decoder rows are 2 * e_f: u_f = e_f exactly, so p_f = h[f] exactly."""
    W_dec = np.zeros((m, d), np.float32)
    for f in range(m):
        W_dec[f, f] = 2.0
    if zero_feature is not None:
        W_dec[zero_feature] = 0.0
    W_enc = np.eye(m, d, dtype=np.float32)
    return saehook.SAE(W_enc, W_dec, k=2)


def test_cap_exactly_at_the_bound_leaves_the_row_alone():
    sae = _basis_sae()
    x = np.array([[3.0, -2.0, 0.5, 7.0, 1, 1, 1, 1]], np.float32)
    y = saehook.Steering(sae).cap(0, max=3.0).cap(1, min=-2.0).cap(2, max=0.5, min=0.5).apply(x.copy())
    np.testing.assert_array_equal(y, x)
    y = saehook.Steering(sae).cap(0, max=2.0).cap(1, min=-1.0).cap(3, max=1.0, min=-1.0).apply(x.copy())
    np.testing.assert_array_equal(y, [[2.0, -1.0, 0.5, 1.0, 1, 1, 1, 1]])


def test_ops_apply_in_order_on_the_current_row():
    sae = _basis_sae()
    x = np.zeros((1, 8), np.float32)
    # add pushes p_0 to 10 * 2 = 20; the cap after it sees 20 and brings it to 1
    y = saehook.Steering(sae).add(0, 10.0).cap(0, max=1.0).apply(x.copy())
    np.testing.assert_allclose(y[0, 0], 1.0)
    y = saehook.Steering(sae).cap(0, max=1.0).add(0, 10.0).apply(x.copy())
    np.testing.assert_allclose(y[0, 0], 20.0)


def test_bad_bounds_and_zero_directions_are_refused():
    sae = _basis_sae(zero_feature=2)
    st = saehook.Steering(sae)
    with pytest.raises(ValueError, match="min 2 > max 1"):
        st.cap(0, max=1.0, min=2.0)
    with pytest.raises(ValueError, match="give max= and/or min="):
        st.cap(0)
    with pytest.raises(ValueError, match="max is not finite"):
        st.cap(0, max=float("nan"))
    with pytest.raises(IndexError, match="out of range"):
        st.cap(9, max=1.0)
    x = np.ones((2, 8), np.float32)
    for bad in (saehook.Steering(sae).cap(2, max=0.0), saehook.Steering(sae).rescale(2, 0.5)):
        with pytest.raises(ValueError, match="feature 2 has a zero decoder direction"):
            bad.apply(x.copy())
    # The C API refuses what bypasses the Python checks (items built by hand).
    items = saehook.Steering(sae).cap(0, max=1.0).items()
    items["value2"] = 3.0
    with pytest.raises(ValueError, match=r"steering item 0: cap of feature 0 has min 3\.0+ > max 1\.0+"):
        saehook._core.steer(sae._handle, x.ctypes.data, 2, 8, items.ctypes.data, 1, 0, 0, 0, 0, 0, 0)
    items["value2"], items["value"] = -np.inf, np.inf
    with pytest.raises(ValueError, match="has neither a max nor a min"):
        saehook._core.steer(sae._handle, x.ctypes.data, 2, 8, items.ctypes.data, 1, 0, 0, 0, 0, 0, 0)
    items["value"] = np.nan
    with pytest.raises(ValueError, match="cap max of feature 0 is nan"):
        saehook._core.steer(sae._handle, x.ctypes.data, 2, 8, items.ctypes.data, 1, 0, 0, 0, 0, 0, 0)


def test_no_nan_is_ever_produced():
    sae = make_sae(32, 64, 4, seed=5)
    x = np.concatenate([_rows(32, 4, scale=1e30), np.zeros((2, 32), np.float32), _rows(32, 2, scale=1e-30)])
    st = (saehook.Steering(sae).cap(1, max=0.0).cap(2, min=-1e-20).rescale(3, 0.0).rescale(4, 1e3)
          .cap(5, max=1e30, min=-1e30).clamp(6, 0.0, when=When(7, above=0.0)))
    y = st.apply(x.copy())
    assert np.isfinite(y).all()
    with pytest.raises(ValueError, match="NaN"):
        st.apply(np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        saehook.Steering(sae).rescale(1, float("inf"))
    with pytest.raises(ValueError, match="finite number"):
        When(1, above=float("nan"))


# ---- conditions and latches ----
def _conditional(sae, vals, idx):
    """A Steering whose conditions split the rows (on the SAE and rows of the test below)."""
    a, b, c, e = (int(f) for f in np.bincount(idx[idx >= 0], minlength=sae.d_sae).argsort()[::-1][:4])
    ta, tb, tc = 0.0, 0.0, 6.5
    st = (saehook.Steering(sae)
          .clamp(a, 0.0, when=When(b, above=tb))
          .add(e, 2.0, when=When(a, above=ta) & When(c, below=tc))
          .cap(b, max=0.0, when=When(a, below=ta) | When(c, above=tc, below=tc + 10.0))
          .rescale(c, 0.0, when=When(e, above=0.0, latch=True))
          .scale(e, 3.0)
          .stop_when(When(c, above=tc, latch=False), When(a, above=ta) & When(b, above=tb)))
    return st


def test_conditions_match_the_reference_loop():
    sae = make_sae(40, 160, 10, seed=11)
    x = _rows(40, 30, seed=4)
    vals, idx = sae.encode(x)
    st = _conditional(sae, vals, idx)
    mask = np.random.default_rng(2).random(30) < 0.7
    got = x.copy()
    fired = st.apply_report(got, mask=mask)
    want, stops = ref_steer(st, x, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    si = st.stop_items()
    for r in range(30):
        assert [j for j, t in enumerate(si) if fired[r, t]] == stops[r], f"row {r}"
    # each condition both held and failed somewhere, and the mask skipped some rows
    op_rows = [t for t, it in enumerate(st.items()) if it["op"] < 6]
    applied = fired[:, op_rows]
    assert applied.any(axis=0).all() and (~applied[:, :4]).any(axis=0).all()
    assert (~fired[~mask][:, op_rows]).all()


def test_latches_hold_per_sequence_across_calls():
    sae = make_sae(40, 160, 10, seed=12)
    x = _rows(40, 24, seed=6)
    vals, idx = sae.encode(x)
    g = int(idx[5, 0])  # a feature that fires on row 5 of the stream
    t = float(vals[5, 0]) - 1e-3
    st = (saehook.Steering(sae).add(7, 4.0, when=When(g, above=t, latch=True))
          .rescale(8, 0.0, when=When(g, above=t, latch=True) & When(3, below=1e9)))
    # two sequences interleaved, fed in three calls of 8 rows (rows in token order per sequence)
    slots = np.array([0, 1] * 12, np.int32)
    state = saehook.SteeringState(st, n_slots=2)
    got = x.copy()
    for c in range(3):
        st.apply(got[8 * c: 8 * (c + 1)], state=state, slots=slots[8 * c: 8 * (c + 1)])
    want, _ = ref_steer(st, x, slots=slots)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    z = np.array([dict(zip(i, v)).get(g, 0.0) for v, i in zip(vals, idx)])
    first = {s: np.flatnonzero((z > t) & (slots == s)) for s in (0, 1)}
    assert len(first[1]) and first[1][0] == 5 and first[1][0] < 20  # it latched mid-stream
    changed = np.abs(got - x).max(axis=1) > 1e-4
    expect_on = np.zeros(24, bool)
    for s in (0, 1):
        if len(first[s]):
            expect_on |= (slots == s) & (np.arange(24) >= first[s][0])
    np.testing.assert_array_equal(changed, expect_on)
    # without a state the latches hold within one call, per slot
    one = x.copy()
    st.apply(one, slots=slots)
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)
    # a slot outside the state is refused; reset() forgets a slot
    with pytest.raises(IndexError, match=r"row_slot\[0\] = 2 is outside \[0, 2\)"):
        st.apply(x.copy(), state=state, slots=np.full(24, 2))
    assert state.latch.any()
    state.reset(1)
    assert not state.latch[1].any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PROT_NONE mappings as on Linux")
def test_add_cap_rescale_without_when_read_no_encoder(tmp_path):
    """The encoder weights are a PROT_NONE mapping: reading them kills the process."""
    script = tmp_path / "noenc.py"
    script.write_text("""
import mmap, sys
import numpy as np
import saehook
d, m = 16, 64
buf = mmap.mmap(-1, d * m * 4, prot=0)  # PROT_NONE
W_enc = np.frombuffer(buf, dtype=np.float32).reshape(m, d)
W_dec = np.random.default_rng(0).standard_normal((m, d)).astype(np.float32)
sae = saehook.SAE(W_enc, W_dec, k=4)
x = np.random.default_rng(1).standard_normal((3, d)).astype(np.float32)
st = saehook.Steering(sae).add(1, 2.0).cap(2, max=0.1).rescale(3, 0.0)
if sys.argv[1] == "clamp":
    st.clamp(4, 0.0)
st.apply(x)
print("ok")
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    ok = subprocess.run([sys.executable, str(script), "plain"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr[-2000:]
    # the control: an op that needs the encode touches the mapping and dies
    bad = subprocess.run([sys.executable, str(script), "clamp"], capture_output=True, text=True, env=env)
    assert bad.returncode < 0, (bad.returncode, bad.stderr[-2000:])  # killed by the fault, not an exception


def test_item_list_errors_name_the_item():
    sae = make_sae(16, 64, 4)
    x = _rows(16, 2)
    items = saehook.Steering(sae).add(1, 1.0, when=When(2, above=0.0)).items()
    assert list(items["op"]) == [6, 0] and list(items["when"]) == [0, 1]

    def run(it, **kw):
        saehook._core.steer_ex(sae._handle, x.ctypes.data, 2, 16, it.ctypes.data, len(it), 0, 0, 0, 0,
                               kw.get("latch", 0), kw.get("slots", 0), kw.get("n_slots", 0), 0, 0, 0)

    bad = items.copy()
    bad["when"][1] = 2
    with pytest.raises(ValueError, match="steering item 1: when = 2 does not name a condition item"):
        run(bad)
    bad = items.copy()
    bad["latch"][1] = 1
    with pytest.raises(ValueError, match="steering item 1: latch is a property of condition items"):
        run(bad)
    both = saehook.Steering(sae).add(1, 1.0, when=When(2, above=0.0) & When(3, below=1.0)).items()
    assert list(both["op"]) == [6, 7, 8, 0]
    bad = both.copy()
    bad["arg_b"][2] = 3
    with pytest.raises(ValueError, match="steering item 2: arg 3 is not an earlier condition item"):
        run(bad)
    bad = items.copy()
    bad["feature"][0] = 64
    with pytest.raises(IndexError, match="steering feature 64 is out of range"):
        run(bad)
    slots = np.array([0, 2], np.int32)
    latch = np.zeros((2, 2), np.uint8)
    with pytest.raises(IndexError, match=r"row_slot\[1\] = 2 is outside \[0, 2\)"):
        run(items, latch=latch.ctypes.data, slots=slots.ctypes.data, n_slots=2)
    with pytest.raises(ValueError, match="give above= and/or below="):
        When(3)
    with pytest.raises(IndexError, match="condition feature 99"):
        saehook.Steering(sae).add(1, 1.0, when=When(99, above=0.0))
    with pytest.raises(TypeError, match="conditions combine with conditions"):
        When(1, above=0.0) & 3


def test_positions_windows():
    sae = make_sae(16, 64, 4)
    st = saehook.Steering(sae, positions=(2, 5)).add(1, 1.0)
    np.testing.assert_array_equal(st.position_mask(np.arange(7), False), [0, 0, 1, 1, 1, 0, 0])
    assert list(saehook.Steering(sae, positions=(3, None)).position_mask(np.arange(5), True)) == [0, 0, 0, 1, 1]
    assert list(saehook.Steering(sae, positions="generated").position_mask(np.arange(3), [0, 1, 1])) == [0, 1, 1]
    for bad in ((5, 2), (-1, 3), (1.5, 3), "middle"):
        with pytest.raises(ValueError, match="positions must be"):
            saehook.Steering(sae, positions=bad)


# ---- JSON spec ----
def test_json_spec_round_trip(tmp_path):
    sae = make_sae(16, 64, 4, metadata={"layer": 1})
    spec = {"layer": 1, "positions": {"from": 2, "to": 9}, "ops": [
        {"op": "cap", "feature": 3, "max": 3.0},
        {"op": "cap", "feature": 4, "max": 1.0, "min": -1.0},
        {"op": "rescale", "feature": 5, "value": 0.0, "when": {"feature": 6, "above": 2.0, "latch": True}},
        {"op": "add", "feature": 7, "value": 1.5,
         "when": {"any": [{"feature": 8, "below": 0.1}, {"all": [{"feature": 9, "above": 1.0},
                                                                 {"feature": 10, "above": 0.5}]}]}},
        {"op": "clamp", "feature": 11, "value": 2.0, "normalize": True},
        {"op": "ablate", "feature": 12}],
        "stop_when": [{"feature": 13, "above": 5.0}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    (st,) = load_spec(str(path), {1: sae})
    assert st.positions == (2, 9) and len(st.ops) == 6 and len(st.stops) == 1
    assert st.ops[0].value == 3.0 and st.ops[0].value2 == -np.inf and st.ops[2].when == When(6, above=2.0, latch=True)
    back = steering_to_json(st)
    assert back["ops"] == spec["ops"] and back["stop_when"] == spec["stop_when"]
    (st2,) = load_spec(json.dumps(back), sae)
    np.testing.assert_array_equal(st2.items(), st.items())
    x = _rows(16, 6)
    np.testing.assert_array_equal(st.apply(x.copy()), st2.apply(x.copy()))


@pytest.mark.parametrize("spec, message", [
    ({"ops": [{"op": "cap", "feature": 3}]}, r"spec\.ops\[0\]: cap of feature 3: give max= and/or min="),
    ({"ops": [{"op": "cap", "feature": 3, "max": 1.0, "min": 2.0}]}, r"spec\.ops\[0\]: cap of feature 3: min 2 > max 1"),
    ({"ops": [{"op": "cap", "feature": 3, "max": "big"}]}, r"spec\.ops\[0\]\.max: expected a finite number"),
    ({"ops": [{"op": "rescale", "feature": 3}]}, r"spec\.ops\[0\]\.value: missing"),
    ({"ops": [{"op": "push", "feature": 3}]}, r"spec\.ops\[0\]\.op: expected one of"),
    ({"ops": [{"op": "add", "feature": 99, "value": 1}]}, r"spec\.ops\[0\]: feature 99 is out of range"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1, "max": 2}]}, r"spec\.ops\[0\]: unknown field\(s\) \['max'\]"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1, "when": {"feature": 2}}]},
     r"spec\.ops\[0\]\.when: give 'above' and/or 'below'"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1, "when": {"feature": 2, "above": 1, "latch": "yes"}}]},
     r"spec\.ops\[0\]\.when\.latch: expected true or false"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1, "when": {"all": []}}]}, r"spec\.ops\[0\]\.when\.all: expected a non-empty"),
    ({"ops": [], "stop_when": [{"feature": 70, "above": 1}]}, r"spec\.stop_when\[0\]: condition feature 70 is out of range"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1}], "positions": {"from": 5, "to": 2}},
     r"spec\.positions: needs 0 <= from <= to"),
    ({"ops": [{"op": "add", "feature": 1, "value": 1}], "layer": 4}, r"spec\.layer: no SAE for layer 4"),
    ({"ops": []}, r"spec\.ops: no operation and no stop_when"),
    ({"opz": []}, r"spec: unknown field\(s\) \['opz'\]"),
])
def test_json_spec_errors_name_the_field(spec, message):
    sae = make_sae(16, 64, 4, metadata={"layer": 1})
    with pytest.raises(SpecError, match=message):
        load_spec(spec, {1: sae})


def test_json_spec_file_errors(tmp_path):
    sae = make_sae(16, 64, 4, metadata={"layer": 1})
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(str(tmp_path / "missing.json"), sae)
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec("{oops", sae)
    # a list of steerings, each checked with its index
    with pytest.raises(SpecError, match=r"spec\[1\]\.ops\[0\]\.feature: missing"):
        load_spec([{"ops": [{"op": "ablate", "feature": 1}]}, {"ops": [{"op": "ablate"}]}], sae)


# ---- torch ops and the transformers engine ----
def test_torch_op_matches_numpy():
    torch = pytest.importorskip("torch")
    import saehook.torch_ops as ops

    sae = make_sae(40, 160, 10, seed=11)
    x = _rows(40, 30, seed=4)
    vals, idx = sae.encode(x)
    st = _conditional(sae, vals, idx)
    h = torch.from_numpy(x.copy())
    ops.steer_(st, h)
    np.testing.assert_allclose(h.numpy(), st.apply(x.copy()), rtol=1e-6, atol=1e-6)
    # the op traces (the items as an int32 tensor built outside the graph)
    items = torch.from_numpy(st.items().view(np.int32).copy())
    f = torch.compile(lambda t: torch.ops.saehook.steer_items_(t, sae.handle, items), backend="eager", fullgraph=True)
    h2 = torch.from_numpy(x.copy())
    f(h2)
    np.testing.assert_allclose(h2.numpy(), h.numpy(), rtol=0, atol=0)


LAYER = 1


def _oracle_generate(model, st, ids, n_new):
    """Greedy generate with the reference loop injected by a plain forward hook (latch state kept
    across calls as one sequence; positions from the running count)."""
    import torch
    from saehook.hf import decoder_layers

    latch, seen, stop = {}, [0], [None]

    def hook(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        h = hidden.detach().float().reshape(-1, st.sae.d_model).numpy()
        pos = np.arange(seen[0], seen[0] + h.shape[0])
        generated = seen[0] > 0
        seen[0] += h.shape[0]
        mask = st.position_mask(pos, generated)
        new, stops = ref_steer(st, h, mask=mask, latch=latch)
        if generated and stop[0] is None:
            hit = [(int(p), s[0]) for p, s in zip(pos, stops) if s]
            if hit:
                stop[0] = hit[0]
        t = torch.from_numpy(new.astype(np.float32)).reshape(hidden.shape)
        return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return out[0].tolist(), stop[0]


def _hf_sae(model, seed=7):
    return make_sae(model.config.hidden_size, 512, 16, seed=seed)


def _prompt_features(model, sae, ids):
    import torch

    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0].numpy()
    return h, sae.encode(h)


@pytest.mark.parametrize("kind", ["cap_rescale", "conditional", "latched", "window"])
def test_transformers_engine_matches_numpy(tiny_qwen3, kind):
    torch = pytest.importorskip("torch")
    import saehook.hf as shf

    model = tiny_qwen3
    sae = _hf_sae(model)
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    h, (vals, idx) = _prompt_features(model, sae, ids)
    f0, f1 = int(idx[2, 0]), int(idx[5, 1])
    p0 = h.astype(np.float64) @ _unit(sae, f0)
    if kind == "cap_rescale":
        st = saehook.Steering(sae, layer=LAYER).cap(f0, max=float(np.median(p0))).rescale(f1, 0.0).add(3, 4.0)
    elif kind == "conditional":
        t = float(np.median([dict(zip(i, v)).get(f0, 0.0) for v, i in zip(vals, idx)]))
        st = (saehook.Steering(sae, layer=LAYER).add(3, 30.0, when=When(f0, above=t))
              .rescale(f1, 3.0, when=When(f0, below=t) | When(f1, above=1.0)))
    elif kind == "latched":
        st = saehook.Steering(sae, layer=LAYER).add(3, 30.0, when=When(f0, above=float(vals[2, 0]) - 1e-3, latch=True))
    else:
        st = saehook.Steering(sae, layer=LAYER, positions=(4, 10)).add(3, 30.0).cap(f0, max=0.0)
    want, _ = _oracle_generate(model, st, ids, 6)
    with torch.no_grad(), shf.steer(model, st):
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    with torch.no_grad():
        clean = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    assert got == want
    # One forward: logits against the oracle's, so the comparison is not only of argmaxes.
    with torch.no_grad(), shf.steer(model, st):
        logits = model(ids).logits[0].numpy()
    new, _ = ref_steer(st, h, mask=st.position_mask(np.arange(8), False))
    from saehook.hf import decoder_layers

    handle = decoder_layers(model)[LAYER].register_forward_hook(
        lambda m, a, out: (torch.from_numpy(new.astype(np.float32)).reshape(out[0].shape if isinstance(out, tuple) else out.shape)))
    try:
        with torch.no_grad():
            oracle = model(ids).logits[0].numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(logits, oracle, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = model(ids).logits[0].numpy()
    assert np.abs(logits - base).max() > 1e-3 or got != clean


def test_transformers_stop_when(tiny_qwen3):
    torch = pytest.importorskip("torch")
    import saehook.hf as shf

    model = tiny_qwen3
    sae = _hf_sae(model)
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        hs = model(clean, output_hidden_states=True).hidden_states[LAYER + 1][0].numpy()
    vals, idx = sae.encode(hs)
    # a condition that first holds on a generated token in the middle of the clean continuation
    target = 6 + 4
    g = int(idx[target, 0])
    z = np.array([dict(zip(i, v)).get(g, 0.0) for v, i in zip(vals, idx)])
    t = float(z[target]) - 1e-3
    st = saehook.Steering(sae, layer=LAYER).stop_when(When(g, above=t))
    fires = [p for p in range(6, 18) if z[p] > t]  # generated positions
    want_pos = fires[0]
    _, oracle_stop = _oracle_generate(model, st, ids, 12)
    assert oracle_stop == (want_pos, 0)
    with torch.no_grad(), shf.steer(model, st) as session:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             stopping_criteria=session.stopping_criteria())
    ev = session.stops[0]
    assert ev is not None and ev.position == want_pos and ev.index == 0 and ev.condition == st.stops[0]
    # generate sampled one more token after the forward that fired; up to the firing token the
    # output is the clean continuation (stop_when changes nothing)
    assert out.shape[1] == want_pos + 2
    assert out[0, : want_pos + 1].tolist() == clean[0, : want_pos + 1].tolist()


# ---- the command line ----
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import gguf_models as gm

    d = tmp_path_factory.mktemp("steer_cli")
    model = gm.build_hf_model(seed=3)
    model.save_pretrained(d / "hf")
    import importlib.util

    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        gm.write_gguf(model, d / "m.gguf")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((512, 256)) / 16).astype(np.float32)
    sae = saehook.SAE(W, W.copy(), k=8, metadata={"layer": LAYER, "hook_point": "resid_post"})
    sae.save(d / "sae.safetensors")
    return d, model


def _cli_json(capsys, *argv):
    from saehook.cli import main

    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_steer_new_ops_and_spec(cli_setup, capsys, tmp_path):
    import torch

    d, model = cli_setup
    sae = saehook.load(d / "sae.safetensors")
    prompt = "cat"
    toks = list(prompt.encode())  # the directory has no tokenizer: bytes
    ids = torch.tensor([toks])
    out = _cli_json(capsys, "steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--cap", "3=:-0.5",
                    "--cap", "4=-1:1", "--rescale", "5=0", "--add", "3=40", "--positions", "1:", "--max-tokens", "6",
                    "--json", prompt)
    st = (saehook.Steering(sae, layer=LAYER, positions=(1, None)).add(3, 40.0).cap(3, max=-0.5)
          .cap(4, min=-1.0, max=1.0).rescale(5, 0.0))
    want, _ = _oracle_generate(model, st, ids, 6)
    assert out["steered_tokens"] == want[len(toks):][: len(out["steered_tokens"])] and out["steered_tokens"]
    assert out["steered_tokens"] != out["clean_tokens"] and out["stopped_by"] is None
    # --spec: a conditional op and a stop
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        hs = model(full, output_hidden_states=True).hidden_states[LAYER + 1][0].numpy()
    vals, idx = sae.encode(hs)
    g = int(idx[len(toks) + 3, 0])
    z = np.array([dict(zip(i, v)).get(g, 0.0) for v, i in zip(vals, idx)])
    t = float(z[len(toks) + 3]) - 1e-3
    first = next(p for p in range(len(toks), len(z)) if z[p] > t)  # generated positions
    spec = {"layer": LAYER, "ops": [{"op": "rescale", "feature": 7, "value": 0.0,
                                     "when": {"feature": g, "above": 1e9}}],
            "stop_when": [{"feature": g, "above": t}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = _cli_json(capsys, "steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--spec", str(path),
                    "--max-tokens", "8", "--json", prompt)
    assert out["stopped_by"] == {"condition": repr(When(g, above=t)), "when": {"feature": g, "above": t},
                                 "index": 0, "position": first}
    assert out["steered_tokens"] == full[0, len(toks): first + 1].tolist()
    if (d / "m.gguf").exists():  # the llama.cpp engine stops at the same token
        lo = _cli_json(capsys, "steer", str(d / "m.gguf"), "--sae", str(d / "sae.safetensors"), "--spec", str(path),
                       "--max-tokens", "8", "--json", prompt)
        assert lo["stopped_by"] == out["stopped_by"] and lo["steered_tokens"] == out["steered_tokens"]
    # errors name the field; --spec and op flags do not mix
    path.write_text(json.dumps({"ops": [{"op": "cap", "feature": 3, "max": 1, "min": 2}]}))
    from saehook.cli import main

    assert main(["steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--spec", str(path), prompt]) == 2
    assert "spec.ops[0]: cap of feature 3: min 2 > max 1" in capsys.readouterr().err
    assert main(["steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--spec", str(path), "--add", "1=2",
                 prompt]) == 2
    assert "either --spec or" in capsys.readouterr().err
    assert main(["steer", str(d / "hf"), "--sae", str(d / "sae.safetensors"), "--cap", "3=", prompt]) == 2
    assert "--cap expects FEATURE=MAX" in capsys.readouterr().err


# ---- llama.cpp vs transformers ----
@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import gguf_models as gm

    d = tmp_path_factory.mktemp("steer_gguf")
    hf = gm.build_hf_model(num_hidden_layers=3)
    path = d / "tiny-f32.gguf"
    gm.write_gguf(hf, path)
    rng = np.random.default_rng(0)
    W_enc = (rng.standard_normal((1024, 256)) / 16).astype(np.float32)
    W_dec = (rng.standard_normal((1024, 256)) / 16).astype(np.float32)
    sae = saehook.SAE(W_enc, W_dec, (0.05 * rng.standard_normal(1024)).astype(np.float32), k=16)
    return hf, path, sae


PROMPT = [int(t) for t in np.random.default_rng(1).integers(1, 256, 12)]


def _open_llama(path):
    from saehook.llama import HookedLlama

    return HookedLlama(str(path), n_ctx=256, n_batch=64, n_ubatch=64, verbose=False, seed=0, type_k=0, type_v=0)


def _llama_generate(llm, st, n):
    out = []
    llm.reset()
    with llm.steer(st):
        for tok in llm.generate(PROMPT, top_k=1, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) >= n:
                break
    return out


def _hf_generate(model, st, n):
    import torch
    import saehook.hf as shf

    ids = torch.tensor([PROMPT])
    with torch.no_grad(), shf.steer(model, st) as session:
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                             stopping_criteria=session.stopping_criteria(), eos_token_id=None)
    return out[0, len(PROMPT):].tolist(), session


def _llama_spec(hf, sae, kind):
    import torch

    with torch.no_grad():
        full = hf.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long), eos_token_id=None)
        h = hf(full, output_hidden_states=True).hidden_states[LAYER + 1][0].numpy()
    vals, idx = sae.encode(h)
    z = lambda f: np.array([dict(zip(i, v)).get(f, 0.0) for v, i in zip(vals, idx)])  # noqa: E731
    f0, f1 = int(idx[3, 0]), int(idx[8, 1])
    p0 = h.astype(np.float64) @ _unit(sae, f0)
    S = lambda **kw: saehook.Steering(sae, layer=LAYER, **kw)  # noqa: E731
    if kind == "cap_rescale":
        return S().cap(f0, max=float(np.median(p0))).rescale(f1, 0.0).add(3, 6.0), full
    if kind == "conditional":
        t = float(np.median(z(f0)[z(f0) > 0])) if (z(f0) > 0).any() else 0.0
        return (S().add(3, 30.0, when=When(f0, above=t))
                .rescale(f1, 4.0, when=When(f0, below=t) | When(f1, above=1.0))), full
    if kind == "latched":
        return S().add(3, 30.0, when=When(f0, above=float(z(f0)[3]) - 1e-3, latch=True)), full
    if kind == "window":
        return S(positions=(5, 15)).add(3, 30.0).cap(f0, max=0.0), full
    # stop: a condition first holding on a generated token of the clean continuation
    gen = range(len(PROMPT), len(z(f0)))
    g = next(int(f) for p in gen for f in idx[p][:1] if z(int(f))[len(PROMPT):p].max(initial=-1) < vals[p, 0] - 1e-3)
    p = next(p for p in gen if z(g)[p] > 0)
    return S().stop_when(When(g, above=float(z(g)[p]) - 1e-3)), full


@pytest.mark.parametrize("kind", ["cap_rescale", "conditional", "latched", "window"])
def test_llama_matches_transformers(llama_models, kind):
    hf, path, sae = llama_models
    st, full = _llama_spec(hf, sae, kind)
    llm = _open_llama(path)
    try:
        got = _llama_generate(llm, st, 10)
        clean = _llama_generate(llm, saehook.Steering(sae, layer=LAYER).add(3, 0.0), 10)
    finally:
        llm.close()
    want, _ = _hf_generate(hf, st, 10)
    assert clean == full[0, len(PROMPT):].tolist()  # the engines agree unsteered...
    assert got == want  # ...and steered
    assert got != clean  # the steering matters


def test_llama_stop_when_stops_where_transformers_does(llama_models):
    hf, path, sae = llama_models
    st, full = _llama_spec(hf, sae, "stop")
    want, session = _hf_generate(hf, st, 10)
    ev = session.stops[0]
    assert ev is not None and len(PROMPT) <= ev.position < len(PROMPT) + 9
    n_keep = ev.position + 1 - len(PROMPT)  # the generated tokens up to the one it held on
    llm = _open_llama(path)
    try:
        got = _llama_generate(llm, st, 10)
        assert llm.last_stop is not None and llm.last_stop.position == ev.position and llm.last_stop.index == 0
        assert got == want[:n_keep] == full[0, len(PROMPT): ev.position + 1].tolist()
        # a completion reports it
        llm.reset()
        with llm.steer(st):
            out = llm.create_completion(PROMPT, max_tokens=10, temperature=0.0, top_k=1)
        ch = out["choices"][0]
        assert ch["finish_reason"] == "stop_when"
        assert ch["saehook"]["stop_when"] == {"condition": repr(st.stops[0]), "when": st.stops[0].to_json(),
                                              "index": 0, "position": ev.position}
        llm.reset()
        with llm.steer(st):
            chunks = list(llm.create_completion(PROMPT, max_tokens=10, temperature=0.0, top_k=1, stream=True))
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop_when"
        assert chunks[-1]["choices"][0]["saehook"] == ch["saehook"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
        # without the stop the generation runs on
        assert _llama_generate(llm, saehook.Steering(sae, layer=LAYER).add(3, 0.0), 10) == full[0, len(PROMPT):].tolist()
        assert llm.last_stop is None
    finally:
        llm.close()


# ---- CUDA kernels against the CPU ones ----
def _cuda_or_skip():
    torch = pytest.importorskip("torch")
    if not saehook._core.cuda_available():
        pytest.skip("saehook was built without CUDA kernels (no CUDA toolkit at build time, or SAEHOOK_CUDA=OFF)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    import saehook.cuda as sc

    return torch, sc


@pytest.mark.parametrize("dec_layout", ["rows", "cols"])
def test_cuda_steering_modes_match_cpu(dec_layout):
    torch, sc = _cuda_or_skip()
    sae = make_sae(40, 160, 10, seed=11, dec_layout=dec_layout)
    gpu = sc.to_device(sae, "cuda")
    x = _rows(40, 30, seed=4)
    vals, idx = sae.encode(x)
    st = _conditional(sae, vals, idx)
    # more items than one kernel batch (64), projections in both batches
    for f in range(70):
        if f % 3 == 0:
            st.cap(f, max=0.5)
        elif f % 3 == 1:
            st.rescale(f, 0.9)
        else:
            st.add(f, 0.01)
    mask = np.random.default_rng(2).random(30) < 0.7
    slots = np.array([0, 1, 2] * 10, np.int32)
    want = x.copy()
    state_cpu = saehook.SteeringState(st, 3)
    fired_cpu = st.apply_report(want, mask=mask, state=state_cpu, slots=slots)
    h = torch.from_numpy(x.copy()).cuda()
    state_gpu = saehook.SteeringState(st, 3)
    fired = np.zeros((30, len(st.items())), np.uint8)
    gpu.steer(st, h, mask=torch.from_numpy(mask).cuda(), state=state_gpu, slots=slots, fired=fired)
    np.testing.assert_allclose(h.cpu().numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fired.astype(bool), fired_cpu)
    np.testing.assert_array_equal(state_gpu.latch, state_cpu.latch)
    # add + cap + rescale without conditions stay on the device, and agree too
    plain = saehook.Steering(sae).add(3, 2.0).cap(5, max=0.1, min=-0.1).rescale(9, 0.0)
    h = torch.from_numpy(x.copy()).cuda()
    gpu.steer(plain, h)
    np.testing.assert_allclose(h.cpu().numpy(), plain.apply(x.copy()), rtol=1e-4, atol=1e-4)
    zero = _basis_sae(zero_feature=2)
    with pytest.raises(ValueError, match="feature 2 has a zero decoder direction"):
        sc.to_device(zero, "cuda").steer(saehook.Steering(zero).cap(2, max=0.0), torch.ones(2, 8, device="cuda"))


# ---- llama.cpp on a hybrid (recurrent + attention) model ----
def _qwen35(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from saehook.demo.gguf_writer import write_random_qwen35

    path = tmp_path_factory.mktemp("q35") / "qwen35.gguf"
    write_random_qwen35(path)
    return path


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    return _qwen35(tmp_path_factory)


def _open_q35(path):
    from saehook.llama import HookedLlama

    return HookedLlama(str(path), n_ctx=256, n_batch=64, n_ubatch=64, verbose=False, seed=0, logits_all=True,
                       type_k=0, type_v=0)


def _q35_run(llm, sae, steerings, n):
    """Greedy generate with the steerings and a capture at LAYER (the residual before them)."""
    llm.reset()
    out = []
    with llm.capture({LAYER: sae}, residuals=True) as rec, llm.steer(*steerings):
        for tok in llm.generate(PROMPT, top_k=1, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) >= n:
                break
    return out, rec[LAYER], np.array(llm.scores[: llm.n_tokens])


@pytest.mark.parametrize("kind", ["conditional_latched", "stop"])
def test_llama_hybrid_model_matches_the_reference(qwen35, llama_models, kind):
    """No transformers twin of the tiny qwen35 exists: the oracle is the reference loop run on
    the residuals the hook captured (before its steering), turned into one add-only steering per
    token (a position window of one) for a second, teacher-forced llama.cpp run."""
    _, _, sae = llama_models
    llm = _open_q35(qwen35)
    try:
        _, rec0, _ = _q35_run(llm, sae, [], 10)
        vals, idx = sae.encode(rec0.residuals)
        z = lambda f: np.array([dict(zip(i, v)).get(f, 0.0) for v, i in zip(vals, idx)])  # noqa: E731
        f0, f1 = int(idx[3, 0]), int(idx[8, 1])
        if kind == "stop":
            n0 = len(PROMPT)
            g = next(int(f) for p in range(n0, len(idx)) for f in idx[p][:1] if z(int(f))[n0:p].max(initial=-1) < vals[p, 0] - 1e-3)
            p = next(p for p in range(n0, len(idx)) if z(g)[p] > 0)
            st = saehook.Steering(sae, layer=LAYER).stop_when(When(g, above=float(z(g)[p]) - 1e-3))
            toks, rec, _ = _q35_run(llm, sae, [st], 10)
            _, stops = ref_steer(st, rec.residuals)
            first = next(int(q) for q, s, gen in zip(rec.positions, stops, rec.generated) if s and gen)
            assert first == p and llm.last_stop is not None and llm.last_stop.position == first
            assert len(toks) == first + 1 - n0  # ended after the token it held on
            return
        t = float(np.median(z(f0)[z(f0) > 0]))
        st = (saehook.Steering(sae, layer=LAYER)
              .add(3, 20.0, when=When(f1, above=float(z(f1)[8]) - 1e-3, latch=True))
              .cap(f0, max=0.0, when=When(f0, above=t) | When(f1, below=0.5))
              .rescale(f1, 2.0))
        toks, rec, scores = _q35_run(llm, sae, [st], 10)
        coefs = []
        ref_steer(st, rec.residuals, mask=st.position_mask(rec.positions, rec.generated), coefs=coefs)
        per_row = {}
        for r, f, c, unit in coefs:
            per_row.setdefault(int(rec.positions[r]), []).append((f, c, unit))
        oracle = []
        for pos, ops in sorted(per_row.items()):
            o = saehook.Steering(sae, layer=LAYER, positions=(pos, pos + 1))
            for f, c, unit in ops:
                o.add(f, float(c), normalize=bool(unit))
            oracle.append(o)
        seq = rec.tokens.tolist()  # every evaluated token: the prompt and the generated ones fed back
        assert seq == (PROMPT + toks)[: len(seq)]
        llm.reset()
        with llm.steer(*oracle):
            llm.eval(seq)
        want = np.array(llm.scores[: len(seq)])
        rel = np.linalg.norm(scores - want) / np.linalg.norm(want)
        assert rel < 1e-4, rel
        base = _q35_run(llm, sae, [], 10)[2]
        assert np.linalg.norm(scores - base) / np.linalg.norm(base) > 1e-2  # the steering matters
    finally:
        llm.close()


def test_llama_latch_is_forgotten_when_the_sequence_is_cleared(llama_models):
    import torch
    from saehook.hf import decoder_layers
    from saehook.llama import _lib

    hf, path, sae = llama_models
    st, _ = _llama_spec(hf, sae, "latched")  # latches on PROMPT[3]
    cut = 6

    def oracle(clear):
        def hook(module, args, out):
            h = out[0].detach()[0].numpy() if isinstance(out, tuple) else out.detach()[0].numpy()
            latch = {}
            a, _ = ref_steer(st, h[:cut], latch=latch)
            b, _ = ref_steer(st, h[cut:], latch={} if clear else latch)
            t = torch.from_numpy(np.concatenate([a, b]).astype(np.float32))[None]
            return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t

        handle = decoder_layers(hf)[LAYER].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return hf(torch.tensor([PROMPT])).logits[0, -1].numpy()
        finally:
            handle.remove()

    llm = _open_llama(path)
    try:
        got = {}
        for clear in (False, True):
            llm.reset()
            with llm.steer(st):
                llm.eval(PROMPT[:cut])
                if clear:
                    _lib().clear_seq(llm._hook, 0)
                llm.eval(PROMPT[cut:])
            got[clear] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()
    for clear in (False, True):
        want = oracle(clear)
        assert np.linalg.norm(got[clear] - want) / np.linalg.norm(want) < 1e-4, clear
    assert np.linalg.norm(got[True] - got[False]) / np.linalg.norm(got[False]) > 1e-3  # the clear mattered


def test_cuda_transformers_steering_modes_match_cpu(tiny_qwen3):
    """A model on the GPU: the hooks steer the residual there (CUDA kernels, conditions on the
    host) and generate the same tokens, and stop at the same token, as on the CPU."""
    torch, sc = _cuda_or_skip()
    import copy

    import saehook.hf as shf

    cpu_model = tiny_qwen3
    gpu_model = copy.deepcopy(cpu_model).cuda()
    sae = _hf_sae(cpu_model)
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    h, (vals, idx) = _prompt_features(cpu_model, sae, ids)
    f0, f1 = int(idx[2, 0]), int(idx[5, 1])
    st = (saehook.Steering(sae, layer=LAYER).cap(f0, max=0.0).rescale(f1, 0.5)
          .add(3, 30.0, when=When(f0, above=float(vals[2, 0]) - 1e-3, latch=True))
          .stop_when(When(f1, above=float(vals[5, 1]) + 1.0)))
    out = {}
    for name, model in (("cpu", cpu_model), ("gpu", gpu_model)):
        x = ids.to(next(model.parameters()).device)
        with torch.no_grad(), shf.steer(model, st) as session:
            toks = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  stopping_criteria=session.stopping_criteria())
        out[name] = (toks[0].tolist(), None if session.stops[0] is None else session.stops[0].position)
    assert out["gpu"] == out["cpu"]


def test_an_overflowing_row_leaves_h_and_the_latches_unchanged():
    sae = _basis_sae()
    x = np.array([[3.0, 1.0, 0.5, 0.0, 1, 1, 1, 1], [2e38, 1.0, 0.5, 0.0, 1, 1, 1, 1]], np.float32)
    st = saehook.Steering(sae).rescale(0, 3e38, when=When(1, above=0.0, latch=True))
    state = saehook.SteeringState(st, 1)
    y = x.copy()
    with pytest.raises(OverflowError, match="row 0 overflows float32"):
        st.apply(y, state=state)
    np.testing.assert_array_equal(y, x)
    assert not state.latch.any()  # the latch set on row 0 was not kept: the call failed
    with pytest.raises(ValueError, match="max 1e\\+39 overflows float32"):
        saehook.Steering(sae).cap(0, max=1e39)
    ok = saehook.Steering(sae).rescale(0, 2.0, when=When(1, above=0.0, latch=True))
    state = saehook.SteeringState(ok, 1)
    ok.apply(x[:1].copy(), state=state)
    assert state.latch.any()
