"""The steering playground (`saehook serve`'s GET /) in a real browser: headless Chromium driven
through Playwright's Python API against a live `saehook serve` subprocess on the shipped demo
model. Oracles: the server's own non-streamed answer to the same request (the features the page
shows, the steered text), saehook.steering_spec.load_spec (the copied --spec), and
export_control_vector plus llama.cpp's control-vector adapter (the downloaded GGUF). Screenshots
are decoded and checked for content and shading. The browser tests skip, saying why, where the
playwright package or Chromium is missing; the endpoints' own test needs neither."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
try:
    from playwright import sync_api
except ImportError:  # the endpoint test still runs; the browser tests skip
    sync_api = None
CHROMIUM = next((p for p in (os.environ.get("SAEHOOK_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)

import saehook  # noqa: E402
from saehook import demo  # noqa: E402
from saehook.labels import LabelStore, similar_features  # noqa: E402

from test_serve import Server, post  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
SHADE = np.array([235, 125, 25])        # --shade in playground.css
with open(demo.LABELS, encoding="utf-8") as _fh:
    _DEMO = json.load(_fh)
CODE = _DEMO["demo_feature"]          # the demo's code feature (chosen by measurement at build time)
CODE_VALUE = _DEMO["demo_value"]      # and its clamp value
CODE_LOG_ODDS = _DEMO["code_log_odds"]
OTHER = next(f for f in (444, 445) if f != CODE)
LABELLED = {CODE: "Python code is starting (test label)", OTHER: "inside a word (test label)"}
PROMPT = "The function returns"
MAX_TOKENS = 24
N_CTX = 256


@pytest.fixture(scope="module")
def sae_copy(tmp_path_factory):
    """The demo SAE with a label file beside it (made here: the demo ships none)."""
    d = tmp_path_factory.mktemp("pg")
    path = d / "demo-sae.safetensors"
    shutil.copy(demo.SAE_FILE, path)
    sae = saehook.load(str(path))
    store = LabelStore.open(sae)
    # every feature the demo's own description covers gets a label from its top tokens, two get
    # words to search for
    with open(os.path.join(demo.DATA, "demo-features.json")) as fh:
        described = json.load(fh)["features"]
    for f, d in described.items():
        # spaces shown as '·': the page's HTML collapses runs of them (BPE tokens of indentation)
        store.set(int(f), "top tokens " + " ".join(repr(t[0]).replace(" ", "·") for t in d["top_tokens"][:3]),
                  source="test_playground")
    for f, text in LABELLED.items():
        store.set(f, text, source="test_playground")
    store.save()
    return str(path)


@pytest.fixture(scope="module")
def server(sae_copy):
    s = Server(demo.MODEL, "--sae", f"demo={sae_copy}", "--parallel", 2, "--n-ctx", N_CTX, "--n-batch", 64,
               "--chat-format", "chatml", "--max-tokens", 64)
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def browser():
    if sync_api is None:
        pytest.skip("the playwright Python package is not installed (pip install playwright; the browser is "
                    "Debian's chromium, no `playwright install` needed)")
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt install chromium, or SAEHOOK_CHROMIUM=PATH)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server, tmp_path):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    pg = ctx.new_page()
    pg.problems, pg.requests = [], []
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(server.base + "/")
    pg.wait_for_function("document.getElementById('server-info').textContent.includes('labels')")
    pg.click("#settings summary")
    pg.fill("#temperature", "0")          # greedy: the page's answers are reproducible by the oracle
    pg.fill("#max-tokens", str(MAX_TOKENS))
    pg.click("#settings summary")
    yield pg
    ctx.close()


def read_png(path) -> np.ndarray:
    """RGB(A) 8-bit PNG -> (h, w, 3) uint8 (the five scanline filters undone, a pixel at a time)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            ch = 4 if ctype == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * ch + 1)
    img = np.zeros((h, w, ch), np.int32)
    prev = np.zeros((w, ch), np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32).reshape(w, ch)
        if f == 0:
            out = line
        elif f == 2:
            out = (line + prev) & 0xFF
        else:
            out = np.zeros((w, ch), np.int32)
            left = np.zeros(ch, np.int32)
            ul = np.zeros(ch, np.int32)
            for x in range(w):
                up = prev[x]
                if f == 1:
                    pred = left
                elif f == 3:
                    pred = (left + up) // 2
                else:
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
                left = out[x] = (line[x] + pred) & 0xFF
                ul = up
        img[y] = out
        prev = out
    return img[:, :, :3].astype(np.uint8)


