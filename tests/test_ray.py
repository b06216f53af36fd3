"""Dataset capture on a real local Ray cluster (127.0.0.1, 2 CPUs, one per module): the same rows
as a local capture, exactly once when an actor is killed mid-run, and a resume after the driver
is SIGKILLed; output on a local path, a file:// URI and a pyarrow SubTreeFileSystem."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import saehook  # noqa: E402
from saehook.engines import open_engine  # noqa: E402
from saehook.workflows import datasets  # noqa: E402
from saehook.workflows.distributed import CaptureIncomplete, capture_on_ray  # noqa: E402

import gguf_models as gm  # noqa: E402

LAYER = 1
SHARD_DOCS = 3
N_DOCS = 22  # 8 units, the last one short


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    gm.write_gguf(gm.build_hf_model(seed=5), d / "m.gguf")
    rng = np.random.default_rng(2)
    W = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    saehook.SAE(W, W, k=6, activation="topk_relu", metadata={"layer": LAYER}).save(d / "sae.safetensors")
    rng = np.random.default_rng(0)
    docs = [{"text": "".join(rng.choice(list("abcdefghijklmnopqrstuvw xyz"), size=int(rng.integers(5, 40)))),
             "label": str(i % 2)} for i in range(N_DOCS)]
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    # the oracle: a local capture of the same documents by datasets.capture (one thread, as each actor)
    eng = open_engine(str(d / "m.gguf"), threads=1)
    saes = {LAYER: saehook.load(str(d / "sae.safetensors"))}
    datasets.capture(eng, saes, docs, str(d / "local"), shard_docs=SHARD_DOCS)
    return d


def _rows(fs, root):
    """Every feature row of a capture, sorted by document, layer and position."""
    names = sorted(os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root)))
    shards = [n for n in names if n.startswith("shard-")]
    table = pa.concat_tables([pq.read_table(f"{root}/{n}", filesystem=fs) for n in shards])
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["doc_id"], r["layer"], r["position"]))
    return shards, names, rows


def _same_capture(setup, fs, root):
    local = pafs.LocalFileSystem()
    want_shards, _, want = _rows(local, str(setup / "local"))
    shards, names, got = _rows(fs, root)
    assert shards == want_shards
    assert [n for n in names if n.endswith(".tmp")] == []
    assert len(got) == len(want) > N_DOCS  # row for row: nothing lost, nothing twice
    assert len({(r["doc_id"], r["layer"], r["position"]) for r in got}) == len(got)
    assert got == want
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        assert json.loads(f.read()) == json.loads((setup / "local" / "manifest.json").read_text())
    assert pq.read_table(f"{root}/docs.parquet", filesystem=fs).equals(pq.read_table(setup / "local" / "docs.parquet"))


def _capture(setup, out, **kw):
    return capture_on_ray(str(setup / "m.gguf"), {kw.pop("layer", LAYER): str(setup / "sae.safetensors")},
                          str(setup / "docs.jsonl"), out, shard_docs=SHARD_DOCS, **kw)


def test_ray_capture_equals_local_capture(cluster, setup, tmp_path):
    seen = []
    res = _capture(setup, str(tmp_path / "cap"), progress=lambda done, total: seen.append((done, total)))
    assert (res["shards"], res["written"], res["skipped"], res["actor_failures"]) == (8, 8, 0, 0)
    assert res["actors"] == 2
    _same_capture(setup, pafs.LocalFileSystem(), str(tmp_path / "cap"))
    assert seen[-1] == (N_DOCS, N_DOCS) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # the analysis commands read it as they read a local capture
    a, b = datasets.FeatureData(str(tmp_path / "cap")), datasets.FeatureData(str(setup / "local"))
    np.testing.assert_array_equal(a.feature_counts(), b.feature_counts())
    again = _capture(setup, str(tmp_path / "cap"))  # a complete capture: nothing to redo
    assert (again["written"], again["skipped"]) == (0, 8)


def test_killed_actor_unit_is_redone_exactly_once(cluster, setup, tmp_path):
    killed = []

    def kill_one_actor(unit):
        if killed:
            return
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("saehook-capture-")]
        for victim in sorted(names, key=lambda a: a["name"]):
            try:  # the names of earlier runs' actors are released as they die
                handle = ray.get_actor(victim["name"], namespace=victim["namespace"])
            except ValueError:
                continue
            ray.kill(handle)
            killed.append(victim["name"])
            return

    uri = (tmp_path / "cap").as_uri()  # file:///...: a pyarrow.fs URI
    res = _capture(setup, uri, on_commit=kill_one_actor)
    assert killed and res["actor_failures"] == 1 and res["retried_units"]  # the kill hit work in flight
    assert res["actors"] == 3 and res["written"] == 8  # a replacement actor took over
    _same_capture(setup, pafs.LocalFileSystem(), str(tmp_path / "cap"))


DRIVER = textwrap.dedent("""
    import sys, time
    import ray, pyarrow.fs as pafs
    from saehook.workflows.distributed import capture_on_ray
    address, model, sae, docs, base, shard_docs = sys.argv[1:]
    ray.init(address=address, log_to_driver=False)
    def commit(unit):
        print("committed", unit, flush=True)
        time.sleep(120)  # the test SIGKILLs this driver here, with other units in flight
    capture_on_ray(model, {1: sae}, docs, "cap", filesystem=pafs.SubTreeFileSystem(base, pafs.LocalFileSystem()),
                   shard_docs=int(shard_docs), on_commit=commit)
