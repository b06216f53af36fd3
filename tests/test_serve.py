"""`saehook serve` as a real subprocess on 127.0.0.1, talked to with the official `openai` client
(streaming and not, chat and completions) and raw HTTP for errors. Oracles: HookedLlama with
the same steering (greedy output), HookedLlama.capture of the same tokens (features), and each
request's own solo run (concurrency)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import saehook  # noqa: E402
from saehook import demo  # noqa: E402
from saehook.llama import HookedLlama  # noqa: E402

import gguf_models as gm  # noqa: E402

DEMO_SAE_LAYER = 2
CHAT_FORMAT = "chatml"  # the demo model's GGUF carries no chat template
N_CTX = 160


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`saehook serve ...` in a subprocess; stop() sends SIGTERM and checks the exit."""

    def __init__(self, model, *args, api_key=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "saehook", "serve", str(model), "--port", str(self.port), "--threads", "1",
               *map(str, args)]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(os.devnull, "w") if os.environ.get("SAEHOOK_TEST_QUIET") else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"saehook serve exited with {self.proc.returncode}:\n{''.join(self.output)}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("saehook serve did not start:\n" + "".join(self.output))
            time.sleep(0.2)

    def _drain(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def health(self):
        with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
            return json.loads(r.read())

    def stop(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def post(server, path, body, headers=None, raw=None):
    """Raw HTTP POST: (status, parsed JSON body)."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read()
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


# ---------------------------------------------------------------------------------------------
# fixtures: the shipped demo model (qwen3) with its SAE, and a tiny random qwen3


@pytest.fixture(scope="module")
def demo_server():
    s = _demo_server()
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def demo_sae():
    return saehook.load(demo.SAE_FILE)


def demo_oracle() -> HookedLlama:
    """The demo model in-process, one sequence (HookedLlama's own generation loop): the oracle
    the served results are compared with."""
    return HookedLlama(demo.MODEL, n_ctx=N_CTX, n_batch=64, n_ubatch=64, n_threads=1, verbose=False, seed=0,
                       chat_format=CHAT_FORMAT)


@pytest.fixture(scope="module")
def oracle():
    llm = demo_oracle()
    yield llm
    llm.close()


def oracle_completion(llm, prompt, steerings=(), max_tokens=12):
    llm.reset()
    with llm.steer(*steerings, control_vectors=False):
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


def clamp(sae, feature, value, positions="all"):
    return saehook.Steering(sae, layer=DEMO_SAE_LAYER, positions=positions).clamp(feature, value)


PROMPT = "The with statement is used to"


# ---------------------------------------------------------------------------------------------
# endpoints


def test_models_and_saes(demo_server, demo_sae):
    models = demo_server.client().models.list()
    assert [m.id for m in models.data] == [os.path.basename(demo.MODEL)]
    with urllib.request.urlopen(demo_server.base + "/v1/saehook/saes") as r:
        saes = json.loads(r.read())["data"]
    assert saes == [{"name": "demo", "path": demo.SAE_FILE, "layer": DEMO_SAE_LAYER, "d_model": demo_sae.d_model,
                     "d_sae": demo_sae.d_sae, "k": demo_sae.k, "activation": demo_sae.activation,
                     "prefilter": "bf16"}]  # the default (--prefilter auto) for a float32 encoder on the CPU
    assert any("bf16 prefilter on demo (+" in line for line in demo_server.output), demo_server.output


def test_greedy_completion_with_steering_equals_hookedllama(demo_server, demo_sae, oracle):
    client = demo_server.client()
    spec = [{"feature": 7, "op": "clamp", "value": 6.0}, {"feature": 100, "op": "ablate"}]
    st = saehook.Steering(demo_sae, layer=DEMO_SAE_LAYER).clamp(7, 6.0).ablate(100)
    want, reason = oracle_completion(oracle, PROMPT, [st], max_tokens=12)
    plain, _ = oracle_completion(oracle, PROMPT, [], max_tokens=12)
    assert want != plain, "the steering must change the output, or this test proves nothing"
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"saehook": {"steer": spec}})
    assert r.choices[0].text == want and r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == 12
    # streamed: the same text, chunk by chunk
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"saehook": {"steer": spec}}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == reason
    # unsteered, and steering only the generated positions
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == plain
    gen_only = clamp(demo_sae, 7, 6.0, positions="generated")
    want_gen, _ = oracle_completion(oracle, PROMPT, [gen_only], max_tokens=12)
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={
        "saehook": {"steer": [{"feature": 7, "op": "clamp", "value": 6.0, "positions": "generated"}]}})
    assert r.choices[0].text == want_gen


def _oracle_features(llm, sae, steerings, prompt_tokens, generated, top):
    """HookedLlama.capture of the same tokens, evaluated as a generation evaluates them:
    the prompt in one decode, then each generated token."""
    llm.reset()
    with llm.steer(*steerings, control_vectors=False), llm.capture({DEMO_SAE_LAYER: sae}) as rec:
        llm.eval(prompt_tokens)
        for t in generated:
            llm._decode_generated = True  # as HookedLlama.generate marks sampled tokens
            llm._in_generate, llm._generate_evals = True, 1
            try:
                llm.eval([t])
            finally:
                llm._in_generate = False
    r = rec[DEMO_SAE_LAYER]
    out = []
    for row in range(len(r.tokens)):
        keep = r.indices[row] >= 0
        idx, val = r.indices[row][keep], r.values[row][keep]
        order = np.argsort(-val, kind="stable")[:top]
        out.append((int(r.positions[row]), int(r.tokens[row]), idx[order].tolist(), val[order].tolist()))
    return out


def _check_features(got, want, rtol=1e-5):
    """The top features of each token equal the oracle's within rtol: the values in rank order,
    and each feature's value wherever both runs list it. Two features may change places (or one
    replace the other at the last place) only where their values tie within rtol: a rounding
    difference of that size (llama.cpp's flash attention rounds in f16) can reorder them."""
    assert [(e["position"], e["id"]) for e in got] == [(p, t) for p, t, _, _ in want]
    for e, (_, _, idx, val) in zip(got, want):
        g_idx, g_val = [f["feature"] for f in e["top"]], [f["value"] for f in e["top"]]
        np.testing.assert_allclose(g_val, val, rtol=rtol, atol=rtol)
        if g_idx == idx:
            continue
        want_of, got_of = dict(zip(idx, val)), dict(zip(g_idx, g_val))
        for f, v in got_of.items():  # a feature both list has the same value; one only this run lists ties the last
            np.testing.assert_allclose(v, want_of.get(f, val[-1]), rtol=rtol, atol=rtol, err_msg=f"feature {f}: {g_idx} against {idx}")
        for f, v in want_of.items():
            np.testing.assert_allclose(v, got_of.get(f, g_val[-1]), rtol=rtol, atol=rtol, err_msg=f"feature {f}: {g_idx} against {idx}")


def _demo_server():
    return Server(demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--parallel", 8, "--n-ctx", N_CTX, "--n-batch", 64,
                  "--chat-format", CHAT_FORMAT, "--max-tokens", 64, "--max-steer-ops", 4, "--max-top", 8,
                  "--max-body", 20000)


def test_chat_stream_features_equal_capture_of_the_same_tokens(demo_server, demo_sae, oracle):
    """On a fresh server the features equal HookedLlama.capture exactly. On a server with a
    history, other requests' cached prompts hold KV cells, so this request's cells sit elsewhere
    in the unified cache and the attention sums run over its rows in another SIMD grouping: the
    float32 rounding differs, and llama.cpp's int8 quantization of activations for the Q8_0
    matmuls turns that into up to 0.2% on the demo's feature values (llama-server has the same
    property). There the same features are checked with that bound."""
    fresh = _demo_server()
    try:
        feats, n_prompt, text = _chat_features(fresh)
    finally:
        assert fresh.stop() == 0, "".join(fresh.output)
    want = _chat_oracle(oracle, demo_sae, feats, n_prompt, text)
    _check_features(feats, want)
    client = demo_server.client()
    for _ in range(2):  # a history: another request's prompt stays cached in its slot
        client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0)
    feats_h, n_prompt_h, text_h = _chat_features(demo_server)
    assert (n_prompt_h, text_h) == (n_prompt, text)
    _check_features(feats_h, want, rtol=5e-3)


def test_unfiltered_server_gives_the_same_features(demo_sae, oracle):
    """`saehook serve --prefilter off`: the demo SAE encodes in float32 alone (every other demo
    server here runs the default, the bf16 prefilter), and the steered text and every feature
    still equal HookedLlama's with the plain float32 SAE; /v1/saehook/saes says no prefilter."""
    fresh = Server(demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--parallel", 2, "--n-ctx", N_CTX, "--n-batch", 64,
                   "--chat-format", CHAT_FORMAT, "--prefilter", "off")
    try:
        feats, n_prompt, text = _chat_features(fresh)
        with urllib.request.urlopen(fresh.base + "/v1/saehook/saes") as r:
            assert json.loads(r.read())["data"][0]["prefilter"] is None
    finally:
        assert fresh.stop() == 0, "".join(fresh.output)
    assert not any("prefilter" in line for line in fresh.output), fresh.output
    _check_features(feats, _chat_oracle(oracle, demo_sae, feats, n_prompt, text))


def _chat_features(server):
    client = server.client()
    messages = [{"role": "user", "content": "What does the with statement do?"}]
    ext = {"steer": [{"feature": 7, "op": "clamp", "value": 4.0}],
           "features": {"sae": "demo", "layer": DEMO_SAE_LAYER, "top": 4, "prompt": True}}
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"saehook": ext}, stream_options={"include_usage": True})
    text, feats, usage = "", [], None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            text += ch.delta.content or ""
            got = (ch.model_extra or {}).get("saehook")
            if got:
                feats.extend(got["features"])
    assert usage.completion_tokens == 10
    return feats, usage.prompt_tokens, text