def keep(png) -> None:
    """SAEHOOK_TEST_SCREENSHOTS=DIR keeps the screenshots for a person to look at."""
    d = os.environ.get("SAEHOOK_TEST_SCREENSHOTS")
    if d:
        os.makedirs(d, exist_ok=True)
        shutil.copy(png, d)


def shade_pixels(img: np.ndarray) -> int:
    """Pixels tinted by the shading colour (rgba(--shade, a) over white, a >= ~0.2)."""
    r, g, b = (img[:, :, c].astype(int) for c in range(3))
    return int(((r - b > 40) & (r > 150) & (g < r)).sum())


def assert_not_blank(img: np.ndarray) -> None:
    """Text and more than a few colours: a page that rendered."""
    dark = (img.max(axis=2) < 100).mean()          # text
    assert 0.005 < dark < 0.5, f"{dark:.4f} of the pixels are dark: blank or broken page"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def labels_of(server):
    """Every label, from the server's own labels endpoint."""
    out = {}
    for lo in range(0, 1024, 256):
        q = ",".join(map(str, range(lo, lo + 256)))
        with urllib.request.urlopen(f"{server.base}/v1/saehook/labels?features={q}", timeout=10) as r:
            out.update({f: v for f, v in json.loads(r.read())["data"].items() if v})
    return out


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def answer_tokens(pg, kind, turn=-1):
    return pg.eval_on_selector_all(f".turn >> nth={turn} >> .answer.{kind} .tok", "els => els.map(e => e.textContent)")


def token_entries(pg, selector):
    """The (position, id, top) of the tokens under `selector`, as the page holds them."""
    return pg.eval_on_selector_all(selector, "els => els.map(e => S.tokens[+e.dataset.t])")


def send(pg, prompt=PROMPT):
    pg.fill("#prompt", prompt)
    pg.click("#send")
    pg.wait_for_selector("#send:not([disabled])", timeout=120000)


