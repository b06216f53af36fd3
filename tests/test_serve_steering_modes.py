"""The steering-modes ops (cap, rescale) in `saehook serve`'s wire format: a live server on the
shipped demo, talked to with the official `openai` client. Oracle: HookedLlama with the same
saehook.Steering (greedy output); bad fields get a 400 naming them."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import saehook  # noqa: E402
from saehook import demo  # noqa: E402

from test_serve import CHAT_FORMAT, N_CTX, Server, demo_oracle, oracle_completion, post  # noqa: E402

PROMPT = "The with statement is used to"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server():
    s = Server(demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--parallel", 2, "--n-ctx", N_CTX, "--n-batch", 64,
               "--chat-format", CHAT_FORMAT, "--max-tokens", 64)
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def sae():
    return saehook.load(demo.SAE_FILE)


@pytest.fixture(scope="module")
def oracle():
    llm = demo_oracle()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def active(oracle, sae):
    """The two features most active on the prompt's last token (steering them changes the text)."""
    oracle.reset()
    with oracle.capture({sae.layer: sae}) as rec:
        oracle.eval(oracle.tokenize(PROMPT.encode(), add_bos=False, special=False))
    idx = rec[sae.layer].indices[-1]
    return int(idx[0]), int(idx[1])


def complete(server, steer, stream=False):
    client = server.client()
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=stream,
                                  extra_body={"saehook": {"steer": steer}})
    if stream:
        chunks = list(r)
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason
    return r.choices[0].text, r.choices[0].finish_reason


def test_cap_and_rescale_equal_hookedllama(server, sae, oracle, active):
    f, g = active
    plain, _ = oracle_completion(oracle, PROMPT, [], max_tokens=MAX_TOKENS)
    cases = [
        ([{"op": "rescale", "feature": f, "value": 0.0}, {"op": "cap", "feature": g, "min": 12.0}],
         saehook.Steering(sae, layer=sae.layer).rescale(f, 0.0).cap(g, min=12.0)),
        ([{"op": "cap", "feature": f, "max": -4.0, "min": -6.0}],
         saehook.Steering(sae, layer=sae.layer).cap(f, max=-4.0, min=-6.0)),
        ([{"op": "rescale", "feature": g, "value": 4.0, "positions": "generated"}],
         saehook.Steering(sae, layer=sae.layer, positions="generated").rescale(g, 4.0)),
        # mixed with the older ops in one request: one Steering per positions, ops in order
        ([{"op": "clamp", "feature": g, "value": 0.0}, {"op": "cap", "feature": f, "min": 10.0}],
         saehook.Steering(sae, layer=sae.layer).clamp(g, 0.0).cap(f, min=10.0)),
    ]
    seen = set()
    for wire, st in cases:
        want, reason = oracle_completion(oracle, PROMPT, [st], max_tokens=MAX_TOKENS)
        assert want != plain, f"{wire} must change the output, or this case proves nothing"
        assert complete(server, wire) == (want, reason), wire
        assert complete(server, wire, stream=True) == (want, reason), wire
        seen.add(want)
    assert len(seen) > 1  # different specs, different answers (the prompt cache keys them apart)
    # the same cap with another bound is another steering: not served from the cached prompt
    want, _ = oracle_completion(oracle, PROMPT, [saehook.Steering(sae, layer=sae.layer).cap(g, min=-12.0)],
                                max_tokens=MAX_TOKENS)
    assert complete(server, [{"op": "cap", "feature": g, "min": -12.0}])[0] == want


def test_chat_with_a_cap(server, sae, oracle, active):
    f, _ = active
    st = saehook.Steering(sae, layer=sae.layer).cap(f, min=15.0)
    msgs = [{"role": "user", "content": PROMPT}]
    oracle.reset()
    with oracle.steer(st, control_vectors=False):
        want = oracle.create_chat_completion(msgs, max_tokens=MAX_TOKENS, temperature=0.0)
    r = server.client().chat.completions.create(model="m", messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                                extra_body={"saehook": {"steer": [{"op": "cap", "feature": f,
                                                                                   "min": 15.0}]}})
    assert r.choices[0].message.content == want["choices"][0]["message"]["content"]


OP = {"feature": 1, "op": "cap", "max": 1.0}
ERRORS = [
    ({"feature": 1, "op": "cap"}, "saehook.steer[0].max", "needs saehook.steer[0].max and/or"),
    ({**OP, "min": 2.0}, "saehook.steer[0].min", "is above saehook.steer[0].max"),
    ({**OP, "max": float("inf")}, "saehook.steer[0].max", "finite"),
    ({**OP, "max": "1"}, "saehook.steer[0].max", "finite number"),
    ({"feature": 1, "op": "cap", "min": 1e39}, "saehook.steer[0].min", "overflows float32"),
    ({**OP, "value": 1.0}, "saehook.steer[0].value", "does not apply to op 'cap'"),
    ({**OP, "normalize": True}, "saehook.steer[0].normalize", "does not apply to op 'cap'"),
    ({"feature": 1, "op": "rescale"}, "saehook.steer[0].value", "required for op 'rescale'"),
    ({"feature": 1, "op": "rescale", "value": float("nan")}, "saehook.steer[0].value", "finite"),
    ({"feature": 1, "op": "rescale", "value": 0.5, "normalize": False}, "saehook.steer[0].normalize",
     "does not apply to op 'rescale'"),
    ({"feature": 1, "op": "rescale", "value": 0.5, "max": 1.0}, "saehook.steer[0].max", "does not apply"),
    ({"feature": 1, "op": "clamp", "value": 1.0, "min": 0.0}, "saehook.steer[0].min", "does not apply to op 'clamp'"),
    ({"feature": 1, "op": "ablate", "value": 2.0}, "saehook.steer[0].value", "0 or absent"),
    ({"feature": 1, "op": "add", "value": 1e39}, "saehook.steer[0].value", "overflows float32"),
    ({"feature": 1, "op": "squash", "value": 1.0}, "saehook.steer[0].op", "add, clamp, scale, ablate, cap, rescale"),
]


@pytest.mark.parametrize("op,param,message", ERRORS, ids=[e[1] + ":" + e[2] for e in ERRORS])
def test_bad_steering_modes_ops_name_the_field(server, op, param, message):
    raw = json.dumps({"prompt": PROMPT, "max_tokens": 2, "saehook": {"steer": [op]}}).encode()
    status, err = post(server, "/v1/completions", None, raw=raw)
    assert status == 400, err
    assert err["error"]["param"] == param and message in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error"
