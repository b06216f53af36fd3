"""The shipped demo: its BPE vocabulary tokenizes in llama.cpp exactly as in the `tokenizers`
library, the recorded SAE quality and the code feature's selectivity are reproduced from the
shipped files, and clamping the code feature makes the model's continuations of prose more
code-like (scored by the corpus' code-vs-prose statistics and by Python's own tokenizer)."""
import io
import json
import os
import tokenize as pytokenize

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import saehook  # noqa: E402
from saehook import demo  # noqa: E402
from saehook.demo import build  # noqa: E402


def _info():
    with open(os.path.join(demo.DATA, "demo_model.json")) as f:
        return json.load(f)


def _features():
    with open(demo.LABELS, encoding="utf-8") as f:
        return json.load(f)


def _same_corpus() -> bool:
    return build.corpus_facts(build.corpus())["sha256"] == _info()["corpus"]["sha256"]


# Text unlike the training corpus too: unicode of several scripts, emoji, combining marks,
# whitespace runs (tabs, CRLF, trailing), digits, contractions, control bytes, the EOS text.
VARIED = [
    "The with statement is used to wrap the execution of a block with methods defined by a context manager.",
    "def f(x, *args, **kw):\n    \"\"\"Docstring.\"\"\"\n\tif x:\n\t\treturn  x ** 2   \n\n\n    \n   pass\n",
    "class A(B):\r\n    x: int = 0x1F  # comment\r\n\r\n",
    "Héllo wörld — naïve café, Straße, İstanbul; 日本語のテキスト; Ελληνικά; русский; مرحبا; 😀👍🏽; e\u0301; ﬁ Ⅻ ½ ²",
    "1234567890 3.14159 1e-10 -0.5 1_000_000",
    "it's they're I'VE we'll she'd don't O'Neil",
    "a\u00a0b\u2003c\u200bd\u3000e", "        ", "\n\n\n", "\t\t\t\tx", " ", "x" * 300,
    "\x00\x01\x7f bytes", "text <|endoftext|> more", "{'a': [1, 2], \"b\": (3,)} -> None",
]


def test_shipped_files_load_and_are_small():
    sae = saehook.load(demo.SAE_FILE)
    rec = _info()
    assert (sae.layer, sae.d_sae, sae.k) == (rec["sae"]["layer"], rec["sae"]["d_sae"], rec["sae"]["k"])
    for kind in ("prose", "code"):
        assert rec["loss_curve"][-1][f"val_loss_{kind}"] < rec["loss_curve"][0][f"val_loss_{kind}"] - 0.5
    size = sum(os.path.getsize(os.path.join(demo.DATA, f)) for f in os.listdir(demo.DATA))
    assert size < 6e6, f"the shipped demo is {size / 1e6:.1f} MB"


def test_the_gguf_vocabulary_tokenizes_as_the_tokenizers_library():
    """llama.cpp (its gpt2 BPE with the qwen2 split) and the `tokenizers` library (the BPE model
    and pre-tokenizer built from the same tokens and merges) give the same ids and text back."""
    import gguf
    import llama_cpp

    from saehook.demo.gguf_writer import Vocabulary

    v = Vocabulary.from_gguf(gguf.GGUFReader(demo.MODEL))
    assert len(v.tokens) == _info()["vocab_size"] and len(v.merges) > 1500
    hf = v.hf_tokenizer()
    llm = llama_cpp.Llama(demo.MODEL, vocab_only=True, verbose=False)
    texts = VARIED + [d[2][:4000] for d in build.corpus()[::97]]
    for t in texts:
        ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        assert ids == hf.encode(t, add_special_tokens=False, split_special_tokens=True), t[:80]
        assert llm.detokenize(ids).decode("utf-8") == hf.decode(ids) == t
    # parsed as a control token when asked (special=True), as the tokenizers library does
    t = VARIED[-2]
    assert llm.tokenize(t.encode(), add_bos=False, special=True) == hf.encode(t, add_special_tokens=False)
    assert v.eos in hf.encode(t, add_special_tokens=False) and llm.token_eos() == v.eos
    # multi-character merges do the work: far fewer tokens than bytes on prose and on code
    for t in VARIED[:2]:
        assert len(llm.tokenize(t.encode(), add_bos=False)) < 0.45 * len(t.encode())


