"""Feature labels: the store and its fingerprint, Neuronpedia import, label-named features, a
planted oracle for explanation + detection scoring, search, and the demo model end to end."""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import saehook  # noqa: E402
from saehook.cli import main  # noqa: E402
from saehook.engines import Engine  # noqa: E402
from saehook.labels import (FeatureContexts, LabelError, LabelFileMismatch, LabelStore, explain_features,  # noqa: E402
                            fingerprint, import_labels, resolve_feature, score_features, search_by_example,
                            search_labels, similar_features)
from saehook.labels.prompts import highlight  # noqa: E402
from saehook.workflows.datasets import FeatureData, capture  # noqa: E402

from conftest import make_sae  # noqa: E402


# ---------------------------------------------------------------- planted oracle
WORDS = [f"w{i:02d}" for i in range(48)]
N_FEATURES = 8
PLANTED = {f: WORDS[3 * f: 3 * f + 3] for f in range(N_FEATURES)}   # feature f fires on exactly these words


class WordEngine(Engine):
    """A stand-in model: one token per word, the residual of a token its one-hot vector."""

    def tokenize(self, text):
        return [WORDS.index(w) for w in text.split()]

    def token_text(self, token):
        return WORDS[token] + " "

    @property
    def n_layer(self):  # one "layer": the one-hot embedding
        return 1

    @property
    def d_model(self):
        return len(WORDS)

    def features(self, tokens, saes):
        x = np.eye(len(WORDS), dtype=np.float32)[list(tokens)]
        out = {}
        for layer, sae in saes.items():
            vals, idx = sae.encode(x)
            out[layer] = (np.arange(len(tokens)), vals, idx)
        return out


def planted_sae(layer=0):
    """pre_f = W_enc[f] . onehot - 0.5: 0.5, 1.0 or 1.5 on f's three words, -0.5 elsewhere, so
    after the ReLU feature f fires exactly on PLANTED[f] (with three activation levels)."""
    d_sae = 16
    W_enc = np.zeros((d_sae, len(WORDS)), np.float32)
    for f, words in PLANTED.items():
        for j, w in enumerate(words):
            W_enc[f, WORDS.index(w)] = 1.0 + 0.5 * j
    W_dec = np.random.default_rng(1).standard_normal((d_sae, len(WORDS))).astype(np.float32)
    return saehook.SAE(W_enc, W_dec, np.full(d_sae, -0.5, np.float32), k=3, activation="topk_relu",
                       metadata={"layer": layer})


def describe(words):
    return "the words " + ", ".join(sorted(words))


class MarkedTokenExplainer:
    """An explainer behind the same interface as LlamaCppModel: it reads the tokens the prompt
    marks << >> in the examples it is given and names them (the true description when the
    examples are right)."""

    name = "marked-tokens"

    def explain(self, examples, max_activation):
        marked = set()
        for ex in examples:
            marked.update(m.strip() for m in re.findall(r"<<(.*?)>>", highlight(ex.tokens, ex.acts, threshold=0.0)))
        words = {w for m in marked for w in m.split()}
        return describe(words)


class LiteralScorer:
    """A scorer that applies a 'the words a, b, c' description literally."""

    name = "literal"

    def detect(self, explanation, texts):
        words = set(explanation.removeprefix("the words ").split(", "))
        return [bool(words & set(t.split())) for t in texts]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    docs = [{"text": " ".join(rng.choice(WORDS, size=24))} for _ in range(60)]
    sae = planted_sae()
    capture(WordEngine(), {0: sae}, docs, str(d / "cap"), shard_docs=16)
    return d, sae, FeatureContexts(FeatureData(str(d / "cap")), range(N_FEATURES), ctx_len=8)


def test_planted_contexts_mark_exactly_the_planted_tokens(planted):
    _, _, ctx = planted
    for f, words in PLANTED.items():
        s = ctx.sample(f, n_top=5, n_quantile=5, n_test=10, seed=0)
        assert s.explain and s.test_firing and len(s.test_silent) == len(s.test_firing)
        for ex in s.explain + s.test_firing:
            fired = {t.strip() for t, a in zip(ex.tokens, ex.acts) if a > 0}
            assert fired and fired <= set(words)
            assert all((t.strip() in words) == (a > 0) for t, a in zip(ex.tokens, ex.acts))
        for ex in s.test_silent:
            assert not set(ex.text.split()) & set(words) and max(ex.acts) == 0
        assert s.max_activation == pytest.approx(1.5)   # the strongest word: 2.0 - 0.5
        # held-out windows are not among those the explainer saw
        seen = {(e.doc_id, e.position) for e in s.explain}
        assert not seen & {(e.doc_id, e.position) for e in s.test_firing}