def _chat_oracle(oracle, demo_sae, feats, n_prompt, text):
    # the oracle: llama-cpp-python's own chat handler on the same model, same steering
    messages = [{"role": "user", "content": "What does the with statement do?"}]
    oracle.reset()
    st = clamp(demo_sae, 7, 4.0)
    with oracle.steer(st, control_vectors=False):
        ref = oracle.create_chat_completion(messages, max_tokens=10, temperature=0.0)
    assert text == ref["choices"][0]["message"]["content"]
    prompt_ids = [e["id"] for e in feats[:n_prompt]]
    gen_ids = [e["id"] for e in feats[n_prompt:]]
    assert len(gen_ids) == 10, "every generated token has its entry, the last one included"
    assert oracle.detokenize(gen_ids).decode() == text
    return _oracle_features(oracle, demo_sae, [st], prompt_ids, gen_ids, 4)


def test_completion_features_and_logprobs_non_streamed(demo_server, demo_sae, oracle):
    client = demo_server.client()
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"saehook": {"features": {"top": 3}}})
    ch = r.choices[0]
    feats = ch.model_extra["saehook"]["features"]
    assert len(feats) == 6 and "".join(e["token"] for e in feats) == ch.text
    prompt_ids = oracle.tokenize(PROMPT.encode(), special=True)
    want = _oracle_features(oracle, demo_sae, [], prompt_ids, [e["id"] for e in feats], 3)
    _check_features(feats, want[len(prompt_ids):])
    # logprobs: the model's log-softmax at each step, the chosen token first among greedy alternatives
    plain = saehook.llama.plain_llama(demo.MODEL, n_ctx=N_CTX, n_batch=64, n_threads=1, verbose=False, logits_all=True)
    ref = plain.create_completion(PROMPT, max_tokens=6, temperature=0.0, logprobs=3)["choices"][0]["logprobs"]
    plain.close()
    assert ch.logprobs.tokens == ref["tokens"]
    np.testing.assert_allclose(ch.logprobs.token_logprobs, ref["token_logprobs"], rtol=1e-4, atol=1e-4)
    for got, exp in zip(ch.logprobs.top_logprobs, ref["top_logprobs"]):
        assert set(got) == set(exp)


