"""Issue 14 (hardening), the command line and the workflows: bad arguments refused with the flag
named, resumed captures that check what they continue, errors that say what is wrong, and the
first hour on the shipped demo. CLI tests run the real `main()` (or `python -m saehook` where
the process matters: pipes, llama.cpp's log)."""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("pyarrow")

import saehook  # noqa: E402
from saehook import demo  # noqa: E402
from saehook import cli  # noqa: E402
from saehook.cli import main  # noqa: E402

MODEL, SAE = demo.MODEL, demo.SAE_FILE  # 4 layers, n_embd 128; SAE at layer 2, 1024 features, k 16
DOCS = ["The with statement is used to wrap a block.", "A for loop iterates over a sequence.",
        "Exceptions are raised with raise.", "Classes define new types."]


def fails(capsys, argv, *needles, code=2):
    """main(argv) refuses with exit status `code` and an error naming the problem."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def docs_txt(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(DOCS) + "\n")
    return p


def capture_argv(data, out, *extra):
    return ["capture", MODEL, "--sae", SAE, "--data", str(data), "--out", str(out), *extra]


def other_sae(tmp_path, name="other.safetensors", d_sae=1024, seed=1):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((d_sae, 128)) / 11).astype(np.float32)
    saehook.SAE(W, W, k=16, metadata={"layer": 2}).save(tmp_path / name)
    return tmp_path / name


# ---- item 10: capture arguments ----
@pytest.mark.parametrize("flag,value", [("--shard-docs", "-1"), ("--shard-docs", "0"), ("--max-tokens", "-1"),
                                        ("--max-tokens", "0")])
def test_capture_refuses_counts_below_one(capsys, docs_txt, tmp_path, flag, value):
    out = tmp_path / "feats"
    fails(capsys, capture_argv(docs_txt, out, flag, value), flag, "at least 1")
    assert not out.exists()


@pytest.mark.parametrize("kw", [{"shard_docs": 0}, {"shard_docs": -1}, {"max_tokens": -1}, {"max_tokens": 0},
                                {"max_tokens": 2.5}])
def test_capture_api_refuses_counts_below_one(tmp_path, kw):
    from saehook.engines import LlamaEngine
    from saehook.workflows.datasets import capture

    sae = saehook.load(SAE)
    out = tmp_path / "feats"
    with pytest.raises(ValueError, match=next(iter(kw))):
        capture(LlamaEngine(MODEL), {2: sae}, [{"text": t} for t in DOCS], str(out), **kw)
    assert not out.exists()


# ---- item 11: structured files named .txt ----
def test_txt_that_is_jsonl_or_csv_is_refused(tmp_path):
    from saehook.workflows.datasets import read_documents

    (tmp_path / "a.txt").write_text('{"text": "hello", "label": "x"}\n{"text": "bye", "label": "y"}\n')
    with pytest.raises(ValueError, match=r"JSON object.*rename it to \.jsonl"):
        read_documents(str(tmp_path / "a.txt"))
    (tmp_path / "b.txt").write_text("text,label\nhello,x\nbye,y\n")
    with pytest.raises(ValueError, match=r"CSV header.*rename it to \.csv"):
        read_documents(str(tmp_path / "b.txt"))
    (tmp_path / "c.txt").write_text("plain text, with a comma\nand {braces} inside\n")
    assert [d["text"] for d in read_documents(str(tmp_path / "c.txt"))] == ["plain text, with a comma",
                                                                            "and {braces} inside"]


def test_csv_is_read_by_its_columns(tmp_path):
    from saehook.workflows.datasets import read_documents

    (tmp_path / "d.csv").write_text('text,label\n"hello, world",x\nbye,\n')
    assert read_documents(str(tmp_path / "d.csv")) == [{"text": "hello, world", "label": "x"}, {"text": "bye"}]


# ---- item 11: features out of range, export-cvec, demo ----
def test_features_refuses_a_feature_out_of_range(capsys, tmp_path):
    page = tmp_path / "f.html"
    fails(capsys, ["features", MODEL, "--sae", SAE, "--feature", "5000", "--html", str(page), "The with"],
          "--feature 5000", "0 to 1023")
    assert not page.exists()
    from saehook.workflows.report import features_html

    with pytest.raises(IndexError, match="out of range"):
        features_html(["a"], [{"position": 0, "features": [[3, 1.0]]}], 1024, d_sae=1024)


@pytest.mark.parametrize("flag", ["--add", "--clamp", "--scale"])
def test_steer_flags_refuse_features_out_of_range(capsys, flag):
    fails(capsys, ["steer", MODEL, "--sae", SAE, flag, "1024=2", "The"], f"{flag} 1024", "0 to 1023")
    fails(capsys, ["steer", MODEL, "--sae", SAE, flag, "x=2", "The"], "FEATURE=VALUE")


def test_feature_reward_refuses_features_out_of_range():
    from saehook.engines import LlamaEngine
    from saehook.workflows.probe import feature_reward

    eng = LlamaEngine(MODEL)
    sae = saehook.load(SAE)
    with pytest.raises(IndexError, match="feature 5000 is out of range"):
        feature_reward(eng, sae, 2, {5000: 1.0})
    with pytest.raises(ValueError, match="not finite"):
        feature_reward(eng, sae, 2, {5: float("nan")})
    reward = feature_reward(eng, sae, 2, {219: 1.0})  # fires on the " d" of "a b c d" (the BPE demo)
    assert reward(["a b c d", "abcd"])[0] > 0


def test_export_cvec_refuses_positions_and_layers_the_model_lacks(capsys, tmp_path):
    out = tmp_path / "cv.gguf"
    fails(capsys, ["export-cvec", SAE, str(out), "--add", "5=2", "--positions", "generated"],
          "--positions generated", "every position")
    fails(capsys, ["export-cvec", SAE, str(out), "--add", "5=2", "--layer", "7", "--model", MODEL],
          "--layer 7", "4 blocks", "1 to 3")
    fails(capsys, ["export-cvec", SAE, str(out), "--add", "5=2", "--layer", "7", "--model-hint", MODEL],
          "--layer 7", "4 blocks")
    assert not out.exists()
    assert main(["export-cvec", SAE, str(out), "--add", "5=2", "--model", MODEL]) == 0
    import gguf

    r = gguf.GGUFReader(str(out))
    assert r.fields["controlvector.model_hint"].contents() == "qwen3"  # the architecture, as llama.cpp writes it
    assert [t.name for t in r.tensors] == ["direction.2"]


def test_demo_refuses_nothing_to_generate_or_an_empty_prompt(capsys):
    fails(capsys, ["demo", "--max-new-tokens", "-1"], "--max-new-tokens", "at least 1")
    fails(capsys, ["demo", "--max-new-tokens", "0"], "--max-new-tokens")
    fails(capsys, ["demo", "--prompt", ""], "needs a prompt")
    with pytest.raises(ValueError, match="max_tokens"):
        demo.run(max_tokens=-1)


def test_layer_other_than_trained_is_surfaced(capsys):
    assert main(["features", MODEL, "--sae", SAE, "--layer", "1", "The"]) == 0
    assert "trained on layer 2's residual, applied at layer 1" in capsys.readouterr().err


# ---- item 12: capture resume checks what it continues ----
def test_resume_refuses_rewritten_documents(capsys, docs_txt, tmp_path):
    out = tmp_path / "feats"
    assert main(capture_argv(docs_txt, out, "--shard-docs", "2")) == 0
    os.remove(out / "shard-00001.parquet")  # as if interrupted
    assert main(capture_argv(docs_txt, out, "--shard-docs", "2")) == 0  # same inputs: resumes
    assert "1 shards written, 1 already there" in capsys.readouterr().out
    docs_txt.write_text("\n".join(d.upper() for d in DOCS) + "\n")  # same count, other documents
    os.remove(out / "shard-00001.parquet")
    fails(capsys, capture_argv(docs_txt, out, "--shard-docs", "2"), "changed: the documents", "new directory")
    assert not (out / "shard-00001.parquet").exists()


def test_resume_refuses_another_sae_of_the_same_shape(capsys, docs_txt, tmp_path):
    import shutil

    out = tmp_path / "feats"
    sae_path = tmp_path / "sae.safetensors"
    shutil.copy(SAE, sae_path)
    argv = ["capture", MODEL, "--sae", str(sae_path), "--data", str(docs_txt), "--out", str(out), "--shard-docs", "2"]
    assert main(argv) == 0
    os.remove(out / "shard-00001.parquet")
    os.replace(other_sae(tmp_path), sae_path)  # same path, same shape, other weights
    fails(capsys, argv, "the SAE of layer 2")


def test_sae_fingerprint_tells_saes_apart_and_reads_little():
    from saehook.workflows.datasets import SAMPLE_BYTES, sae_fingerprint

    a = saehook.load(SAE)
    assert sae_fingerprint(a) == sae_fingerprint(saehook.load(SAE))
    W = np.asarray(a.arrays()["W_enc"]).copy()
    W[0, 0] += 1.0  # one weight in the first sampled MiB
    b = saehook.SAE(W, a.arrays()["W_dec"], a.arrays()["b_enc"], a.arrays()["b_dec"], k=a.k, activation=a.activation,
                    subtract_b_dec=a.subtract_b_dec, dec_layout=a.dec_layout)
    assert sae_fingerprint(b) != sae_fingerprint(a)
    big = np.zeros((4096, 1024), np.float32)  # 16 MiB: sampled, not hashed whole
    big2 = big.copy()
    big2[2048, 512] = 1.0  # in the middle, between samples
    s1, s2 = (saehook.SAE(w, big, k=4) for w in (big, big2))
    assert 3 * SAMPLE_BYTES < big.nbytes and sae_fingerprint(s1) == sae_fingerprint(s2)  # the documented trade


def test_concurrent_capture_is_refused(capsys, docs_txt, tmp_path):
    out = tmp_path / "feats"
    out.mkdir()
    fd = os.open(out / ".capture.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another capture is running
        fails(capsys, capture_argv(docs_txt, out), "another capture is writing into")
        assert not (out / "manifest.json").exists()
    finally:
        os.close(fd)
    assert main(capture_argv(docs_txt, out)) == 0  # free again


def test_bad_layer_writes_nothing_so_the_retry_works(capsys, docs_txt, tmp_path):
    out = tmp_path / "feats"
    fails(capsys, capture_argv(docs_txt, out, "--layers", "9"), "layer 9 is outside the model", "4 layers")
    assert not out.exists()
    assert main(capture_argv(docs_txt, out, "--layers", "2")) == 0


def test_two_real_captures_at_once(tmp_path, docs_txt):
    """Two processes into one directory: one captures, the other is told (no raw traceback)."""
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "saehook", *capture_argv(docs_txt, out, "--shard-docs", "1")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc in (0, 2) for rc, _ in res) and any(rc == 0 for rc, _ in res), res
    for rc, err in res:
        assert "Traceback" not in err
        if rc == 2:
            assert "another capture is writing into" in err
    from saehook.workflows.datasets import FeatureData

    assert FeatureData(str(out)).n_tokens > 0


# ---- errors that say what is wrong ----
def test_classify_predict_needs_out_and_the_probes_own_sae(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(DOCS * 2)))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["capture", MODEL, "--sae", SAE, "--data", str(data), "--out", str(a)]) == 0
    probe = tmp_path / "p.npz"
    assert main(["classify", "train", str(a), "--probe", str(probe)]) == 0
    capsys.readouterr()
    fails(capsys, ["classify", "predict", str(a), "--probe", str(probe)], "--out")
    small = other_sae(tmp_path, "small.safetensors", d_sae=512)
    assert main(["capture", MODEL, "--sae", str(small), "--data", str(data), "--out", str(b)]) == 0
    fails(capsys, ["classify", "predict", str(b), "--probe", str(probe), "--out", str(tmp_path / "p.jsonl")],
          "1024 features", "512")
    same_shape = other_sae(tmp_path)
    assert main(["capture", MODEL, "--sae", str(same_shape), "--data", str(data), "--out", str(c)]) == 0
    fails(capsys, ["classify", "predict", str(c), "--probe", str(probe), "--out", str(tmp_path / "p.jsonl")],
          "another SAE")
    assert main(["classify", "predict", str(a), "--probe", str(probe), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 8


def test_train_refuses_impossible_settings_before_any_work(capsys, docs_txt, tmp_path):
    base = ["train", MODEL, "--layer", "2", "--data", str(docs_txt), "--out", str(tmp_path / "s.safetensors")]
    fails(capsys, base + ["--d-sae", "8", "--k", "16"], "k = 16 is larger than d_sae = 8")
    fails(capsys, base + ["--d-sae", "8", "--k", "0"], "--k", "at least 1")
    fails(capsys, base + ["--d-sae", "8", "--k", "4", "--steps", "0"], "--steps")
    from saehook.workflows.train import train_sae

    def never():
        raise AssertionError("no batch may be read before the settings are checked")
        yield

    with pytest.raises(ValueError, match="k must be a whole number"):
        train_sae(never(), 128, 8, 0, steps=5)


def test_broken_pipe_is_quiet(tmp_path):
    """`saehook ... | head`: no BrokenPipeError traceback."""
    text = "The with statement is used to wrap the execution of a block. " * 8
    cmd = (f"{sys.executable} -m saehook features {MODEL} --sae {SAE} --top 16 --json '{text}' | head -c 100")
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
    assert len(r.stdout) == 100
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# ---- the first hour ----
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"saehook {saehook.__version__}"


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_flag_has_help_and_shows_its_default():
    cmds = _subparsers(cli.build_parser())
    assert {"capture", "features", "steer", "export-cvec", "eval", "train", "demo", "stats", "compare"} <= set(cmds)
    for name, p in cmds.items():
        if name == "bench":  # its flags are the scripts' (test_bench_passes_options_through)
            continue
        parsers = [(name, p)] + [(f"{name} {sub}", q) for sub, q in _subparsers(p).items()]
        for full, q in parsers:  # nested groups too (saehook labels show, ...)
            assert q.description, full
            for a in q._actions:
                if a.dest == "help":
                    continue
                assert a.help, f"saehook {full} {'/'.join(a.option_strings) or a.dest} has no help"
    text = " ".join(cmds["capture"].format_help().split())  # unwrapped
    assert "(default: 64)" in text and "(default: 512)" in text and "(default: None)" not in text


def test_no_llama_log_and_no_context_warning_by_default():
    r = subprocess.run([sys.executable, "-m", "saehook", "features", MODEL, "--sae", SAE, "The with"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "n_ctx_train" not in r.stderr and "llama_" not in r.stderr, r.stderr
    from saehook.engines import LlamaEngine

    assert LlamaEngine(MODEL).llm.n_ctx() == 512  # the demo's training context, not 2048
    assert LlamaEngine(MODEL, n_ctx=1024).llm.n_ctx() == 1024  # asked for: as given


def test_stats_says_where_its_page_went_and_draws_axes(capsys, docs_txt, tmp_path):
    out = tmp_path / "feats"
    assert main(capture_argv(docs_txt, out)) == 0
    capsys.readouterr()
    assert main(["stats", str(out)]) == 0
    err = capsys.readouterr().err
    page = out / "stats-layer2.html"
    assert str(page) in err and page.exists()
    html = page.read_text()
    assert html.count("<figure>") == 2
    assert html.count('stroke="#333"') >= 2 * 2  # x and y axes of both histograms (plus ticks)
    assert "log10 frequency" in html and "features</text>" in html  # axis names
    counts = [int(c) for c in re.findall(r"<title>(\d+) in \[", html)]
    live = sum(1 for f in json.loads((out / "stats-layer2.json").read_text())["features"] if not f["dead"])
    assert sum(counts[:30]) == live  # each bar's count, and they add up to the live features


def test_compare_bars_share_one_scale_and_say_what_they_mean(capsys, tmp_path):
    a_txt, b_txt = tmp_path / "a.txt", tmp_path / "b.txt"
    a_txt.write_text("\n".join(DOCS) + "\n")
    b_txt.write_text("1 2 3 4 5 6 7 8 9\n(((( ))))\n")
    assert main(capture_argv(a_txt, tmp_path / "a")) == 0
    assert main(capture_argv(b_txt, tmp_path / "b")) == 0
    capsys.readouterr()
    page = tmp_path / "c.html"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(page), "--top", "8"]) == 0
    printed = capsys.readouterr()
    assert "Coverage of B by A" in printed.out and "largest |freq A - freq B| first" in printed.out
    html = page.read_text()
    widths = {tag: [float(w) for w in re.findall(rf'class="bar {tag}" style="width:([\d.]+)px"', html)] for tag in "AB"}
    freqs = {tag: [float(v) for v in re.findall(rf'class="bar {tag}" style="width:[\d.]+px"></div> ([\d.]+)', html)]
             for tag in "AB"}
    assert len(widths["A"]) == len(widths["B"]) == 8
    peak = max(freqs["A"] + freqs["B"])
    for tag in "AB":  # one scale for both columns: width / frequency is the same everywhere
        for w, f in zip(widths[tag], freqs[tag]):
            assert abs(w - 200.0 * f / peak) < 0.2, (tag, w, f)
    assert max(widths["A"] + widths["B"]) == pytest.approx(200.0, abs=0.1)
    assert re.search(r"\d\.\d{5,}", re.sub(r"<[^>]*>", " ", html)) is None  # numbers rounded for reading


def test_features_page_has_a_legend(tmp_path, capsys):
    page = tmp_path / "f.html"
    # feature 259 fires on the " c" of "a b c" (the BPE demo)
    assert main(["features", MODEL, "--sae", SAE, "--feature", "259", "--html", str(page), "a b c"]) == 0
    html = page.read_text()
    assert "Shading: feature 259" in html and html.count('class="swatch"') == 5  # the legend's five steps
    assert html.count('class="t"') == 3  # one span per token ('a', ' b', ' c')


def test_eval_shows_progress_and_explains_its_metrics(capsys, docs_txt):
    assert main(["eval", MODEL, "--sae", SAE, "--data", str(docs_txt)]) == 0
    out = capsys.readouterr()
    assert "evaluating documents: 4/4" in out.err
    assert "fraction of the residual's variance" in out.out and "ce_increase" in out.out


def test_eval_texts_may_follow_the_options(capsys):
    assert main(["eval", MODEL, "--sae", SAE, "The with statement is used to wrap a block.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_tokens"] > 10
    fails(capsys, ["eval", MODEL, "--sae", SAE, "text", "--bogus"], "unrecognized arguments", "--bogus")


def test_bench_passes_options_through(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the checkout: the scripts are found from the package
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--shapes" in out and "4096x65536 4.4 GiB" in out and "--llama" in out
    assert main(["bench", "--shapes", "64x512", "--batches", "1", "--k", "8", "--reps", "1", "--no-torch",
                 "--dtypes", "f32", "--json", str(tmp_path / "b.json")]) == 0
    assert {r["batch"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]} == {1}
    assert main(["bench", "--llama", "--help"]) == 0
    assert "--prompt-tokens" in capsys.readouterr().out


def test_bench_scripts_are_installed_with_the_package(tmp_path):
    """CMake's install step puts bench/*.py into saehook/bench (what a wheel contains)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = os.path.join(root, "build", "editable")
    if os.path.exists(os.path.join(build, "CMakeCache.txt")):  # editable install: run the install step
        subprocess.run(["cmake", "--install", build, "--prefix", str(tmp_path)], check=True, capture_output=True)
        bench = tmp_path / "saehook" / "bench"
    else:  # an installed wheel (what `pip install .` and CI do): the scripts sit in the package
        import pathlib

        bench = pathlib.Path(os.path.dirname(saehook.__file__)) / "bench"
    assert (bench / "bench_kernels.py").exists() and (bench / "common.py").exists()
    env = dict(os.environ, SAEHOOK_BENCH_DIR=str(bench))
    r = subprocess.run([sys.executable, "-m", "saehook", "bench", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--shapes" in r.stdout, r.stderr


def _gguf_with_keys_after_a_big_vocabulary(path, n_tokens=151_000):
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_token_list([f"t{i}" for i in range(n_tokens)])  # before the model's keys
    w.add_token_types([1] * n_tokens)
    w.add_block_count(36)
    w.add_embedding_length(4096)
    w.add_context_length(40960)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_model_facts_agree_with_the_gguf_package_and_are_quick(tmp_path):
    import time

    import gguf

    from saehook.engines.protocol import gguf_model_facts

    path = tmp_path / "m.gguf"
    _gguf_with_keys_after_a_big_vocabulary(path)
    for p in (MODEL, str(path)):
        t = time.perf_counter()
        got = gguf_model_facts(p)
        elapsed = time.perf_counter() - t
        r = gguf.GGUFReader(p)  # the oracle (slow: it builds every field)
        arch = r.fields["general.architecture"].contents()
        assert got == {"architecture": arch, "n_layer": r.fields[f"{arch}.block_count"].contents(),
                       "n_embd": r.fields[f"{arch}.embedding_length"].contents(),
                       "n_ctx_train": r.fields[f"{arch}.context_length"].contents()}
        assert elapsed < 2.0, elapsed  # the vocabulary is skipped, not parsed
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:5000])
    with pytest.raises(ValueError, match="truncated"):
        gguf_model_facts(str(tmp_path / "cut.gguf"))
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_model_facts(SAE)


def test_llama_warnings_are_quiet_with_verbose_false():
    """llama-cpp-python 0.3.36 prints llama.cpp's warnings with verbose=False (a stale level
    map); the CLI's engine prints errors only. A model whose context is asked beyond its
    training length makes llama.cpp warn."""
    code = ("from saehook.engines import LlamaEngine; from saehook import demo; "
            "LlamaEngine(demo.MODEL, n_ctx=1024); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "n_ctx_train" not in r.stderr, r.stderr
    loud = code.replace("n_ctx=1024", "n_ctx=1024, verbose=True")
    r = subprocess.run([sys.executable, "-c", loud], capture_output=True, text=True, timeout=120)
    assert "n_ctx_train" in r.stderr  # the warning exists; verbose=True shows it