def test_a_trained_tokenizer_round_trips_through_the_gguf(tmp_path):
    """The recipe's path on a small scale: tokenizers' BpeTrainer -> Vocabulary -> GGUF ->
    llama.cpp, which tokenizes exactly as the trained tokenizer itself."""
    pytest.importorskip("tokenizers")
    import llama_cpp
    import transformers

    from saehook.demo import gguf_writer

    docs = [d[2] for d in build.corpus()[::40]]
    tok = build.train_tokenizer(docs, vocab_size=600)
    v = gguf_writer.Vocabulary.from_tokenizer(tok)
    assert len(v.tokens) == 600 and v.tokens[v.eos] == "<|endoftext|>"
    cfg = transformers.Qwen3Config(vocab_size=600, **build.CONFIG)
    path = tmp_path / "tiny.gguf"
    gguf_writer.write_hf_model(transformers.Qwen3ForCausalLM(cfg), path, v)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for t in VARIED + docs[:5]:
        want = tok.encode(t).ids if "<|endoftext|>" not in t else None
        got = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        if want is not None:
            assert got == want, t[:80]
    with pytest.raises(ValueError, match="byte tokens"):
        gguf_writer.Vocabulary(v.tokens[:100], v.types[:100], ())


def test_auroc_is_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    pos = np.maximum(rng.normal(0.3, 1, (300, 4)), 0).astype(np.float32)   # many ties at 0
    neg = np.maximum(rng.normal(0, 1, (500, 4)), 0).astype(np.float32)
    got = build.auroc(pos, neg)
    want = [mannwhitneyu(pos[:, j].astype(np.float64), neg[:, j].astype(np.float64)).statistic / (300 * 500)
            for j in range(4)]  # (in float64: scipy keeps float32 inputs in float32)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_recorded_fve_is_reproduced():
    from saehook.engines import LlamaEngine
    from saehook.workflows.evaluate import evaluate

    rec = _info()["sae"]["held_out_metrics"]
    sae = saehook.load(demo.SAE_FILE)
    _, held = build.split(build.corpus())
    eng = LlamaEngine(demo.MODEL, n_ctx=300, logits_all=True)
    got = evaluate(eng, sae, sae.layer, [d[2] for d in held], max_tokens=256)  # recorded: transformers, f32
    if _same_corpus():
        assert got["n_tokens"] == rec["n_tokens"]
    assert abs(got["fve"] - rec["fve"]) < 0.03 and got["fve"] > 0.7
    assert abs(got["l0"] - rec["l0"]) < 0.5


def test_the_code_feature_tells_code_from_prose():
    """The demo feature's code precision (P(code | it fires), held-out text, kinds weighted
    equally) recomputed from the shipped files through llama.cpp is the recorded one: it fires
    (nearly) only on code, and no frequent feature is more code-precise."""
    from saehook.engines import LlamaEngine

    info, choice = _features(), _info()["choice"]
    f = info["demo_feature"]
    assert f == choice["feature"] and info["demo_value"] == choice["value"]
    sae = saehook.load(demo.SAE_FILE)
    eng = LlamaEngine(demo.MODEL, n_ctx=512)
    _, held = build.split(build.corpus())
    codes = {}
    for kind in ("code", "prose"):
        ids = []
        for k, _, text in held:  # the tokens build.choose measured on (30,000 of each kind)
            if k == kind and len(ids) < 30_000:
                ids += eng.tokenize(text)[:1024]
        codes[kind] = build.dense_codes(eng, sae, ids[:30_000])
    precision, rate = build.code_precision(codes["code"], codes["prose"])
    assert precision[f] > 0.8 and rate[f] > 0.01, (precision[f], rate[f])   # recorded: 0.87 of firings in code
    if _same_corpus():  # the same tokens: the same numbers (up to llama.cpp's thread-order rounding)
        assert abs(precision[f] - choice["code_precision"]) < 0.01 and abs(rate[f] - choice["fires_on_code"]) < 0.005
    frequent = rate >= 0.01
    assert precision[f] >= np.sort(precision[frequent])[-10]      # among the ten most code-precise