def api_answer(server, prompt, saehook_obj, history=()):
    """The server's own non-streamed answer to the request the page sends."""
    body = {"messages": [*history, {"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "seed": 42, "saehook": saehook_obj}
    status, r = post(server, "/v1/chat/completions", body)
    assert status == 200, r
    return r["choices"][0]


def test_chat_streams_and_tokens_show_their_features(page, server, tmp_path):
    pg = page
    # count the separate DOM updates that add answer tokens: a streamed answer arrives in pieces
    pg.evaluate("""() => { window.__batches = 0; new MutationObserver(recs => {
        if (recs.some(r => r.target.closest && r.target.closest('.answer'))) window.__batches++; })
        .observe(document.getElementById('turns'), {childList: true, subtree: true}); }""")
    send(pg)
    assert not pg.is_visible("#error"), pg.inner_text("#error")
    toks = answer_tokens(pg, "default")
    assert len(toks) == MAX_TOKENS
    assert pg.evaluate("window.__batches") >= 3, "the answer did not stream in"
    assert "max tokens reached" in pg.inner_text(".answer.default .status")

    # the page shows what the server answers to the same request, token by token
    want = api_answer(server, PROMPT, {"features": {"sae": "demo", "top": 8, "prompt": True}})
    got = token_entries(pg, ".answer.default .tok")
    n_prompt = len(token_entries(pg, ".turn .tokens[aria-label^=prompt] .tok"))
    gen = [e for e in want["saehook"]["features"] if e["position"] >= n_prompt]
    assert [e["id"] for e in got] == [e["id"] for e in gen]
    assert "".join(toks).replace("↵", "") == want["message"]["content"]

    # focus a token whose top feature has a label: the inspector lists its features, labels and values
    # (one whose top feature is among the top ones of another token too, so the shading below shows two)
    on_page = [t["feature"] for e in token_entries(pg, ".tok") for t in e["top"]]
    i = next(i for i, e in enumerate(got[:-1]) if str(e["top"][0]["feature"]) in labels_of(server)
             and on_page.count(e["top"][0]["feature"]) >= 2)
    pg.locator(".answer.default .tok").nth(i).focus()
    rows = pg.eval_on_selector_all("#inspect tbody tr", "rs => rs.map(r => [...r.cells].slice(0, 3).map(c => c.textContent))")
    assert [(int(f), float(v)) for f, _, v in rows] == [(t["feature"], round(t["value"], 3)) for t in gen[i]["top"]]
    assert rows[0][1] == labels_of(server)[str(gen[i]["top"][0]["feature"])]
    assert f"position {gen[i]['position']}" in pg.inner_text("#inspect")

    # hovering a prompt token inspects it too
    pg.locator(".turn .tokens[aria-label^=prompt] .tok").nth(2).hover()
    assert "position 2, " in pg.inner_text("#inspect") and "· prompt" in pg.inner_text("#inspect")
    pg.locator(".answer.default .tok").nth(i).focus()
    # the keyboard moves between tokens (roving tabindex) and Enter shades by the token's top feature
    pg.keyboard.press("ArrowRight")
    assert f"position {gen[i + 1]['position']}" in pg.inner_text("#inspect")
    pg.keyboard.press("ArrowLeft")
    before = tmp_path / "turn-before-shading.png"
    pg.locator(".turn").first.screenshot(path=str(before))
    pg.keyboard.press("Enter")
    f0 = gen[i]["top"][0]["feature"]
    assert pg.is_visible("#legend") and f"feature {f0}" in pg.inner_text("#legend")
    assert labels_of(server)[str(f0)] in pg.inner_text("#legend")
    peak = max(t["value"] for e in want["saehook"]["features"] for t in e["top"] if t["feature"] == f0)
    assert f"{peak:.2f}" in pg.inner_text("#legend")
    alphas = pg.eval_on_selector_all(".tok", "els => els.map(e => +e.style.getPropertyValue('--a'))")
    assert max(alphas) == 1.0 and sum(a > 0 for a in alphas) >= 2 and min(alphas) == 0.0
    after = tmp_path / "turn-shaded.png"
    pg.locator(".turn").first.screenshot(path=str(after))
    keep(before), keep(after)
    img0, img1 = read_png(before), read_png(after)
    assert_not_blank(img0)
    assert_not_blank(img1)
    # the tokens' shading, not the legend's bar (outside the turn): a token at the peak is full colour
    assert shade_pixels(img0) == 0 and shade_pixels(img1) > 300, (shade_pixels(img0), shade_pixels(img1))
    assert (np.abs(img1.astype(int) - SHADE).max(axis=2) <= 8).sum() > 20
    page_shot = tmp_path / "page-shaded.png"
    pg.screenshot(path=str(page_shot), full_page=True)
    keep(page_shot)
    assert_not_blank(read_png(page_shot))

    # offline: the page fetched nothing but this server
    assert pg.requests and all(u.startswith(server.base + "/") or u.startswith("data:") for u in pg.requests), \
        pg.requests
    assert not pg.problems, pg.problems


def api_completion(server, prompt, saehook_obj):
    """The server's own non-streamed /v1/completions answer to the request the page sends."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 42,
            "saehook": {**(saehook_obj or {}), "features": {"sae": "demo", "top": 8, "prompt": True}}}
    status, r = post(server, "/v1/completions", body)
    assert status == 200, r
    return r["choices"][0]


def test_clamping_the_code_feature_turns_prose_into_code(page, server, sae_copy, tmp_path):
    """The demo's meaningful feature in the page: found by its label, clamped on a prose prompt,
    the steered column is the server's steered answer, differs from the default one and is more
    code-like (demo.code_likeness); the code feature is among the steered tokens' features."""
    pg = page
    pg.click("#settings summary")
    pg.select_option("#mode", "completion")
    pg.click("#settings summary")
    pg.fill("#find", "python code")
    pg.click("#find-form button[type=submit]")
    pg.wait_for_selector("#found li button")
    assert str(CODE) in pg.inner_text("#found") and LABELLED[CODE] in pg.inner_text("#found")
    pg.locator("#found li", has_text=LABELLED[CODE]).locator("button", has_text="Steer").click()
    pg.select_option("#op", "clamp")
    pg.fill("#value", str(CODE_VALUE))
    pg.click("#op-form button[type=submit]")
    spec = json.loads(pg.inner_text("#spec-json"))
    assert spec == {"steer": [{"sae": "demo", "layer": 2, "feature": CODE, "op": "clamp", "value": CODE_VALUE}]}
    send(pg, demo.PROMPT)
    assert not pg.is_visible("#error"), pg.inner_text("#error")
    steered, default = "".join(answer_tokens(pg, "steered")), "".join(answer_tokens(pg, "default"))
    assert steered and default and steered != default
    want_steered, want_default = api_completion(server, demo.PROMPT, spec), api_completion(server, demo.PROMPT, None)
    assert steered.replace("↵", "") == want_steered["text"] and default.replace("↵", "") == want_default["text"]
    ids_steered = [e["id"] for e in token_entries(pg, ".answer.steered .tok")]
    ids_default = [e["id"] for e in token_entries(pg, ".answer.default .tok")]
    c1, c0 = demo.code_likeness(ids_steered, CODE_LOG_ODDS), demo.code_likeness(ids_default, CODE_LOG_ODDS)
    assert c1 > c0 + 0.5, (c0, c1, default, steered)

    # inspect the first steered token: the inspector lists the features the server reports for it
    got = token_entries(pg, ".answer.steered .tok")
    pg.locator(".answer.steered .tok").nth(0).focus()
    rows = pg.eval_on_selector_all("#inspect tbody tr", "rs => rs.map(r => [...r.cells].slice(0, 3).map(c => c.textContent))")
    assert [(int(f), float(v)) for f, _, v in rows] == [(t["feature"], round(t["value"], 3)) for t in got[0]["top"]]
    shot = tmp_path / "code-steering.png"
    pg.screenshot(path=str(shot), full_page=True)
    keep(shot)
    assert_not_blank(read_png(shot))
    assert not pg.problems, pg.problems


def test_clamp_steers_side_by_side_and_the_spec_is_what_is_sent(page, server, sae_copy, tmp_path):
    pg = page
    # find the labelled feature by label search, steer it with a clamp
    pg.fill("#find", "python code")
    pg.click("#find-form button[type=submit]")
    pg.wait_for_selector("#found li button")
    assert str(CODE) in pg.inner_text("#found") and LABELLED[CODE] in pg.inner_text("#found")
    pg.locator("#found li", has_text=LABELLED[CODE]).locator("button", has_text="Steer").click()
    pg.select_option("#op", "clamp")
    pg.fill("#value", "12")
    pg.click("#op-form button[type=submit]")
    spec = json.loads(pg.inner_text("#spec-json"))
    assert spec == {"steer": [{"sae": "demo", "layer": 2, "feature": CODE, "op": "clamp", "value": 12}]}
    history = ()
    send(pg)
    assert not pg.is_visible("#error"), pg.inner_text("#error")
    steered, default = "".join(answer_tokens(pg, "steered")), "".join(answer_tokens(pg, "default"))
    assert steered and default and steered != default
    # the two columns are the server's answers with and without the spec shown on the page
    assert steered.replace("↵", "") == api_answer(server, PROMPT, spec, history)["message"]["content"]
    assert default.replace("↵", "") == api_answer(server, PROMPT, None, history)["message"]["content"]
    shot = tmp_path / "side-by-side.png"
    pg.screenshot(path=str(shot), full_page=True)
    keep(shot)
    assert_not_blank(read_png(shot))

    # the copied JSON is the server's saehook object; the copied --spec loads with steering_spec
    pg.click("#copy-json")
    pg.wait_for_function("document.getElementById('spec-status').textContent.includes('copied')")
    assert json.loads(pg.evaluate("navigator.clipboard.readText()")) == spec
    pg.click("#copy-spec")
    pg.wait_for_function("document.getElementById('spec-status').textContent.includes('--spec JSON copied')")
    sts = saehook.load_spec(pg.evaluate("navigator.clipboard.readText()"), saehook.load(sae_copy))
    assert [(st.layer, [(o.op, o.feature, o.value) for o in st.ops]) for st in sts] == [(2, [("clamp", CODE, 12.0)])]
    assert pg.is_disabled("#download-cvec")      # clamp is not a control vector

    # "features of this text": total activation over the page's tokens, largest first
    pg.click("#text-features")
    first = pg.inner_text("#found li >> nth=0")
    totals = {}
    for e in token_entries(pg, ".tok"):
        for t in e["top"]:
            totals[t["feature"]] = totals.get(t["feature"], 0.0) + t["value"]
    best = max(totals, key=lambda f: (totals[f], -f))
    assert first.startswith(f"{best} ") and f"total {totals[best]:.1f}" in first
    # "similar": the decoder-cosine neighbours saehook.labels.similar_features finds
    pg.locator("#found li >> nth=0").locator("button", has_text="Similar").click()
    pg.wait_for_function(f"document.getElementById('found').textContent.includes('with {best}')")
    shown = [int(t.split()[0]) for t in pg.eval_on_selector_all("#found li .label", "ls => ls.map(l => l.textContent)")]
    assert shown == [h["feature"] for h in similar_features(saehook.load(sae_copy), best, top=10)]
    assert not pg.problems, pg.problems


def test_add_only_spec_downloads_a_control_vector_llama_cpp_applies(page, server, sae_copy, tmp_path):
    import gguf
    import llama_cpp

    from saehook.llama import HookedLlama, export_control_vector

    pg = page
    pg.fill("#find", str(OTHER))
    pg.click("#find-form button[type=submit]")
    pg.select_option("#op", "add")
    pg.fill("#value", "3.5")
    pg.click("#op-form button[type=submit]")
    assert pg.is_enabled("#download-cvec")
    with pg.expect_download() as dl:
        pg.click("#download-cvec")
    path = tmp_path / "page.gguf"
    dl.value.save_as(path)
    assert "downloaded" in pg.inner_text("#spec-status")

    sae = saehook.load(sae_copy)
    st = saehook.Steering(sae, layer=2).add(OTHER, 3.5)
    export_control_vector([st], tmp_path / "own.gguf", model_hint="demo-model-Q8_0.gguf")
    got, own = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(tmp_path / "own.gguf"))
    assert got.fields["general.architecture"].contents() == "controlvector"
    assert [t.name for t in got.tensors] == [t.name for t in own.tensors] == ["direction.2"]
    np.testing.assert_array_equal(np.asarray(got.tensors[0].data), np.asarray(own.tensors[0].data))

    # llama.cpp applies the downloaded file as the hook applies the add: same logits
    llm = HookedLlama(demo.MODEL, n_ctx=64, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        with llm.steer(st, control_vectors=False):
            llm.eval(tokens)
        hooked = last_logits(llm)
        llm.reset()
        d = llm.n_embd_model
        buf = np.zeros((llm.n_layer - 1, d), np.float32)
        buf[2 - 1] = np.asarray(got.tensors[0].data, np.float32)
        assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                buf.size, d, 1, llm.n_layer - 1) == 0
        llm.eval(tokens)
        cvec = last_logits(llm)
        llm.reset()
        llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, d, -1, -1)
        llm.eval(tokens)
        plain = last_logits(llm)
    finally:
        llm.close()
    assert np.isfinite(hooked).all() and np.isfinite(cvec).all()
    np.testing.assert_allclose(cvec, hooked, rtol=1e-4, atol=1e-4, equal_nan=False)
    assert np.abs(cvec - plain).max() > 1e-2          # the vector does something
    assert not pg.problems, pg.problems


def test_completion_mode_streams_what_v1_completions_answers(page, server):
    pg = page
    pg.click("#settings summary")
    pg.select_option("#mode", "completion")
    send(pg, "def main():")
    assert not pg.is_visible("#error"), pg.inner_text("#error")
    status, want = post(server, "/v1/completions", {"prompt": "def main():", "max_tokens": MAX_TOKENS, "temperature": 0,
                                                    "seed": 42, "saehook": {"features": {"top": 8, "prompt": True}}})
    assert status == 200, want
    want = want["choices"][0]
    prompt = token_entries(pg, ".turn .tokens[aria-label^=prompt] .tok")
    assert [e["id"] for e in prompt] == [e["id"] for e in want["saehook"]["features"][:len(prompt)]]
    assert "".join(answer_tokens(pg, "default")).replace("↵", "") == want["text"]
    assert not pg.problems, pg.problems


def test_server_errors_are_shown(page, server):
    pg = page
    # a field the server refuses: its OpenAI error message and param reach the page
    pg.click("#settings summary")
    pg.fill("#max-tokens", "100")
    send(pg)
    err = pg.inner_text("#error")
    assert "max_tokens 100 exceeds this server's limit of 64" in err and "(field: max_tokens)" in err
    assert "failed" in pg.inner_text(".answer.default .status")
    assert not [p for p in pg.problems if "status of 400" not in p], pg.problems


def test_cap_and_rescale_are_sent_with_the_message(page, server):
    """The steering-modes ops go into the request (this server's parser takes them): the page's
    steered column is the server's answer to the saehook object the page shows."""
    pg = page
    info = json.loads(urllib.request.urlopen(server.base + "/v1/saehook/playground", timeout=10).read())
    assert info["request_ops"] == ["add", "clamp", "scale", "ablate", "cap", "rescale"]
    pg.fill("#find", str(CODE))
    pg.click("#find-form button[type=submit]")
    pg.select_option("#op", "cap")
    assert pg.inner_text("#op-note") == ""             # nothing "copied spec only" about it
    pg.fill("#cap-max", "")
    pg.fill("#cap-min", "12")
    pg.click("#op-form button[type=submit]")
    pg.fill("#find", str(OTHER))
    pg.click("#find-form button[type=submit]")
    pg.select_option("#op", "rescale")
    pg.fill("#value", "0")
    pg.click("#op-form button[type=submit]")
    spec = json.loads(pg.inner_text("#spec-json"))
    assert spec == {"steer": [{"sae": "demo", "layer": 2, "feature": CODE, "op": "cap", "min": 12},
                              {"sae": "demo", "layer": 2, "feature": OTHER, "op": "rescale", "value": 0}]}
    send(pg)
    assert not pg.is_visible("#error"), pg.inner_text("#error")
    steered, default = "".join(answer_tokens(pg, "steered")), "".join(answer_tokens(pg, "default"))
    assert steered != default
    assert steered.replace("↵", "") == api_answer(server, PROMPT, spec)["message"]["content"]
    assert not pg.problems, pg.problems


def get(server, path):
    try:
        with urllib.request.urlopen(server.base + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_playground_endpoints(server, sae_copy):
    """The endpoints the page uses, over raw HTTP (no browser needed), against saehook.labels."""
    from saehook.labels import search_labels

    sae = saehook.load(sae_copy)
    status, info = get(server, "/v1/saehook/playground")
    assert status == 200 and info["saes"][0]["labels"] == len(sae.labels) and info["chat"] is True
    assert info["saes"][0]["name"] == "demo" and info["saes"][0]["layer"] == 2
    status, r = get(server, "/v1/saehook/search?q=letter%20word&top=5")
    assert status == 200 and r["data"] == search_labels(sae.labels, "letter word", top=5)
    other = next(f for f in (3, 4) if f != CODE)
    status, r = get(server, f"/v1/saehook/labels?features={CODE},{other}")
    assert r["data"] == {str(CODE): LABELLED[CODE], str(other): sae.labels.label(other)}
    for path, param in (("/v1/saehook/labels?features=5000", "features"), ("/v1/saehook/search?q=", "q"),
                        ("/v1/saehook/search?q=a&top=0", "top"), ("/v1/saehook/similar?feature=x", "feature"),
                        ("/v1/saehook/labels?sae=nope&features=1", "sae")):
        status, body = get(server, path)
        assert status == 400 and body["error"]["param"] == param, (path, body)
    status, body = post(server, "/v1/saehook/control-vector",
                        {"saehook": {"steer": [{"feature": 1, "op": "clamp", "value": 1.0}]}})
    assert status == 400 and body["error"]["param"] == "saehook.steer[0].op"
    status, body = post(server, "/v1/saehook/control-vector",
                        {"saehook": {"steer": [{"feature": 1, "op": "add", "value": 1.0, "positions": "generated"}]}})
    assert status == 400 and body["error"]["param"] == "saehook.steer[0].positions"
    status, body = post(server, "/v1/saehook/control-vector",
                        {"saehook": {"steer": [{"feature": 1, "op": "clamp", "value": 1.0}]}})
    assert status == 400 and body["error"]["param"] == "saehook.steer[0].op"
    status, body = post(server, "/v1/saehook/control-vector",
                        {"saehook": {"steer": [{"feature": 1, "op": "add", "value": 1.0, "layer": 0}]}})
    assert status == 400 and "block 0" in body["error"]["message"]
    status, body = post(server, "/v1/saehook/control-vector", {"steer": []})
    assert status == 400 and body["error"]["param"] == "saehook"
    status, body = get(server, "/playground/../app.py")
    assert status == 404
