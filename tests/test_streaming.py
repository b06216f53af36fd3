"""Streaming stats/compare (workflows.streaming) equal the in-memory ones (datasets.feature_stats,
datasets.compare over FeatureData) on captures read a few rows at a time, two layers captured."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import saehook  # noqa: E402
from saehook.engines import open_engine  # noqa: E402
from saehook.workflows import datasets, streaming  # noqa: E402

import gguf_models as gm  # noqa: E402


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    gm.write_gguf(gm.build_hf_model(seed=5), d / "m.gguf")
    rng = np.random.default_rng(2)
    saes = {}
    for layer in (0, 1):
        W = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
        saes[layer] = saehook.SAE(W, W, k=6, activation="topk_relu")
    plain = "abcdefghijklmnopqrstuvw "

    def doc(extra):
        return "".join(rng.choice(list(plain + extra), size=int(rng.integers(3, 30))))
    a = [{"text": doc("xxxxxxxx")} for _ in range(14)]
    b = [{"text": doc("")} for _ in range(11)] + [dict(a[3]), dict(a[9])]  # two of A's documents again
    eng = open_engine(str(d / "m.gguf"), threads=1)
    datasets.capture(eng, saes, a, str(d / "A"), shard_docs=4)
    datasets.capture(eng, saes, b, str(d / "B"), shard_docs=5)
    return d


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("batch_rows", [7, 100000])  # several batches per shard, and one
def test_stream_feature_stats_equal_in_memory(captures, layer, batch_rows):
    want = datasets.feature_stats(datasets.FeatureData(str(captures / "A"), layer), top=3)
    cap = streaming.StreamingCapture(str(captures / "A"), layer, batch_rows=batch_rows)
    got = streaming.stream_feature_stats(cap, top=3)
    assert cap.n_tokens == datasets.FeatureData(str(captures / "A"), layer).n_tokens
    assert sum(not s["dead"] for s in got) > 20 and any(len(s["top_contexts"]) == 3 for s in got)
    assert json.dumps(got) == json.dumps(want)  # every field, the order of ties and the contexts included


@pytest.mark.parametrize("batch_rows", [7, 100000])
def test_stream_compare_equal_in_memory(captures, batch_rows):
    A, B = (datasets.FeatureData(str(captures / n), 1) for n in "AB")
    want = datasets.compare(A, B, top=10, redundancy=0.9)
    sa, sb = (streaming.StreamingCapture(str(captures / n), 1, batch_rows=batch_rows) for n in "AB")
    got = streaming.stream_compare(sa, sb, top=10, redundancy=0.9, block=4)
    near_w, near_g = want.pop("redundant_docs_b"), got.pop("redundant_docs_b")
    assert got == want
    assert [(n["doc_b"], n["doc_a"]) for n in near_g] == [(n["doc_b"], n["doc_a"]) for n in near_w]
    assert {(11, 3), (12, 9)} <= {(n["doc_b"], n["doc_a"]) for n in near_g}
    # float32 dot products summed in another order (blocks): the last bits may differ
    np.testing.assert_allclose([n["similarity"] for n in near_g], [n["similarity"] for n in near_w], rtol=1e-5)
    skipped = streaming.stream_compare(sa, sb, top=10, redundancy=None)
    assert skipped["redundant_docs_b"] == [] and skipped["separating_features"] == want["separating_features"]


def test_incomplete_capture_is_refused(captures, tmp_path):
    import shutil

    shutil.copytree(captures / "A", tmp_path / "A")
    (tmp_path / "A" / "shard-00002.parquet").unlink()
    with pytest.raises(ValueError, match="3 of 4 shards present"):
        streaming.StreamingCapture(str(tmp_path / "A"))


def test_a_stray_file_does_not_stand_in_for_a_missing_shard(captures, tmp_path):
    # FeatureData once counted the shard-*.parquet files: a missing shard with a stray one beside it
    # (a copy, a rename) passed the count and loaded the wrong rows
    import shutil

    shutil.copytree(captures / "A", tmp_path / "A")
    (tmp_path / "A" / "shard-00002.parquet").rename(tmp_path / "A" / "shard-00002-old.parquet")
    for open_capture in (datasets.FeatureData, streaming.StreamingCapture):
        with pytest.raises(ValueError, match=r"3 of 4 shards present \(missing shard-00002.parquet"):
            open_capture(str(tmp_path / "A"))