def _eight_concurrent_specs(demo_server):
    """8 requests with 8 clamps at once, each equal to its solo run; returns the /health counters
    before and after the concurrent run."""
    client = demo_server.client()
    specs = [[{"feature": f, "op": "clamp", "value": v}] for f, v in
             [(7, 6.0), (100, 5.0), (3, 8.0), (42, 4.0), (7, -2.0), (512, 6.0), (900, 3.0), (77, 9.0)]]
    prompts = [PROMPT, "A list comprehension", PROMPT, "The import system", "Exceptions are", PROMPT,
               "The for statement", "Classes provide"]

    def run(i, stream):
        kw = dict(model="m", prompt=prompts[i], max_tokens=16, temperature=0, extra_body={"saehook": {"steer": specs[i]}})
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    solo = [run(i, False) for i in range(8)]
    assert len(set(solo)) > 4, "the specs must lead to different outputs"
    before = demo_server.health()
    results = [None] * 8
    start = threading.Barrier(8)

    def worker(i):
        start.wait()
        results[i] = run(i, i % 2 == 0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    assert results == solo
    after = demo_server.health()
    # the hook's own time in these decodes: some, and less than the wall time they took
    hook = after["hook_seconds"] - before["hook_seconds"]
    assert 0 < hook < wall, (before, after, wall)
    # decodes of generated tokens only: some of them (the prompts came in steps of their own or
    # next to tokens), and a share of that time
    gen = after["generation_decodes"] - before["generation_decodes"]
    assert 0 < gen < after["decodes"] - before["decodes"], (before, after)
    assert 0 < after["generation_hook_seconds"] - before["generation_hook_seconds"] < hook, (before, after)
    # continuous batching: far fewer steps than the 8 x 16 tokens
    assert after["steps"] - before["steps"] < 8 * 16 / 2, after
    return before, after


def test_eight_concurrent_specs_each_equal_their_solo_run(demo_server, demo_sae):
    """The default layout on a transformer model (--kv-layout auto): one KV stream per sequence,
    split mode: a step's generated tokens in one llama_decode, prompt chunks in others."""
    before, after = _eight_concurrent_specs(demo_server)
    assert before["mode"] == "split"
    assert after["decodes"] - before["decodes"] > after["steps"] - before["steps"]


def test_eight_concurrent_specs_on_the_unified_cache(demo_sae):
    """--kv-layout unified (batched mode): one llama_decode per step, prompt chunks included, and
    one encode per decode at the steered layer serves the 8 different clamps (n_batch = n_ubatch)."""
    server = Server(demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--parallel", 8, "--n-ctx", N_CTX, "--n-batch", 64,
                    "--chat-format", CHAT_FORMAT, "--max-tokens", 64, "--kv-layout", "unified")
    try:
        before, after = _eight_concurrent_specs(server)
    finally:
        assert server.stop() == 0, "".join(server.output)
    assert before["mode"] == "batched"
    steps, decodes = (after[k] - before[k] for k in ("steps", "decodes"))
    assert decodes == steps, after
    per_decode = {int(e): n - before["encodes_per_decode"].get(e, 0) for e, n in after["encodes_per_decode"].items()}
    assert {e: n for e, n in per_decode.items() if n} == {1: decodes}, per_decode


@pytest.fixture
def fresh_demo_server():
    """A demo server with no history: other requests' cached prompts move a request's KV cells in
    the unified cache, which changes float32 rounding (see the features test above) and can flip a
    near-tie of the demo's greedy text; the tests that compare text after a cache hit start here."""
    s = _demo_server()
    yield s
    assert s.stop() == 0, "".join(s.output)


def test_prompt_cache_reuses_only_the_same_steering(fresh_demo_server, demo_sae, oracle):
    client = fresh_demo_server.client()
    base = "Every object has an identity, a type and a value."
    longer = base + " An object's identity"
    spec = {"steer": [{"feature": 100, "op": "clamp", "value": 5.0}]}
    client.completions.create(model="m", prompt=base, max_tokens=2, temperature=0, extra_body={"saehook": spec})
    r = client.completions.create(model="m", prompt=longer, max_tokens=8, temperature=0, extra_body={"saehook": spec})
    assert r.usage.prompt_tokens_details.cached_tokens >= len(oracle.tokenize(base.encode(), add_bos=False)) - 1
    want, _ = oracle_completion(oracle, longer, [clamp(demo_sae, 100, 5.0)], max_tokens=8)
    assert r.choices[0].text == want
    # unsteered: the steered prefix's KV must not be used
    r = client.completions.create(model="m", prompt=longer + " is", max_tokens=8, temperature=0)
    plain, _ = oracle_completion(oracle, longer + " is", [], max_tokens=8)
    assert r.choices[0].text == plain
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # a clamp of the generated positions leaves the prompt's KV unsteered: the unsteered prefix serves
    gen_spec = {"steer": [{"feature": 100, "op": "clamp", "value": 5.0, "positions": "generated"}]}
    r = client.completions.create(model="m", prompt=longer + " is a", max_tokens=8, temperature=0,
                                  extra_body={"saehook": gen_spec})
    assert r.usage.prompt_tokens_details.cached_tokens >= len(oracle.tokenize(longer.encode(), add_bos=False))
    want, _ = oracle_completion(oracle, longer + " is a", [clamp(demo_sae, 100, 5.0, positions="generated")],
                                max_tokens=8)
    assert r.choices[0].text == want
    # asking for the prompt's features: no cached prefix (its rows must be evaluated)
    r = client.completions.create(model="m", prompt=longer, max_tokens=2, temperature=0,
                                  extra_body={"saehook": {**spec, "features": {"prompt": True}}})
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert len(r.choices[0].model_extra["saehook"]["features"]) == r.usage.prompt_tokens + 2


def test_a_disconnect_mid_stream_frees_the_slot(demo_server, demo_sae, oracle):
    c = http.client.HTTPConnection("127.0.0.1", demo_server.port, timeout=60)
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 60, "stream": True,
                                                          "temperature": 0}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    got = b""
    while got.count(b"data:") < 3:
        got += r.read1(256)
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 20
    while demo_server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert demo_server.health()["active"] == 0
    want, _ = oracle_completion(oracle, "The for statement", [clamp(demo_sae, 3, 8.0)], max_tokens=10)
    r = demo_server.client().completions.create(model="m", prompt="The for statement", max_tokens=10, temperature=0,
                                                extra_body={"saehook": {"steer": [
                                                    {"feature": 3, "op": "clamp", "value": 8.0}]}})
    assert r.choices[0].text == want


def test_stop_sequences_and_sampling(demo_server):
    client = demo_server.client()
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    word = full.strip().split()[1]
    cut = full[: full.index(word)]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0, stop=[word])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt=PROMPT, max_tokens=20,
                                                                     temperature=0, stop=word, stream=True)
                if c.choices)
    assert s == cut
    # a seed makes sampling repeatable; different seeds differ somewhere
    kw = dict(model="m", prompt=PROMPT, max_tokens=16, temperature=1.5, top_p=0.95)
    a = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 1, 2, 3)]
    assert a[0] == a[1] and len(set(a)) > 1


# ---------------------------------------------------------------------------------------------
# errors: OpenAI's error object, param naming the field