def test_planted_true_description_scores_high_and_shuffled_near_chance(planted, tmp_path):
    _, sae, ctx = planted
    store = LabelStore.open(sae, str(tmp_path / "labels.jsonl"))
    features = list(range(N_FEATURES))
    res = explain_features(store, ctx, features, MarkedTokenExplainer(), batch=3, n_top=5, n_quantile=5)
    assert res == {"explained": N_FEATURES, "skipped": 0, "silent": 0}
    for f, words in PLANTED.items():
        assert store[f].label == describe(words)
        assert store[f].source == "explained by marked-tokens"
    scores = score_features(store, ctx, features, LiteralScorer(), n_top=5, n_quantile=5, n_test=10)
    for f in features:
        assert scores[f]["balanced_accuracy"] >= 0.9
        assert store[f].score["detection"]["balanced_accuracy"] == scores[f]["balanced_accuracy"]
        assert scores[f]["n_firing"] == scores[f]["n_silent"] >= 5
    shuffled = {f: describe(PLANTED[(f + 3) % N_FEATURES]) for f in features}
    control = score_features(store, ctx, features, LiteralScorer(), n_top=5, n_quantile=5, n_test=10,
                             label_of=shuffled.__getitem__)
    mean = np.mean([m["balanced_accuracy"] for m in control.values()])
    assert mean <= 0.6
    # the control did not overwrite the stored scores
    assert all(store[f].score["detection"]["balanced_accuracy"] >= 0.9 for f in features)
    reread = LabelStore.open(sae, str(tmp_path / "labels.jsonl"))
    assert reread.dumps() == store.dumps()
    # a label that is there already (say imported) is kept unless overwrite; overwrite drops its score
    store.set(2, "imported label", source="imported from x.jsonl", score={"neuronpedia": {"value": 0.3}})
    assert explain_features(store, ctx, [1, 2, 9], MarkedTokenExplainer(), n_top=5, n_quantile=5) == \
        {"explained": 0, "skipped": 2, "silent": 1}
    assert store[2].label == "imported label" and 9 not in store
    explain_features(store, ctx, [2], MarkedTokenExplainer(), n_top=5, n_quantile=5, overwrite=True)
    assert store[2].label == describe(PLANTED[2]) and store[2].score is None


def test_search_by_example_against_a_contrast_finds_the_planted_feature(planted):
    _, sae, _ = planted
    sae.labels = LabelStore(fingerprint(sae))
    example = "w00 w21 w05 w22 w23 w30"            # feature 7's words (w21..w23) and others
    against = ["w00 w05 w30 w31 w40"]             # the others without feature 7's
    hits = search_by_example(WordEngine(), sae, example, against=against, top=3)
    assert hits[0]["feature"] == 7
    assert hits[0]["example_mean"] == pytest.approx((0.5 + 1.0 + 1.5) / 6)
    assert hits[0]["contrast_mean"] == 0.0


# ---------------------------------------------------------------- store and fingerprint
def test_fingerprint_tells_saes_apart_and_the_store_refuses_another_sae(tmp_path):
    a, b = make_sae(seed=0), make_sae(seed=1)
    assert fingerprint(a) == fingerprint(make_sae(seed=0))
    assert fingerprint(a)["sha256"] != fingerprint(b)["sha256"]
    W = a.arrays()["W_enc"].copy()
    W[0, 0] += 1.0
    edited = saehook.SAE(W, a.arrays()["W_dec"], a.arrays()["b_enc"], a.arrays()["b_dec"], k=a.k)
    assert fingerprint(edited)["sha256"] != fingerprint(a)["sha256"]   # the sampled blocks see it
    path = str(tmp_path / "l.jsonl")
    store = LabelStore.open(a, path)
    store.set(3, "pirate speech", source="test")
    store.save()
    assert LabelStore.open(a, path)[3].label == "pirate speech"
    with pytest.raises(LabelFileMismatch, match="the weights differ"):
        LabelStore.open(b, path)
    with pytest.raises(LabelFileMismatch, match="d_sae: file 256 vs SAE 512"):
        LabelStore.open(make_sae(d_sae=512), path)
    with pytest.raises(LabelError, match="out of range"):
        store.set(256, "x", source="test")
    # a torn or foreign line is reported with its line number
    with open(path, "a") as fh:
        fh.write('{"feature": 4, "label": "x"}\n')
    with pytest.raises(LabelError, match=r"l.jsonl:3: missing field 'source'"):
        LabelStore.open(a, path)