""")


def test_resume_after_driver_is_killed(cluster, setup, tmp_path):
    subtree = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, cluster, str(setup / "m.gguf"),
                             str(setup / "sae.safetensors"), str(setup / "docs.jsonl"), str(tmp_path), str(SHARD_DOCS)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("committed"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    shards = [n for n in os.listdir(tmp_path / "cap") if n.startswith("shard-")]
    assert len(shards) == 1  # one unit committed before the kill, the other seven not
    res = capture_on_ray(str(setup / "m.gguf"), {LAYER: str(setup / "sae.safetensors")}, str(setup / "docs.jsonl"), "cap",
                         filesystem=subtree, shard_docs=SHARD_DOCS)
    assert (res["skipped"], res["written"]) == (1, 7)
    _same_capture(setup, subtree, "cap")


def test_failing_document_is_reported_and_the_rest_committed(cluster, setup, tmp_path):
    docs = [{"text": "abc def"}] * 5 + [{"text": "x" * 4000}] + [{"text": "ghi jkl"}] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    with pytest.raises(CaptureIncomplete) as e:  # a 16-token context cannot hold document 5
        capture_on_ray(str(setup / "m.gguf"), {LAYER: str(setup / "sae.safetensors")}, str(tmp_path / "d.jsonl"),
                       str(tmp_path / "cap"), shard_docs=SHARD_DOCS, max_tokens=4000, engine_kwargs={"n_ctx": 16})
    assert "2 of 3 shards committed" in str(e.value)
    assert "document 5 ('xxxxx" in str(e.value)
    assert [f["doc_id"] for f in e.value.failures] == [5]
    assert sorted(n for n in os.listdir(tmp_path / "cap") if n.startswith("shard-")) == [
        "shard-00000.parquet", "shard-00002.parquet"]


def test_other_inputs_in_the_same_directory_are_refused(cluster, setup, tmp_path):
    out = str(tmp_path / "cap")
    _capture(setup, out)
    with pytest.raises(ValueError, match="max_tokens"):
        _capture(setup, out, max_tokens=5)


def test_cli_capture_on_ray(cluster, setup, tmp_path):
    out = subprocess.run([sys.executable, "-m", "saehook", "capture", str(setup / "m.gguf"), "--sae",
                          str(setup / "sae.safetensors"), "--data", str(setup / "docs.jsonl"), "--out",
                          str(tmp_path / "cap"), "--shard-docs", str(SHARD_DOCS), "--ray", cluster, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["written"], res["actors"], res["nodes"]) == (8, 2, 1)
    manifest = json.loads((tmp_path / "cap" / "manifest.json").read_text())
    assert manifest["model"] == str(setup / "m.gguf")
    shards, _, rows = _rows(pafs.LocalFileSystem(), str(tmp_path / "cap"))
    want = _rows(pafs.LocalFileSystem(), str(setup / "local"))[2]
    # The command's actors encode through the bf16 prefilter (capture --prefilter auto), the
    # oracle without it: the same features, values to float32 rounding (another summation order).
    assert len(rows) == len(want)
    for got, ref in zip(rows, want):
        assert {k: v for k, v in got.items() if k != "values"} == {k: v for k, v in ref.items() if k != "values"}
        np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-5, atol=1e-6)


# ---- Ray Serve: two replicas of `saehook serve` behind one endpoint ----

SERVE_ARGS = dict(parallel=4, n_ctx=160, n_batch=64, n_threads=1, chat_format="chatml")


def _ask(client, i, kind):
    """(the replica that answered, every field of the answer but ids and times): a steered
    completion, or a streamed chat with per-token features."""
    spec = [{"feature": 7 + i, "op": "clamp", "value": 3.0 + i}]
    if kind == "completion":
        raw = client.completions.with_raw_response.create(
            model="m", prompt=f"The with statement number {i} is used to", max_tokens=8, temperature=0,
            extra_body={"saehook": {"steer": spec}})
        c = raw.parse()
        return raw.headers.get("x-saehook-replica"), (c.choices[0].text, c.choices[0].finish_reason, c.usage.model_dump())
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": f"What is {i}?"}], max_tokens=6, temperature=0, stream=True,
        extra_body={"saehook": {"steer": spec, "features": {"sae": "demo", "layer": 2, "top": 3, "prompt": True}}})
    chat = [(ch.delta.content, ch.finish_reason, (ch.model_extra or {}).get("saehook"))
            for x in raw.parse() for ch in x.choices]
    assert any(c[2] for c in chat)  # the features came back
    return raw.headers.get("x-saehook-replica"), ("".join(c[0] or "" for c in chat), chat)


def _text(answer):
    return answer[0]


def test_two_ray_serve_replicas_answer_as_one_local_server(cluster):
    import concurrent.futures

    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from ray import serve

    from saehook import demo
    from saehook.serve.ray_serve import serve_on_ray
    from test_serve import Server, free_port

    def local_server():
        return Server(demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--parallel", 4, "--n-ctx", 160, "--n-batch", 64,
                      "--chat-format", "chatml")

    requests = [(i, kind) for i in range(6) for kind in ("completion", "chat")]
    port = free_port()
    try:
        serve_on_ray(demo.MODEL, {"demo": demo.SAE_FILE}, replicas=2, port=port, **SERVE_ARGS)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        # one at a time, to fresh replicas: Ray Serve's router picks one of the two for each
        seq = [_ask(client, *r) for r in requests]
        # then eight at once: spread over both replicas
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda r: _ask(client, *r), requests[:8]))
        assert len({replica for replica, _ in burst}) == 2
        local = local_server()
        try:
            solo = [_ask(local.client(), *r)[1] for r in requests]
        finally:
            assert local.stop() == 0
        assert len({json.dumps(a) for a in solo}) >= 8  # the steerings change the answers
        # every text, the burst's included, is one local server's
        assert [_text(a) for _, a in seq] == [_text(a) for a in solo]
        assert [_text(a) for _, a in burst] == [_text(a) for a in solo[:8]]
        # every field and feature value is that of a local server given the same requests in the same
        # order, replayed on a fresh server per replica (a server's feature values move in the last
        # digits with the requests it served before, as the KV cells a prompt gets depend on them)
        by_replica: dict = {}
        for r, (replica, answer) in zip(requests, seq):
            by_replica.setdefault(replica, []).append((r, answer))
        for served in by_replica.values():
            local = local_server()
            try:
                assert [_ask(local.client(), *r)[1] for r, _ in served] == [a for _, a in served]
            finally:
                assert local.stop() == 0
    finally:
        serve.shutdown()
    # the same through the CLI: saehook serve --ray ADDRESS --replicas 2, stopped by SIGTERM
    port = free_port()
    cmd = [sys.executable, "-m", "saehook", "serve", demo.MODEL, "--sae", f"demo={demo.SAE_FILE}", "--ray", cluster,
           "--replicas", "2", "--port", str(port), "--threads", "1", "--parallel", "4", "--n-ctx", "160",
           "--n-batch", "64", "--chat-format", "chatml"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                answer = _ask(client, 0, "completion")[1]
                break
            except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
                assert time.monotonic() < deadline, "saehook serve --ray did not start"
                time.sleep(1)
        assert _text(answer) == _text(solo[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def test_wrong_layer_is_refused_before_any_actor_starts(cluster, setup, tmp_path):
    with pytest.raises(ValueError, match="layer 7 is outside the model"):
        _capture(setup, str(tmp_path / "cap"), layer=7)
    assert not (tmp_path / "cap").exists()


def test_saes_must_be_paths_or_a_loader():
    from saehook.workflows.distributed import sae_loader

    with pytest.raises(TypeError, match="SAE file paths"):
        sae_loader({1: saehook.SAE(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), k=1)})
    with pytest.raises(TypeError, match="function returning"):
        sae_loader("sae.safetensors")