STEER = {"feature": 1, "op": "clamp", "value": 1.0}
ERRORS = [
    ({"saehook": {"steer": [{**STEER, "sae": "nope"}]}}, "saehook.steer[0].sae", "unknown SAE"),
    ({"saehook": {"steer": [{**STEER, "layer": 4}]}}, "saehook.steer[0].layer", "outside the model"),
    ({"saehook": {"steer": [STEER, {**STEER, "feature": 1024}]}}, "saehook.steer[1].feature", "out of range"),
    ({"saehook": {"steer": [{**STEER, "feature": -1}]}}, "saehook.steer[0].feature", "out of range"),
    ({"saehook": {"steer": [{**STEER, "value": float("inf")}]}}, "saehook.steer[0].value", "finite"),
    ({"saehook": {"steer": [{**STEER, "value": float("nan")}]}}, "saehook.steer[0].value", "finite"),
    ({"saehook": {"steer": [{**STEER, "op": "boost"}]}}, "saehook.steer[0].op", "add, clamp, scale, ablate"),
    ({"saehook": {"steer": [{**STEER, "op": "cap"}]}}, "saehook.steer[0].value", "does not apply to op 'cap'"),
    ({"saehook": {"steer": [{**STEER, "positions": "later"}]}}, "saehook.steer[0].positions", "all, prompt"),
    ({"saehook": {"steer": [{**STEER, "strength": 1}]}}, "saehook.steer[0].strength", "unknown field"),
    ({"saehook": {"steer": [STEER] * 5}}, "saehook.steer", "at most 4"),
    ({"saehook": {"features": {"top": 9}}}, "saehook.features.top", "limit of 8"),
    ({"saehook": {"features": {"layer": -1}}}, "saehook.features.layer", "outside the model"),
    ({"saehook": {"feature": {}}}, "saehook.feature", "unknown field"),
    ({"max_tokens": 65}, "max_tokens", "limit of 64"),
    ({"max_tokens": 0}, "max_tokens", "must be in"),
    ({"temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"prompt": "x" * 200}, "prompt", "context"),
    ({"prompt": [1, 2, 99999]}, "prompt[2]", "vocabulary"),
    ({"n": 2}, "n", "not supported"),
    ({"logit_bias": {"5": -100}}, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"saehook": {"steer": [{"feature": 1, "op": "clamp"}]}}, "saehook.steer[0].value", "required"),
    ({"saehook": {"steer": {"feature": 1}}}, "saehook.steer", "list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
]


@pytest.mark.parametrize("extra,param,message", ERRORS, ids=[e[1] + ":" + e[2] for e in ERRORS])
def test_bad_requests_name_the_field(demo_server, extra, param, message):
    body = {"prompt": PROMPT, "max_tokens": 4, **extra}
    raw = json.dumps(body).encode()  # json.dumps writes NaN/Infinity, as sloppy clients do
    status, err = post(demo_server, "/v1/completions", None, raw=raw)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and message in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error"


def test_other_errors(demo_server):
    client = demo_server.client()
    with pytest.raises(openai.BadRequestError) as e:  # the official client sees the error object
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"saehook": {"steer": [{"feature": 5000, "op": "add", "value": 1}]}})
    assert e.value.body["param"] == "saehook.steer[0].feature"
    status, err = post(demo_server, "/v1/chat/completions", {"messages": []})
    assert status == 400 and err["error"]["param"] == "messages"
    status, err = post(demo_server, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    status, err = post(demo_server, "/v1/completions", {"prompt": "x" * 30000})
    assert status == 413 and err["error"]["code"] == "body_too_large"
    status, err = post(demo_server, "/v1/nothing", {})
    assert status == 404 and "error" in err
    # the server still serves
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


# ---------------------------------------------------------------------------------------------
# a tiny random qwen3: API key, a full queue, SIGTERM drains


def tiny_qwen3_and_sae(d, name, *, layers, model_seed=0, sae_seed=0):
    """A tiny random qwen3 GGUF (hidden 128) and a random 512-feature SAE at its block 1, written
    into d: (model path, SAE path)."""
    model, sae_path = d / f"{name}-f32.gguf", d / f"{name}-sae.safetensors"
    gm.write_gguf(gm.build_hf_model(num_hidden_layers=layers, hidden_size=128, intermediate_size=256,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=64, seed=model_seed), model)
    rng = np.random.default_rng(sae_seed)
    sae = saehook.SAE((rng.standard_normal((512, 128)) / 11).astype(np.float32),
                      (rng.standard_normal((512, 128)) / 11).astype(np.float32), k=8)
    sae.metadata["layer"] = 1
    sae.save(str(sae_path))
    return model, sae_path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return tiny_qwen3_and_sae(tmp_path_factory.mktemp("serve"), "tiny", layers=2)


def test_api_key_queue_full_and_sigterm_drain(tiny_files):
    model, sae = tiny_files
    s = Server(model, "--sae", sae, "--parallel", 1, "--queue", 1, "--n-ctx", 4096, api_key="sekret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, err = post(s, "/v1/completions", {"prompt": "hello", "max_tokens": 2}, headers=headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        client = s.client("sekret")
        assert client.models.list().data
        status, err = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                           headers={"Authorization": "Bearer sekret"})  # this GGUF has no chat template
        assert status == 400 and err["error"]["code"] == "no_chat_template" and err["error"]["param"] == "messages"
        status, err = post(s, "/v1/completions", {"prompt": "x", "saehook": {"features": {"top": 9}}},
                           headers={"Authorization": "Bearer sekret"})  # this SAE keeps k = 8 per token
        assert status == 400 and err["error"]["param"] == "saehook.features.top" and "k = 8" in err["error"]["message"]
        # one running (a long stream), one waiting: the third is refused with 503, the others finish
        long = client.completions.create(model="m", prompt="hello", max_tokens=3000, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
        it = iter(long)
        next(it)
        waiting = {}
        t = threading.Thread(target=lambda: waiting.setdefault("r", client.completions.create(
            model="m", prompt="abc", max_tokens=3, temperature=0)))
        t.start()
        deadline = time.monotonic() + 10
        while s.health()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, err = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2},
                           headers={"Authorization": "Bearer sekret"})
        assert status == 503 and err["error"]["code"] == "queue_full", err
        long.close()  # disconnect: the waiting request gets the slot
        t.join(60)
        assert waiting["r"].usage.completion_tokens <= 3 and waiting["r"].choices[0].finish_reason in ("length", "stop")
        # SIGTERM while a request streams: it finishes, then the server exits 0
        stream = client.completions.create(model="m", prompt="hello", max_tokens=1500, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length" and len(rest) == 1500
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# a tiny qwen35 hybrid (Gated DeltaNet + full attention): the same guarantees


def fresh(llm):
    """llm.reset() and the recurrent state too (Llama.reset keeps it, and a hybrid model's next
    prompt then fails to find a KV slot)."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)


def greedy_ids(llm, ids, n, steerings=(), *, stop_at_eos=True):
    """HookedLlama's own greedy generation from a fresh state: up to n token ids after `ids` under
    `steerings` (before the end-of-text token unless stop_at_eos is False)."""
    fresh(llm)
    out = []
    with llm.steer(*steerings, control_vectors=False):
        for t in llm.generate(ids, temp=0.0):
            if (stop_at_eos and t == llm.token_eos()) or len(out) == n:
                break
            out.append(t)
    return out


def qwen35_model_and_sae(tmp_path, seed):
    """A tiny random qwen35 hybrid GGUF (the tests' writer, hidden 256) and a random 512-feature
    SAE at its layer 1, saved: (model path, SAE, SAE path)."""
    from saehook.demo.gguf_writer import write_random_qwen35

    D = 256  # write_random_qwen35's default width
    model = tmp_path / "qwen35.gguf"
    write_random_qwen35(model)
    rng = np.random.default_rng(seed)
    sae = saehook.SAE((rng.standard_normal((512, D)) / 16).astype(np.float32),
                      (rng.standard_normal((512, D)) / 16).astype(np.float32), k=8)
    sae.metadata["layer"] = 1
    sae_path = tmp_path / "sae.safetensors"
    sae.save(str(sae_path))
    return model, sae, sae_path


def hooked_features(llm, st, sae, prompt_ids, generated_ids, top=4, first_row=0):
    """The oracle's features: HookedLlama steered by `st`, capturing layer 1, evaluates the prompt
    and then each generated token as generate() feeds it; (position, id, top features, values)
    per captured row from `first_row` on."""
    fresh(llm)
    with llm.steer(st, control_vectors=False), llm.capture({1: sae}) as rec:
        llm.eval(prompt_ids)
        for t in generated_ids:
            llm._in_generate, llm._generate_evals = True, 1
            try:
                llm.eval([t])
            finally:
                llm._in_generate = False
    r = rec[1]
    want = []
    for row in range(first_row, len(r.tokens)):
        keep = r.indices[row] >= 0
        idx, val = r.indices[row][keep], r.values[row][keep]
        order = np.argsort(-val, kind="stable")[:top]
        want.append((int(r.positions[row]), int(r.tokens[row]), idx[order].tolist(), val[order].tolist()))
    return want


def test_qwen35_hybrid_concurrent_specs_equal_solo_and_hookedllama(tmp_path):
    model, sae, sae_path = qwen35_model_and_sae(tmp_path, 0)
    s = Server(model, "--sae", f"t={sae_path}", "--parallel", 8, "--n-ctx", 96, "--n-batch", 32)
    try:
        assert s.health()["mode"] == "split"  # README "Serve": equal prompt chunks on recurrent/hybrid models
        client = s.client()
        specs = [[{"feature": f, "op": "clamp", "value": v}] for f, v in
                 [(3, 2.0), (5, 1.5), (7, 2.5), (11, 2.0), (13, -1.0), (17, 3.0), (19, 2.0), (23, 1.8)]]
        prompts = ["hello world", "the cat", "hello world", "abc", "xyz", "the cat", "qq", "hello there"]

        def run(i):
            r = client.completions.create(model="m", prompt=prompts[i], max_tokens=12, temperature=0,
                                          extra_body={"saehook": {"steer": specs[i], "features": {"top": 4}}})
            return r.choices[0].text, r.choices[0].model_extra["saehook"]["features"]

        solo = [run(i) for i in range(8)]
        assert len({t for t, _ in solo}) > 4
        before = s.health()
        results = [None] * 8
        barrier = threading.Barrier(8)

        def worker(i):
            barrier.wait()
            results[i] = run(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [t for t, _ in results] == [t for t, _ in solo]
        after = s.health()
        # generated tokens of all sequences share a llama_decode: one decode per request would need
        # 8 prompt decodes + one per generated token (+ the last tokens' feature evaluations)
        n_tokens = sum(len(f) for _, f in solo)
        assert after["decodes"] - before["decodes"] < 8 + 0.75 * n_tokens, (after, n_tokens)
        # Features next to 7 other sequences vs alone: on this f32 qwen35, llama.cpp itself (no hook)
        # gives a sequence's logits ~1.3e-6 apart when it shares a decode with another sequence
        # (measured; bit-identical on the demo qwen3), which the residual's SAE encode carries to
        # ~1e-5: hence 1e-4 here, 1e-5 where the batches are the same (the oracle checks below).
        for (_, fa), (_, fb) in zip(results, solo):
            _check_features(fa, [(e["position"], e["id"], [f["feature"] for f in e["top"]],
                                  [f["value"] for f in e["top"]]) for e in fb], rtol=1e-4)
        # the oracle: HookedLlama's own generation with the same Steering, and its capture
        llm = HookedLlama(str(model), n_ctx=96, n_batch=32, n_ubatch=32, n_threads=1, verbose=False)
        try:
            for i in range(8):
                st = saehook.Steering(sae, layer=1).clamp(specs[i][0]["feature"], specs[i][0]["value"])
                prompt_ids = llm.tokenize(prompts[i].encode(), special=True)
                got_ids = [e["id"] for e in solo[i][1]]
                assert got_ids == greedy_ids(llm, prompt_ids, 12, [st])
                # random bytes: the text is Python's own replace-decoding of the tokens' bytes
                # (a character split across tokens is joined, an unfinished one at the end is U+FFFD)
                assert solo[i][0] == llm.detokenize(got_ids).decode("utf-8", errors="replace")
                _check_features(solo[i][1], hooked_features(llm, st, sae, prompt_ids, got_ids,
                                                            first_row=len(prompt_ids)))
        finally:
            llm.close()
    finally:
        assert s.stop() == 0


def test_qwen35_prompt_cache_restarts_from_a_checkpoint_of_the_same_steering(tmp_path):
    """A hybrid model's recurrent state cannot be cut back: the server keeps the state 4 tokens
    before each prompt's end (scheduler.CHECKPOINT_TAIL, as llama-server does), and a prompt
    sharing that prefix under the same steering restarts there. Oracle: HookedLlama's own
    generation from a clean state."""
    from saehook.serve.scheduler import CHECKPOINT_TAIL

    model, sae, sae_path = qwen35_model_and_sae(tmp_path, 1)
    llm = HookedLlama(str(model), n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1, verbose=False)
    s = Server(model, "--sae", f"t={sae_path}", "--parallel", 1, "--n-ctx", 128, "--n-batch", 32)
    try:
        client = s.client()
        spec = [{"feature": 5, "op": "clamp", "value": 2.5}]
        st = saehook.Steering(sae, layer=1).clamp(5, 2.5)

        def want(prompt, steerings):
            ids = greedy_ids(llm, llm.tokenize(prompt.encode(), special=True), 10, steerings)
            return llm.detokenize(ids).decode("utf-8", errors="replace")

        def run(prompt, steer=None):
            r = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0,
                                          extra_body={"saehook": {"steer": steer}} if steer else None)
            return r.choices[0].text, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

        base = "the quick brown fox jumps over"
        n_prompts = []
        # (prompt, steering, the earlier request whose checkpoint serves it or None)
        for prompt, steer, steerings, served_by in [
                (base + " a", None, (), None),
                (base + " b", None, (), 0),             # the unsteered checkpoint serves
                (base + " c", spec, (st,), None),       # not a steered prompt
                (base + " d", spec, (st,), 2),          # the steered checkpoint serves
                (base[:12] + "X", spec, (st,), None),   # diverges before the checkpoint: from token 0
                (base + " e", spec, (st,), 4)]:         # the last request's checkpoint replaced the earlier one
            text, n_prompt, n_cached = run(prompt, steer)
            n_prompts.append(n_prompt)
            assert n_cached == (0 if served_by is None else n_prompts[served_by] - CHECKPOINT_TAIL), (prompt, steer)
            assert text == want(prompt, steerings), (prompt, steer)
    finally:
        llm.close()
        assert s.stop() == 0


def test_qwen35_prompts_arriving_together_share_their_decodes(tmp_path):
    """On a hybrid model the prompts admitted in one step are read in equal chunks, each decode
    holding the same number of tokens of every prompt in it (README "Serve", Concurrency): 4
    prompts of 11 tokens cost 2 prompt decodes (7 tokens up to the checkpoint, then the 4 of the
    tail), not 8, 4 of 4 tokens (no checkpoint) one, with one SAE encode each, and prompts of
    different lengths are all read within their first step; every request's tokens and its prompt's and tokens' features equal
    HookedLlama's own generation and capture under the same steering."""
    from saehook.serve import load_server
    from saehook.serve.protocol import parse_request
    from saehook.serve.scheduler import CHECKPOINT_TAIL, Job

    model, sae, sae_path = qwen35_model_and_sae(tmp_path, 2)
    clamps = [(3, 2.0), (5, 1.5), (7, 2.5), (11, -1.0)]
    state = load_server(str(model), {"t": str(sae_path)}, parallel=4, n_ctx=96, n_batch=64, n_threads=1)
    llm = HookedLlama(str(model), n_ctx=96, n_batch=64, n_ubatch=64, n_threads=1, verbose=False)
    try:
        sched = state.scheduler
        # --kv-layout auto keeps a hybrid model on the unified cache (llama.cpp's own answer)
        assert sched.mode == "split" and state.llm.context_params.kv_unified and not sched.streams
        rng = np.random.default_rng(3)  # the prompts' tokens
        # (prompt lengths, prompt decodes): different lengths are cut as split_equal cuts them, at
        # the fewest tokens any prompt has left to its end or checkpoint (26, 7, 1, -): 1 token
        # of each of the 4, 3 of each, 1 of 3, 2 of 2, 4 of 2, then 15 and 4 of the longest
        for lengths, prompt_decodes in (((11,) * 4, 2), ((CHECKPOINT_TAIL,) * 4, 1), ((30, 11, 5, 4), 7)):
            prompts = [[int(t) for t in rng.integers(1, 250, n)] for n in lengths]
            outs = [{"tokens": [], "features": [], "prompt": None, "done": threading.Event()} for _ in clamps]

            def emit(o):
                def f(kind, payload):
                    if kind == "token":
                        o.setdefault("first_step", sched.steps)
                        o["tokens"].append(payload.id), o["features"].append(payload.features)
                    elif kind == "prompt_features":
                        o["prompt"] = payload
                    else:
                        o["error"] = payload if kind == "error" else None
                        o["done"].set()
                return f

            jobs = []
            for (f, v), o, ids in zip(clamps, outs, prompts):
                body = {"prompt": "x", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                        "saehook": {"steer": [{"feature": f, "op": "clamp", "value": v}],
                                    "features": {"top": 4, "prompt": True}}}
                jobs.append(Job(req=parse_request("completion", body, state.registry, state.limits), prompt=ids,
                                emit=emit(o)))
            before = sched.stats()
            with sched.cv:  # the worker waits on it: all four are admitted in the same step
                for j in jobs:
                    sched.submit(j)
            for o in outs:
                assert o["done"].wait(60) and o.get("error") is None, o.get("error")
            after = sched.stats()
            decodes = after["decodes"] - before["decodes"]
            gen = after["generation_decodes"] - before["generation_decodes"]
            assert decodes - gen == prompt_decodes, (before, after)
            # 50 prompt tokens fit n_batch 64: every prompt is read in the step it arrives, the long
            # one too (its first token then comes a step later, with its features)
            assert len({o["first_step"] for o in outs}) == 1, [o["first_step"] for o in outs]
            assert after["encodes"] - before["encodes"] == decodes  # one encode per decode: all four share it
            for (f, v), o, ids in zip(clamps, outs, prompts):
                st = saehook.Steering(sae, layer=1).clamp(f, v)
                want_ids = greedy_ids(llm, ids, 5, [st], stop_at_eos=False)
                assert o["tokens"] == want_ids
                # next to 3 other sequences: llama.cpp's own ~1e-6 differences (see the test above)
                _check_features(o["prompt"] + o["features"], hooked_features(llm, st, sae, ids, want_ids), rtol=1e-4)
    finally:
        llm.close()
        state.scheduler.close()
        state.llm.close()


@pytest.mark.parametrize("flash_attn", ["off", "on"])
def test_streams_layout_out_of_order_finishes_stay_one_micro_batch(tmp_path, flash_attn):
    """kv_layout "streams" (one KV stream per sequence): 4 requests with 4 clamps, the third
    ending first, so sequences 0, 1 and 3 generate around an idle one. Every step stays one
    micro-batch (one SAE encode per decode: the idle sequence gets a padding token, removed
    after), every request's tokens and features equal HookedLlama's alone (flash attention too:
    a stream holds one sequence's cells), and the idle sequence's cached prompt is intact: a
    request repeating it reuses it and still equals its solo run."""
    import llama_cpp

    from saehook.serve import load_server
    from saehook.serve.protocol import parse_request
    from saehook.serve.scheduler import Job

    # 3 blocks, the SAE at block 1 (not the last, where only output rows exist)
    model, sae_path = tiny_qwen3_and_sae(tmp_path, "tiny3", layers=3, model_seed=3, sae_seed=1)
    sae = saehook.load(str(sae_path))
    clamps, lengths = [(3, 2.0), (5, 1.5), (7, 2.5), (11, -1.0)], [12, 12, 3, 12]
    state = load_server(str(model), {"t": str(sae_path)}, parallel=4, n_ctx=96, n_batch=64, n_threads=1,
                        kv_layout="streams", flash_attn=flash_attn, prefilter="off")
    fa = {"off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED}[flash_attn]
    llm = HookedLlama(str(model), n_ctx=96, n_batch=64, n_ubatch=64, n_threads=1, verbose=False,
                      context_overrides={"flash_attn_type": fa})
    rng = np.random.default_rng(4)
    # longest first: the equal prompt chunks then always cover consecutive sequences (prompts
    # being read are not padded, so a gap there would cut a decode in two)
    prompts = [[int(t) for t in rng.integers(1, 250, n)] for n in (9, 7, 6, 5)]

    def run(jobs_spec, prompt_features=True):
        outs, jobs = [], []
        for (f, v), n, ids in jobs_spec:
            o = {"tokens": [], "features": [], "prompt": [], "done": threading.Event(), "cached": None}

            def emit(kind, payload, o=o):
                if kind == "token":
                    o["tokens"].append(payload.id), o["features"].append(payload.features)
                elif kind == "prompt_features":
                    o["prompt"] = payload
                else:
                    o["error"] = payload if kind == "error" else None
                    if kind == "done":
                        o["cached"] = payload["usage"]["prompt_tokens_details"]["cached_tokens"]
                    o["done"].set()
            body = {"prompt": "x", "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "saehook": {"steer": [{"feature": f, "op": "clamp", "value": v}], "features": {"top": 4, "prompt": prompt_features}}}
            jobs.append(Job(req=parse_request("completion", body, state.registry, state.limits), prompt=ids, emit=emit))
            outs.append(o)
        with sched.cv:  # admitted in one step, in this order: slot (and sequence) i for job i
            for j in jobs:
                sched.submit(j)
        for o in outs:
            assert o["done"].wait(60) and o.get("error") is None, o.get("error")
        return outs

    def solo(f, v, n, ids):
        st = saehook.Steering(sae, layer=1).clamp(f, v)
        got = greedy_ids(llm, ids, n, [st], stop_at_eos=False)
        return got, hooked_features(llm, st, sae, ids, got)

    try:
        sched = state.scheduler
        assert sched.mode == "split" and sched.streams
        before = sched.stats()
        outs = run(list(zip(clamps, lengths, prompts)))
        after = sched.stats()
        per_decode = {int(e): n - before["encodes_per_decode"].get(e, 0) for e, n in after["encodes_per_decode"].items()}
        assert {e: n for e, n in per_decode.items() if n} == {1: after["decodes"] - before["decodes"]}, per_decode
        for (f, v), n, ids, o in zip(clamps, lengths, prompts, outs):
            want, feats = solo(f, v, n, ids)
            assert o["tokens"] == want
            # the server reads the prompts in equal chunks (5 tokens, then 1), HookedLlama each whole:
            # llama.cpp's products round by batch shape (~1e-5 here; its flash attention, which
            # takes another kernel for a single query and rounds in f16, ~2e-4)
            _check_features(o["prompt"] + o["features"], feats, rtol=1e-4 if flash_attn == "off" else 1e-3)
        # the idle slot kept its prompt: the same prompt and clamp again reuse it (the padding
        # tokens written next to it were removed) and give the solo tokens
        (again,) = run([(clamps[2], 6, prompts[2])], prompt_features=False)
        assert again["cached"] == len(prompts[2]) - 1
        assert again["tokens"] == solo(*clamps[2], 6, prompts[2])[0]
    finally:
        llm.close()
        state.scheduler.close()
        state.llm.close()


def test_streams_layout_copies_a_cached_prefix_next_to_the_running_sequences(tmp_path):
    """Streams: a request whose prompt is cached on a slot away from the running sequence runs on
    the slot next to it instead (one micro-batch per step, no padding row), with that slot's
    stream copied from the one holding the prefix: the prefix is reused (cached_tokens), and the
    tokens and features equal HookedLlama's alone, which they would not if the copy moved the
    cells' bookkeeping without their data (the slot held another prompt's KV before)."""
    from saehook.serve import load_server
    from saehook.serve.protocol import parse_request
    from saehook.serve.scheduler import Job

    model, sae_path = tiny_qwen3_and_sae(tmp_path, "tiny3", layers=3, model_seed=5, sae_seed=2)
    sae = saehook.load(str(sae_path))
    state = load_server(str(model), {"t": str(sae_path)}, parallel=4, n_ctx=96, n_batch=64, n_threads=1,
                        kv_layout="streams", prefilter="off")
    llm = HookedLlama(str(model), n_ctx=96, n_batch=64, n_ubatch=64, n_threads=1, verbose=False)
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(1, 250, 10)] for _ in range(4)]
    sched = state.scheduler

    def job(ids, n, clamp, first_token=None):
        o = {"tokens": [], "features": [], "done": threading.Event()}

        def emit(kind, payload):
            if kind == "token":
                o["tokens"].append(payload.id), o["features"].append(payload.features)
                if first_token is not None:
                    first_token.set()
            elif kind != "prompt_features":
                o["error"] = payload if kind == "error" else None
                if kind == "done":
                    o["cached"] = payload["usage"]["prompt_tokens_details"]["cached_tokens"]
                o["done"].set()
        body = {"prompt": "x", "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "saehook": {"steer": [{"feature": clamp[0], "op": "clamp", "value": clamp[1]}],
                            "features": {"top": 4}}}
        return Job(req=parse_request("completion", body, state.registry, state.limits), prompt=ids, emit=emit), o

    def wait(*outs):
        for o in outs:
            assert o["done"].wait(60) and o.get("error") is None, o.get("error")

    try:
        assert sched.streams
        clamp = (3, 2.0)
        # the four prompts cached on slots 0-3 (admitted in one step, in order), under one clamp
        pairs = [job(ids, 2, clamp) for ids in prompts]
        with sched.cv:
            for j, _ in pairs:
                sched.submit(j)
        wait(*(o for _, o in pairs))
        assert [s.tokens[:10] for s in sched.slots] == prompts
        # a long request on prompt 0 (slot 0, nothing running), then prompt 3 while it runs
        started = threading.Event()
        long_job, long_out = job(prompts[0] + [7], 30, clamp, first_token=started)
        sched.submit(long_job)
        assert started.wait(60)
        copies, before = sched.stream_copies, sched.stats()
        late_job, late_out = job(prompts[3] + [9], 8, clamp)
        sched.submit(late_job)
        wait(late_out, long_out)
        after = sched.stats()
        assert long_job.slot.seq == 0 and late_job.slot.seq == 1 and sched.stream_copies == copies + 1
        assert late_out["cached"] == len(prompts[3])
        per_decode = {int(e): n - before["encodes_per_decode"].get(e, 0) for e, n in after["encodes_per_decode"].items()}
        assert {e: n for e, n in per_decode.items() if n} == {1: after["decodes"] - before["decodes"]}, per_decode
        st = saehook.Steering(sae, layer=1).clamp(*clamp)
        for j, o, n in ((long_job, long_out, 30), (late_job, late_out, 8)):
            want = greedy_ids(llm, j.prompt, n, [st], stop_at_eos=False)
            assert o["tokens"] == want
            _check_features(o["features"], hooked_features(llm, st, sae, j.prompt, want, first_row=len(j.prompt)),
                            rtol=1e-4)
        # the source slot kept its own cache
        assert sched.slots[3].tokens[:10] == prompts[3]
        # the copy moves the whole stream: it pays for a 10-token prefix of this model at its
        # 96-cell context, not for 3 tokens, nor at a context so long that 10 tokens cost less
        import llama_cpp

        from saehook.serve.scheduler import FLOPS_PER_BYTE
        src = sched.slots[3]
        per_cell = llama_cpp.llama_state_seq_get_size_ext(sched.ctx, src.seq, 0) / len(src.tokens)
        flops = 2.0 * llama_cpp.llama_model_n_params(state.llm._model.model)
        assert sched._copy_pays(src, 10) and not sched._copy_pays(src, 3)
        n_ctx = sched.n_ctx
        try:
            sched.n_ctx = int(10 * flops / (2 * per_cell * FLOPS_PER_BYTE)) + 100  # 10 tokens < the copy
            assert not sched._copy_pays(src, 10)
        finally:
            sched.n_ctx = n_ctx
    finally:
        llm.close()
        state.scheduler.close()
        state.llm.close()


def test_streams_layout_is_refused_where_it_cannot_serve(tmp_path, tiny_files):
    """--kv-layout streams on a hybrid model or with --decode batched is refused; auto (the
    default) picks what serves."""
    from saehook.serve import load_server

    model, _, sae_path = qwen35_model_and_sae(tmp_path, 5)
    with pytest.raises(ValueError, match="--kv-layout streams is for transformer models"):
        load_server(str(model), {"t": str(sae_path)}, parallel=2, n_ctx=64, kv_layout="streams")
    tiny, tiny_sae = tiny_files
    with pytest.raises(ValueError, match="batched decoding .* one KV stream per sequence"):
        load_server(str(tiny), {"t": str(tiny_sae)}, parallel=2, n_ctx=64, kv_layout="streams", decode="batched")
    with pytest.raises(ValueError, match="--kv-layout must be auto, unified or streams, got 'paged'"):
        load_server(str(tiny), {"t": str(tiny_sae)}, kv_layout="paged")
    # the default (auto): streams on a transformer model, unified where --decode batched needs it
    for decode, unified, mode in (("auto", False, "split"), ("batched", True, "batched")):
        state = load_server(str(tiny), {"t": str(tiny_sae)}, parallel=2, n_ctx=64, decode=decode)
        try:
            assert state.llm.context_params.kv_unified == unified and state.scheduler.mode == mode
        finally:
            state.scheduler.close()
            state.llm.close()


def test_flash_attn_option_reaches_llama_cpp(demo_sae):
    """load_server(flash_attn=...): "on" computes what HookedLlama with flash attention computes,
    which on this prompt is not what the default (off) gives; a wrong value is refused."""
    from saehook.serve import load_server
    from saehook.serve.protocol import parse_request
    from saehook.serve.scheduler import Job

    prompt = "This module provides a way to"  # greedy text differs with and without flash attention on the demo

    with pytest.raises(ValueError, match="flash_attn must be one of auto, on, off, got 'yes'"):
        load_server(demo.MODEL, {}, flash_attn="yes")

    def served(flash_attn):
        state = load_server(demo.MODEL, {"demo": demo.SAE_FILE}, parallel=2, n_ctx=N_CTX, n_batch=64, n_threads=1,
                            chat_format=CHAT_FORMAT, flash_attn=flash_attn)
        try:
            req = parse_request("completion", {"prompt": prompt, "max_tokens": 12, "temperature": 0},
                                state.registry, state.limits)
            done, text = threading.Event(), []

            def emit(kind, payload):
                if kind == "token":
                    text.append(payload.text)
                elif kind in ("done", "error"):
                    done.set()

            state.scheduler.submit(Job(req=req, prompt=state.llm.tokenize(prompt.encode(), special=True), emit=emit))
            assert done.wait(60)
            return "".join(text)
        finally:
            state.scheduler.close()
            state.llm.close()

    def oracle(flash_attn):
        llm = HookedLlama(demo.MODEL, n_ctx=N_CTX, n_batch=64, n_ubatch=64, n_threads=1, verbose=False,
                          flash_attn=flash_attn)
        try:
            return oracle_completion(llm, prompt)[0]
        finally:
            llm.close()

    with_fa, without = oracle(True), oracle(False)
    assert with_fa != without  # the prompt tells the two apart
    assert served("on") == with_fa
    assert served("off") == without


def test_command_line_errors(tmp_path, capsys):
    from saehook.cli import main

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "saehook", "serve", *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    r = serve(tmp_path / "missing.gguf")
    assert r.returncode == 2 and "missing.gguf: no such model file" in r.stderr
    narrow = saehook.SAE(np.ones((32, 64), np.float32), np.ones((32, 64), np.float32), k=4)
    narrow.metadata["layer"] = 1
    narrow.save(str(tmp_path / "narrow.safetensors"))
    r = serve(demo.MODEL, "--sae", f"n={tmp_path / 'narrow.safetensors'}", "--port", free_port())
    assert r.returncode == 2 and "d_model 64 does not match the model's n_embd 128" in r.stderr, r.stderr
    assert main(["serve", demo.MODEL, "--sae", "a=x", "--sae", "a=y"]) == 2
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--sae", "--host", "--port", "--parallel", "--n-ctx", "--api-key", "--threads", "--n-gpu-layers",
                 "--chat-format", "--queue", "--max-tokens", "--max-steer-ops", "--max-top", "--max-body", "--decode"):
        assert flag in help_text