def test_store_lives_beside_the_sae_file_and_sae_labels_reads_it_lazily(tmp_path):
    sae = make_sae(metadata={"layer": 1})
    sae.save(str(tmp_path / "s.safetensors"))
    loaded = saehook.load(str(tmp_path / "s.safetensors"))
    assert loaded.labels.path == str(tmp_path / "s.safetensors.labels.jsonl") and len(loaded.labels) == 0
    loaded.labels.set(7, "French text", source="test")
    loaded.labels.save()
    again = saehook.load(str(tmp_path / "s.safetensors"))
    assert str(again.labels[7]) == "French text"
    assert saehook.labels.label_of(again, 7) == "French text" and saehook.labels.label_of(again, 8) is None
    # converted copies of the same SAE read its labels; another training of the same shape does not
    again.save(str(tmp_path / "s16.safetensors"), dtype="f16")
    shutil.copy(tmp_path / "s.safetensors.labels.jsonl", tmp_path / "s16.safetensors.labels.jsonl")
    assert str(saehook.load(str(tmp_path / "s16.safetensors")).labels[7]) == "French text"
    path = str(tmp_path / "s.safetensors.labels.jsonl")
    for conv in (again.to_dtype("bf16"), again.to_dtype("int8"), again.to_dtype(dec_layout="cols"),
                 again.to_dtype("int8", dec_dtype="bf16", dec_layout="cols")):
        assert LabelStore.open(conv, path).label(7) == "French text"
    with pytest.raises(LabelFileMismatch, match=r"the weights differ \(sketch cosine encoder -?0\.\d+"):
        LabelStore.open(make_sae(seed=5, metadata={"layer": 1}).to_dtype("bf16"), path)


# ---------------------------------------------------------------- label-named features
def test_label_named_features_resolve_or_list_the_candidates():
    sae = make_sae()
    store = LabelStore(fingerprint(sae))
    for f, text in {10: "pirate speech", 11: "pirate ships and the sea", 12: "French text", 13: "Python keywords"}.items():
        store.set(f, text, source="test")
    sae.labels = store
    assert resolve_feature(sae, "label:French") == 12                # the only label containing the word
    assert resolve_feature(sae, "label:pirate  SPEECH") == 10        # exact, case and spaces ignored
    assert resolve_feature(sae, 5) == resolve_feature(sae, "5") == resolve_feature(sae, "#5") == 5
    with pytest.raises(LabelError, match=r"ambiguous.*#10 'pirate speech'.*#11 'pirate ships and the sea'"):
        resolve_feature(sae, "label:pirate")
    with pytest.raises(LabelError, match=r"no feature is labelled 'python snakes'; closest: #13 'Python keywords'"):
        resolve_feature(sae, "label:python snakes")
    with pytest.raises(IndexError, match="out of range"):
        resolve_feature(sae, 256)
    with pytest.raises(LabelError, match="index or 'label:TEXT'"):
        resolve_feature(sae, "pirate")
    st = saehook.Steering(sae, layer=0).clamp(resolve_feature(sae, "label:french"), 8.0)
    assert st.ops[0].feature == 12
    from saehook.labels import feature_value_pairs

    assert feature_value_pairs(sae, ["3=1.5", "label:pirate speech=8"], "--clamp") == [(3, 1.5), (10, 8.0)]
    with pytest.raises(LabelError, match="ambiguous"):
        feature_value_pairs(sae, ["label:pirate=8"], "--clamp")
    with pytest.raises(LabelError, match="--clamp expects FEATURE=VALUE"):
        feature_value_pairs(sae, ["label:french"], "--clamp")
    with pytest.raises(LabelError, match="'x' is not a float"):
        feature_value_pairs(sae, ["label:french=x"], "--clamp")
    with pytest.raises(LabelError, match="has no labels yet"):
        resolve_feature(make_sae(seed=3), "label:french")