def python_token_share(text: str) -> float:
    """Independent of the model and its statistics: the share of Python tokens (the standard
    library's tokenize) that are operators or names next to an operator, in the text's lines."""
    try:
        toks = list(pytokenize.generate_tokens(io.StringIO(text).readline))
    except (pytokenize.TokenError, IndentationError, SyntaxError):
        toks = []
        for line in text.splitlines():
            try:
                toks += list(pytokenize.generate_tokens(io.StringIO(line + "\n").readline))
            except (pytokenize.TokenError, IndentationError, SyntaxError):
                continue
    words = [t for t in toks if t.type in (pytokenize.NAME, pytokenize.OP, pytokenize.NUMBER, pytokenize.STRING)]
    return sum(t.type == pytokenize.OP for t in words) / max(1, len(words))


def test_clamping_the_code_feature_turns_prose_into_code(capsys):
    info = _features()
    runs = [demo.run(prompt=p, max_tokens=32) for p in build.PROSE_PROMPTS]
    printed = capsys.readouterr().out
    assert "top features per token" in printed and "steered:" in printed and "of its firings are in code" in printed
    clean = np.mean([r["code_likeness_clean"] for r in runs])
    steered = np.mean([r["code_likeness_steered"] for r in runs])
    # the recorded choice, reproduced: the same mean code-likeness, clean and steered
    eff = info["demo_effect"]
    assert abs(clean - eff["clean_code_likeness"]) < 0.05 and abs(steered - eff["steered_code_likeness"]) < 0.05
    assert steered > clean + 1.0, (clean, steered)
    assert sum(r["code_likeness_steered"] > r["code_likeness_clean"] for r in runs) >= len(runs) - 1
    # and by a measure that knows nothing of the model: Python's tokenizer finds more operators
    ops_clean = np.mean([python_token_share(r["clean"]) for r in runs])
    ops_steered = np.mean([python_token_share(r["steered"]) for r in runs])
    assert ops_steered > ops_clean + 0.05, (ops_clean, ops_steered)


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
    from saehook.engines import HFEngine, LlamaEngine

    hf, ll = HFEngine(demo_hf), LlamaEngine(demo.MODEL)
    docs = [d[2] for d in build.corpus()[::45]]
    assert all(hf.tokenize(d) == ll.tokenize(d) for d in docs)  # same ids for real documents
    sae = saehook.load(demo.SAE_FILE)
    tokens = ll.tokenize(docs[-1])[:128]
    _, va, ia = hf.features(tokens, {sae.layer: sae})[sae.layer]
    _, vb, ib = ll.features(tokens, {sae.layer: sae})[sae.layer]
    top1 = (ia[:, 0] == ib[:, 0]).mean()  # llama.cpp keeps its KV cache in f16: near-ties may flip
    assert top1 > 0.9, top1
    assert demo.hf_model_dir() == demo_hf  # built once, then found


def test_cli_runs_on_the_transformers_copy(demo_hf, capsys):
    from saehook.cli import main
    from saehook.engines import LlamaEngine

    assert main(["demo", "--paths"]) == 0
    assert f"hf:   {demo_hf}" in capsys.readouterr().out
    assert main(["features", demo_hf, "--engine", "hf", "--sae", demo.SAE_FILE, "--json", "The with"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    ll = LlamaEngine(demo.MODEL)
    assert [r["text"] for r in rows] == [ll.token_text(t) for t in ll.tokenize("The with")] == ["The", " with"]