def test_default_context_is_the_training_context_and_a_taken_port_is_said_first():
    # the demo model was trained on 512-token contexts: without --n-ctx each request holds 512
    # tokens (as llama-server defaults to the training context), and llama.cpp's warning about
    # the whole unified cache against it is not printed
    from saehook.engines.protocol import gguf_model_facts

    assert gguf_model_facts(demo.MODEL)["n_ctx_train"] == 512
    s = Server(demo.MODEL, "--parallel", 2)
    try:
        st, body = post(s, "/v1/completions", {"prompt": " the" * 600, "max_tokens": 4})
        assert st == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert "holds 512 per request" in body["error"]["message"], body
        st, body = post(s, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert st == 200, body
        # the same port again: refused before any model loads, naming the address
        r = subprocess.run([sys.executable, "-m", "saehook", "serve", str(demo.MODEL), "--port", str(s.port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{s.port}" in r.stderr, r.stderr
        assert "llama" not in r.stderr, r.stderr  # nothing was loaded
    finally:
        s.stop()
    assert not any("n_ctx_train" in line for line in s.output), "".join(s.output)


def test_a_context_above_the_training_context_is_warned():
    from saehook.serve import load_server

    with pytest.warns(UserWarning, match=r"--n-ctx 1024 is above .*training context \(512 tokens\)"):
        state = load_server(demo.MODEL, {}, parallel=1, n_ctx=1024, n_threads=1)
    try:
        assert state.scheduler.n_ctx == 1024  # used as given
    finally:
        state.scheduler.close()
        state.llm.close()


def test_labels_in_features_and_label_named_steering(tmp_path, demo_sae):
    """An SAE with a label file: feature entries carry "label", a steer op may name its feature
    "label:TEXT" (the same output as by index), and an ambiguous label is a 400 listing both."""
    import shutil

    sae_path = str(tmp_path / "demo-sae.safetensors")
    shutil.copy(demo.SAE_FILE, sae_path)
    labelled = saehook.load(sae_path)
    store = labelled.labels
    for f in range(demo_sae.d_sae):  # every feature named, so whatever fires shows a label
        store.set(f, f"feature number {f}", source="imported")
    store.set(23, "dash runs", source="imported")
    store.set(5, "dash start", source="imported")
    store.save()
    s = Server(demo.MODEL, "--sae", f"demo={sae_path}", "--n-ctx", N_CTX, "--parallel", 2)
    try:
        def run(feature):
            st, body = post(s, "/v1/completions", {
                "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                "saehook": {"steer": [{"feature": feature, "op": "clamp", "value": 20.0}],
                            "features": {"top": 3}}})
            assert st == 200, body
            return body["choices"][0]

        by_label, by_index = run("label:dash runs"), run(23)
        assert by_label["text"] == by_index["text"]
        entries = by_label["saehook"]["features"]
        assert entries and all(t["label"] == store.label(t["feature"]) for e in entries for t in e["top"])
        st, body = post(s, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "saehook": {
            "steer": [{"feature": "label:dash", "op": "clamp", "value": 1.0}]}})
        assert st == 400 and body["error"]["param"] == "saehook.steer[0].feature"
        assert "#23" in body["error"]["message"] and "#5" in body["error"]["message"]
    finally:
        assert s.stop() == 0, "".join(s.output)


def test_serve_command_passes_flash_attn(monkeypatch):
    """`saehook serve --flash-attn on` reaches load_server; the default is off; a wrong value is
    refused by argparse with the flag named."""
    import saehook.serve
    from saehook import cli

    seen = []

    class Stop(Exception):
        pass

    prefilters, layouts = [], []

    def fake_load_server(model, saes, **kw):
        seen.append(kw["flash_attn"])
        prefilters.append(kw["prefilter"])
        layouts.append(kw["kv_layout"])
        raise Stop

    monkeypatch.setattr(saehook.serve, "load_server", fake_load_server)  # the command imports it when run
    for argv, want in ((["--flash-attn", "on"], "on"), ([], "off")):
        with pytest.raises(Stop):
            cli.main(["serve", demo.MODEL, *argv])
        assert seen[-1] == want
    for flag in ("bf16", "off"):
        with pytest.raises(Stop):
            cli.main(["serve", demo.MODEL, "--prefilter", flag])
    assert prefilters == ["auto", "auto", "bf16", "off"]
    with pytest.raises(Stop):
        cli.main(["serve", demo.MODEL, "--kv-layout", "unified"])
    assert layouts == ["auto"] * 4 + ["unified"]
    with pytest.raises(SystemExit):
        cli.main(["serve", demo.MODEL, "--prefilter", "int8"])
    with pytest.raises(SystemExit):
        cli.main(["serve", demo.MODEL, "--flash-attn", "yes"])


def test_prefilter_of_a_narrow_encoder_is_refused_before_the_model_loads(tmp_path, demo_sae):
    from saehook.serve import load_server

    path = str(tmp_path / "demo-bf16.safetensors")
    demo_sae.save(path, dtype="bf16")
    with pytest.raises(ValueError, match=r"--prefilter bf16: --sae narrow=.* has a bf16 encoder"):
        load_server(demo.MODEL, {"narrow": path}, prefilter="bf16")
    with pytest.raises(ValueError, match=r"--prefilter must be one of auto, bf16, off, got 'int8'"):
        load_server(demo.MODEL, {"narrow": path}, prefilter="int8")


def test_prefilter_auto_takes_float32_encoders_on_the_cpu_only(tmp_path, demo_sae):
    """The default: the float32 SAE gets the prefilter, a bf16 one is served as it is (no
    error), and with offloaded layers (the hook then encodes on the GPU) none gets it."""
    from saehook.serve import load_server

    narrow = str(tmp_path / "demo-bf16.safetensors")
    demo_sae.save(narrow, dtype="bf16")
    state = load_server(demo.MODEL, {"wide": demo.SAE_FILE, "narrow": narrow}, parallel=1, n_ctx=64)
    try:
        got = {d["name"]: d["prefilter"] for d in state.registry.describe()}
        assert got == {"wide": "bf16", "narrow": None}
        assert state.registry.saes["wide"].prefilter_stats()["bytes"] > 0
    finally:
        state.scheduler.close()
        state.llm.close()
    state = load_server(demo.MODEL, {"wide": demo.SAE_FILE}, parallel=1, n_ctx=64, n_gpu_layers=1)
    try:
        assert state.registry.saes["wide"].prefilter is None
    finally:
        state.scheduler.close()
        state.llm.close()