# ---------------------------------------------------------------- import
def _np_row(index, description, layer="2-qwenscope-res-1k", **kw):
    """One Explanation row as neuronpedia's utils/export-data.py writes it."""
    return {"id": f"cl{index:08d}", "modelId": "demo-model", "layer": layer, "index": str(index),
            "authorId": "clkht01d40000jv08hvalcvly", "description": description, "embedding": None,
            "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini", "umap_x": None, "umap_y": None,
            "umap_cluster": None, "umap_log_feature_sparsity": None, **kw}


def _write_batch(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def demo_sae(tmp_path):
    from saehook import demo

    shutil.copy(demo.SAE_FILE, tmp_path / "demo-sae.safetensors")
    return str(tmp_path / "demo-sae.safetensors")


def test_neuronpedia_export_imports_and_mismatched_files_are_refused(demo_sae, tmp_path, capsys):
    exp = tmp_path / "explanations"   # as downloaded: <source>/explanations/batch-N.jsonl.gz
    _write_batch(str(exp / "batch-0.jsonl.gz"), [_np_row(5, "the letter y inside words"), _np_row(353, " the  word and "),
                                                 _np_row(5, "a second explanation")])
    _write_batch(str(exp / "batch-1.jsonl.gz"), [_np_row(1023, "the last feature")])
    assert main(["labels", "import", str(tmp_path), "--sae", demo_sae, "--json"]) == 0   # the source folder
    assert json.loads(capsys.readouterr().out)["imported"] == 3
    sae = saehook.load(demo_sae)
    assert sae.labels[5].label == "the letter y inside words" and sae.labels[5].extra["alternatives"] == 1
    assert sae.labels[353].label == "the word and"
    assert sae.labels[5].source == f"imported from {tmp_path.name} (neuronpedia demo-model/2-qwenscope-res-1k, gpt-4o-mini)"
    assert sae.labels[5].extra["neuronpedia"]["typeName"] == "oai_token-act-pair"
    # the feature objects of Neuronpedia's API, with scores: the best scored explanation wins
    feat = {"modelId": "demo-model", "layer": "2-qwenscope-res-1k", "index": "7", "explanations": [
        dict(_np_row(7, "worse"), scores=[{"value": 0.2}]), dict(_np_row(7, "better"), scores=[{"value": 0.6}])]}
    (tmp_path / "feature.json").write_text(json.dumps(feat))
    assert main(["labels", "import", str(tmp_path / "feature.json"), "--sae", demo_sae]) == 0
    again = saehook.load(demo_sae)
    assert again.labels[7].label == "better" and again.labels[7].score == {"neuronpedia": {"value": 0.6}}
    assert len(again.labels) == 4
    capsys.readouterr()
    for name, rows, message in [
        ("layer", [_np_row(5, "x", layer="3-qwenscope-res-1k")], "for layer 3"),
        ("width", [_np_row(5, "x", layer="2-qwenscope-res-32k")], "width 32k"),
        ("index", [_np_row(1024, "x")], "index 1024 is outside"),
        ("mixed", [_np_row(5, "x"), _np_row(6, "y", layer="2-other-res-1k")], "several sources"),
    ]:
        _write_batch(str(tmp_path / name / "batch-0.jsonl.gz"), rows)
        assert main(["labels", "import", str(tmp_path / name), "--sae", demo_sae]) == 2
        err = capsys.readouterr().err
        assert message in err and "batch-0.jsonl.gz" in err, err
    assert LabelStore.open(saehook.load(demo_sae)).dumps() == again.labels.dumps()   # nothing changed
    # a saehook store of another SAE is refused by its fingerprint
    other = LabelStore(fingerprint(make_sae(d_model=128, d_sae=1024)), str(tmp_path / "other.jsonl"))
    other.set(1, "x", source="test")
    other.save()
    with pytest.raises(LabelFileMismatch):
        import_labels(again.labels, str(tmp_path / "other.jsonl"), again)


# ---------------------------------------------------------------- search
def test_bm25_ranking_matches_the_formula():
    sae = make_sae()
    store = LabelStore(fingerprint(sae))
    labels = {0: "french text", 1: "french and german text in quotes", 2: "python code", 3: "text about french french",
              4: "numbers"}
    for f, t in labels.items():
        store.set(f, t, source="test")
    q = "french text"
    docs = {f: t.split() for f, t in labels.items()}
    avg = sum(map(len, docs.values())) / len(docs)

    def bm25(words):
        s = 0.0
        for w in set(q.split()):
            n = sum(w in d for d in docs.values())
            tf = words.count(w)
            idf = math.log(1 + (len(docs) - n + 0.5) / (n + 0.5))
            s += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(words) / avg))
        return s

    expected = sorted((f for f in docs if bm25(docs[f]) > 0), key=lambda f: (-bm25(docs[f]), f))
    hits = search_labels(store, q)
    assert [h["feature"] for h in hits] == expected
    for h in hits:
        assert h["score"] == pytest.approx(bm25(docs[h["feature"]]))
    assert search_labels(store, "zebra") == []


@pytest.mark.parametrize("layout,dtype", [("rows", None), ("cols", None), ("cols", "bf16")])
def test_similar_features_match_a_dense_cosine(layout, dtype):
    sae = make_sae(d_model=32, d_sae=300, dec_layout=layout, seed=4)
    if dtype:
        sae = sae.to_dtype(dtype)
    sae.labels = LabelStore(fingerprint(sae))
    W = np.stack([sae.decoder_direction(i) for i in range(sae.d_sae)])
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = Wn @ Wn[17]
    cos[17] = -np.inf
    want = np.argsort(-cos, kind="stable")[:6]
    got = similar_features(sae, 17, top=6, chunk=37)
    assert [g["feature"] for g in got] == list(want)
    np.testing.assert_allclose([g["cosine"] for g in got], cos[want], rtol=1e-5)


# ---------------------------------------------------------------- the demo model end to end
DEMO_FLAGS = ["--prompt", "compact", "--ctx-len", "16", "--n-top", "3", "--n-quantile", "2", "--explainer-ctx", "512",
              "--max-tokens", "160"]


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from pydoc_data.topics import topics

    from saehook import demo

    d = tmp_path_factory.mktemp("demo_labels")
    docs = [v[:160] for _, v in sorted(topics.items())][:10]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    shutil.copy(demo.SAE_FILE, d / "demo-sae.safetensors")
    return d, demo.MODEL


def _explain(d, model, labels, *extra):
    return main(["labels", "explain", model, "--sae", str(d / "demo-sae.safetensors"), "--data", str(d / "docs.jsonl"),
                 "--explainer", model, "--labels", str(labels), "--capture", str(d / "cap"), *DEMO_FLAGS, *extra])


def test_demo_explain_score_show_search_and_resume(demo_setup, tmp_path, monkeypatch, capsys):
    from saehook.labels import LlamaCppModel

    d, model = demo_setup
    feats = "21,353,355"  # features that fire on these docs (the demo SAE of the BPE demo)
    full = tmp_path / "full.jsonl"
    assert _explain(d, model, full, "--features", feats, "--batch", "1") == 0
    store = LabelStore.read(str(full))
    assert list(store) == [21, 353, 355]
    for f in store:
        rec = store[f]
        assert rec.label and rec.source == "explained by demo-model-Q8_0.gguf"
        assert 1 <= len(rec.examples) <= 5 and all(max(e["acts"]) > 0 for e in rec.examples)

    # interrupted after the first feature, then resumed: the same store
    part = tmp_path / "part.jsonl"
    real, calls = LlamaCppModel.explain, [0]

    def dies_on_second(self, examples, max_activation):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, examples, max_activation)

    monkeypatch.setattr(LlamaCppModel, "explain", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _explain(d, model, part, "--features", feats, "--batch", "1")
    assert list(LabelStore.read(str(part))) == [21]
    monkeypatch.setattr(LlamaCppModel, "explain", real)
    capsys.readouterr()
    assert _explain(d, model, part, "--features", feats, "--batch", "1") == 0
    assert "2 features explained, 1 already done" in capsys.readouterr().out
    assert part.read_text() == full.read_text()

    # score with the demo model as scorer: balanced accuracy and F1 stored per feature
    assert main(["labels", "score", model, "--sae", str(d / "demo-sae.safetensors"), "--data", str(d / "docs.jsonl"),
                 "--scorer", model, "--labels", str(full), "--capture", str(d / "cap"), "--n-test", "3", "--json",
                 *[a for a in DEMO_FLAGS if a not in ("--prompt", "compact")]]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    store = LabelStore.read(str(full))
    assert scores and set(map(int, scores)) <= {21, 353, 355}
    for f, m in scores.items():
        det = store[int(f)].score["detection"]
        assert det == m and 0 <= det["balanced_accuracy"] <= 1 and det["scorer"] == "demo-model-Q8_0.gguf"
        assert det["tp"] + det["fn"] == det["n_firing"] and det["tn"] + det["fp"] == det["n_silent"]

    # show and search through the command line
    assert main(["labels", "show", str(d / "demo-sae.safetensors"), "--labels", str(full), "--feature", "353"]) == 0
    out = capsys.readouterr().out
    assert store[353].label in out and "<<" in out
    worded = next(f for f in (355, 353, 21) if re.findall(r"\w+", store[f].label))  # a label with a word to search
    word = Counter(re.findall(r"\w+", store[worded].label.lower())).most_common(1)[0][0]
    assert main(["search", str(d / "demo-sae.safetensors"), word, "--labels", str(full), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert worded in [h["feature"] for h in hits]
    assert main(["similar", str(d / "demo-sae.safetensors"), "353", "--labels", str(full), "--top", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["similar"]) == 3
    assert main(["search", str(d / "demo-sae.safetensors"), "--by-example", "The with statement", "--against",
                 "class A: pass", "--model", model, "--labels", str(full), "--top", "5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5


def test_a_chat_template_in_the_gguf_renders_the_prompts(tmp_path):
    """A GGUF with tokenizer.chat_template: the explainer and scorer prompts go through it (checked
    against jinja2 rendering the same template), and the answer is what follows [EXPLANATION]:."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    jinja2 = pytest.importorskip("jinja2")
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from saehook import demo
    from saehook.labels import LlamaCppModel
    from saehook.labels.contexts import Example
    from saehook.labels.prompts import detection_messages, explanation_messages, parse_explanation

    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    reader = gguf.GGUFReader(demo.MODEL)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(tmp_path / "chat.gguf"), arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    m = LlamaCppModel(str(tmp_path / "chat.gguf"), n_ctx=512, style="compact")
    ex = [Example(0, 0, ["a", "b", "c"], [0.0, 2.0, 0.0])]
    msgs = explanation_messages(ex, 2.0, style="compact")
    want = jinja2.Template(template).render(messages=msgs, add_generation_prompt=True)
    assert m.render(msgs, "[EXPLANATION]:") == want and "a<<b>>c" in want
    assert m.render(detection_messages("x", "abc"), "Answer:").endswith("<|assistant|>")
    assert isinstance(m.explain(ex, 2.0), str) and m.explain(ex, 2.0)
    assert len(m.detect("the letter b", ["abc", "xyz"])) == 2
    assert parse_explanation("Let me think.\nThe << >> mark b.\n[EXPLANATION]: the letter  b\n") == "the letter b"
    assert parse_explanation("no marker here\nlast line") == "last line"
    m.close()


def test_cli_errors_name_the_problem(demo_sae, tmp_path, capsys):
    from saehook import demo

    assert main(["search", demo_sae, "pirate"]) == 2
    assert "has no labels yet" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n')
    assert main(["labels", "explain", demo.MODEL, "--sae", demo_sae, "--data", str(tmp_path / "d.jsonl"),
                 "--explainer", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf: no such GGUF file (--explainer)" in capsys.readouterr().err
    assert main(["labels", "explain", demo.MODEL, "--sae", demo_sae, "--data", str(tmp_path / "d.jsonl"),
                 "--explainer", demo.MODEL, "--features", "9-3"]) == 2
    assert "the range '9-3' is empty" in capsys.readouterr().err
    assert main(["similar", demo_sae, "label:pirate"]) == 2
    assert "has no labels yet" in capsys.readouterr().err
    assert main(["labels", "show", demo_sae, "--feature", "5000"]) == 2
    assert "out of range [0, 1024)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"index": "3"}]')
    assert main(["labels", "import", str(tmp_path / "bad.json"), "--sae", demo_sae]) == 2
    assert "bad.json[0]: no field 'description'" in capsys.readouterr().err


def test_open_labels_finds_a_captures_labels_through_its_manifest(tmp_path):
    sae = make_sae(metadata={"layer": 1})
    sae.save(str(tmp_path / "s.safetensors"))
    store = saehook.load(str(tmp_path / "s.safetensors")).labels
    store.set(3, "French text", source="test")
    store.save()
    from saehook.labels import open_labels

    assert open_labels(str(tmp_path / "s.safetensors"), layer=1).label(3) == "French text"
    (tmp_path / "m.json").write_text(json.dumps({"layer": 1, "features": {"3": {"description": "x"}, "layer": "y"}}))
    with pytest.raises(LabelError, match="key 'layer' is not a feature index"):
        import_labels(store, str(tmp_path / "m.json"), saehook.load(str(tmp_path / "s.safetensors")))
    (tmp_path / "m.json").write_text(json.dumps({"layer": 1, "d_sae": 256, "features": {"4": "German text"}}))
    assert import_labels(store, str(tmp_path / "m.json"), saehook.load(str(tmp_path / "s.safetensors"))) == \
        {"imported": 1, "kept": 0}
    assert store.label(4) == "German text"


def test_cli_shows_labels_and_takes_label_named_features(demo_setup, tmp_path, capsys):
    """`features` shows each feature's label; `steer --clamp label:TEXT=V` equals the same clamp by
    index; an ambiguous or unknown label is an error listing the candidates."""
    d, model = demo_setup
    sae_path = str(tmp_path / "demo-sae.safetensors")
    shutil.copy(d / "demo-sae.safetensors", sae_path)
    sae = saehook.load(sae_path)
    store = sae.labels
    store.set(23, "dash runs", source="imported")
    store.set(5, "dash start", source="imported")
    store.set(7, "the with statement", source="imported")
    store.save()

    assert main(["features", model, "--sae", sae_path, "The with statement -- and", "--json", "--top", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    shown = {int(i) for row in out["rows"] for i, _ in row["features"]}
    assert out["labels"] == {str(f): store.label(f) for f in sorted(shown) if store.label(f)}

    def steered(spec):
        assert main(["steer", model, "--sae", sae_path, "The with statement", "--max-tokens", "6",
                     "--clamp", spec, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["steered_tokens"]

    assert steered("label:dash runs=20") == steered("23=20")
    assert main(["steer", model, "--sae", sae_path, "x", "--max-tokens", "2", "--clamp", "23=20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == {"23": "dash runs"}
    assert steered("label:with statement=20") == steered("7=20")
    assert main(["steer", model, "--sae", sae_path, "x", "--clamp", "label:dash=3"]) == 2
    err = capsys.readouterr().err
    assert "#23" in err and "#5" in err                       # ambiguous: both candidates listed
    assert main(["steer", model, "--sae", sae_path, "x", "--ablate", "label:no such thing"]) == 2
    assert "label" in capsys.readouterr().err


def test_stats_and_compare_show_the_labels_of_the_captured_sae(demo_setup, tmp_path, capsys):
    d, model = demo_setup
    sae_path = str(tmp_path / "demo-sae.safetensors")
    shutil.copy(d / "demo-sae.safetensors", sae_path)
    store = saehook.load(sae_path).labels
    for f in range(0, store.fingerprint["d_sae"], 2):  # every even feature named
        store.set(f, f"even {f}", source="imported")
    store.save()
    cap = str(tmp_path / "cap")
    assert main(["capture", model, "--sae", sae_path, "--data", str(d / "docs.jsonl"), "--out", cap,
                 "--max-tokens", "32"]) == 0
    capsys.readouterr()
    assert main(["stats", cap, "--json", "--report-rows", "30"]) == 0
    feats = json.loads(capsys.readouterr().out)["features"]
    assert feats and all(s["label"] == (f"even {s['feature']}" if s["feature"] % 2 == 0 else None) for s in feats)
    assert "even " in open(os.path.join(cap, f"stats-layer{feats and saehook.load(sae_path).layer}.html")).read()
    assert main(["compare", cap, cap, "--json", "--top", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert main(["compare", cap, cap, "--top", "5", "--html", str(tmp_path / "c.html")]) == 0
    page = (tmp_path / "c.html").read_text()
    assert all(f"#{s['feature']} even " in page for s in res["separating_features"] if s["label"])
    assert all(s["label"] == (f"even {s['feature']}" if s["feature"] % 2 == 0 else None)
               for s in res["separating_features"])
