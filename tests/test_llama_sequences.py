"""Per-sequence hook entries (HookedLlama.hook_sequence): several sequences in one llama_decode,
each with its own steering and capture, equal each sequence run alone through the ordinary
HookedLlama path (steer() + capture() + generate), on a qwen3 model (one unified KV stream)
and on a qwen35 hybrid model (recurrent memory: llama.cpp's split_equal), and share one SAE
encode per layer and micro-batch."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import saehook  # noqa: E402
from saehook.llama import HookedLlama  # noqa: E402

import gguf_models as gm  # noqa: E402
from saehook.demo.gguf_writer import write_random_qwen35  # noqa: E402

D = 256
KV_F32 = gm.KV_F32
PROMPTS = [[int(t) for t in np.random.default_rng(s).integers(0, 256, n)] for s, n in ((11, 9), (12, 6), (13, 12), (14, 7))]
N_GEN = 6


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf"
    gm.write_gguf(gm.build_hf_model(num_hidden_layers=3), path)
    return path


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen35.gguf"
    write_random_qwen35(path, layers=4, full_attention_interval=2)
    return path


random_sae = gm.random_sae  # d_model 256: the tiny models' hidden size


@pytest.fixture(scope="module")
def sae():
    return random_sae()


open_llm = gm.open_llm


def steerings(sae, n, layer=1):
    """A different clamp (and an add) per sequence, strong enough to change the greedy tokens."""
    return [saehook.Steering(sae, layer=layer).clamp(10 + 7 * s, 6.0 + 2 * s).add(3 + s, 1.5) for s in range(n)]


def alone(llm, prompt, st, sae, layer=1):
    """One sequence through HookedLlama's ordinary path: steer() and capture() around greedy
    generate(); the sampled tokens (N_GEN) and the rows captured (prompt + the N_GEN - 1 fed back)."""
    llm.reset()
    out = []
    with llm.steer(st, control_vectors=False), llm.capture({layer: sae}) as rec:
        for t in llm.generate(prompt, top_k=1, temp=0.0):
            out.append(t)
            if len(out) == N_GEN:
                break
    return out, rec[layer]


def greedy_next(llm, batch_index):
    """argmax of the logits llama.cpp computed for token `batch_index` of the last decode."""
    p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, batch_index)
    return int(np.argmax(np.ctypeslib.as_array(p, shape=(llm.n_vocab(),))))


def batched(llm, prompts, sts, sae, *, order=None, prompts_together=True, layer=1):
    """All sequences in shared decodes with per-sequence entries: the prompts in one batch (or one
    decode each), then one generation step per decode holding one token of every sequence, in
    `order`. Returns the N_GEN tokens sampled per sequence, the rows captured per sequence
    (prompt + the N_GEN - 1 fed back), and the number of decodes."""
    n = len(prompts)
    order = list(range(n)) if order is None else list(order)
    batch = llama_cpp.llama_batch_init(128, 0, 1)
    hooks = []
    decodes = 0

    def decode(entries, generated):  # entries: (seq, token, pos, output); returns {seq: next token}
        nonlocal decodes
        for j, (s, tok, pos, out) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = tok, pos, 1, s
            batch.logits[j] = out
        batch.n_tokens = len(entries)
        llm.announce_batch(batch, generated=generated)
        assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
        llm.raise_hook_error()
        decodes += 1
        return {s: greedy_next(llm, j) for j, (s, _, _, out) in enumerate(entries) if out}

    try:
        hooks = [llm.hook_sequence(s, steerings=[sts[s]], capture={layer: sae}) for s in range(n)]
        out = {s: [] for s in range(n)}
        for g in ([list(range(n))] if prompts_together else [[s] for s in range(n)]):
            entries = [(s, t, p, p == len(prompts[s]) - 1) for s in g for p, t in enumerate(prompts[s])]
            for s, t in decode(entries, [False] * len(entries)).items():
                out[s].append(t)
        for step in range(N_GEN - 1):
            entries = [(s, out[s][-1], len(prompts[s]) + step, True) for s in order]
            for s, t in decode(entries, True).items():
                out[s].append(t)
        recs = [h.take()[layer] for h in hooks]
        assert all(len(r.tokens) == 0 for h in hooks for r in h.take().values())  # take() cleared them
        return out, recs, decodes
    finally:
        for h in hooks:
            h.close()
        llama_cpp.llama_batch_free(batch)


def assert_same_as_alone(llm_alone, prompts, sts, sae, out, recs, layer=1):
    for s, prompt in enumerate(prompts):
        toks, ref = alone(llm_alone, prompt, sts[s], sae, layer)
        assert out[s] == toks, f"sequence {s}: greedy tokens differ from the sequence alone"
        r = recs[s]
        assert (r.seq_ids == s).all()
        np.testing.assert_array_equal(r.tokens, ref.tokens)
        np.testing.assert_array_equal(r.positions, ref.positions)
        np.testing.assert_array_equal(r.generated, ref.generated)
        np.testing.assert_array_equal(r.indices, ref.indices, err_msg=f"sequence {s}")
        np.testing.assert_allclose(r.values, ref.values, rtol=1e-4, atol=1e-4, err_msg=f"sequence {s}")


# ---------------------------------------------------------------------------------------------
# qwen3: one unified KV stream, any batch


def test_sequences_in_one_batch_equal_each_alone_and_share_one_encode(qwen3, sae):
    n = 4
    sts = steerings(sae, n)
    prompts = PROMPTS[:n]
    solo = open_llm(qwen3)
    # The steering matters: each sequence's tokens differ from the unsteered ones.
    plain = [alone(solo, p, saehook.Steering(sae, layer=1), sae)[0] for p in prompts]

    llm = open_llm(qwen3, context_overrides={"n_seq_max": n, "kv_unified": True})
    before = llm.encode_count
    out, recs, decodes = batched(llm, prompts, sts, sae)
    assert decodes == N_GEN  # the prompts together, then N_GEN - 1 steps
    # 4 clamps and 4 captures at layer 1, one SAE and one k: ONE encode per decode (one
    # micro-batch each), not eight.
    assert llm.encode_count - before == decodes
    assert_same_as_alone(solo, prompts, sts, sae, out, recs)
    assert sum(out[s] != plain[s] for s in range(n)) >= 3
    assert not llm._entries and llm.live_entry_ids() == []  # closed hooks left nothing behind


def test_different_saes_or_k_do_not_share_an_encode(qwen3, sae):
    other = random_sae(seed=1)
    llm = open_llm(qwen3, context_overrides={"n_seq_max": 3, "kv_unified": True})
    toks = [PROMPTS[0][:4], PROMPTS[1][:4], PROMPTS[2][:4]]
    flat = [t for p in toks for t in p]
    seqs = [s for s in range(3) for _ in range(4)]
    pos = [p for _ in range(3) for p in range(4)]
    with llm.hook_sequence(0, capture={1: sae}), llm.hook_sequence(1, capture={1: other}), \
            llm.hook_sequence(2, capture={1: sae}, k=8) as h2:
        before = llm.encode_count
        llm.announce(flat, pos, seq_ids=seqs)
        batch = llama_cpp.llama_batch_init(16, 0, 1)
        try:
            for j in range(12):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = flat[j], pos[j], 1, seqs[j]
                batch.logits[j] = j == 11
            batch.n_tokens = 12
            assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        llm.raise_hook_error()
        assert llm.encode_count - before == 3  # (sae, 16), (other, 16), (sae, 8)
        r2 = h2.take()[1]
    assert r2.indices.shape == (4, 8) and r2.tokens.tolist() == toks[2]


def test_announce_takes_one_generated_flag_per_token(qwen3, sae):
    """One batch with a prompt chunk of sequence 0 and a sampled token of sequence 1:
    positions='generated' steers only the latter, positions='prompt' only the former."""
    llm = open_llm(qwen3, context_overrides={"n_seq_max": 2, "kv_unified": True})
    gen_only = saehook.Steering(sae, layer=0, positions="generated").add(5, 50.0)
    with llm.hook_sequence(0, steerings=[gen_only], capture={1: sae}) as h0, \
            llm.hook_sequence(1, steerings=[gen_only], capture={1: sae}) as h1:
        llm.announce([1, 2, 3, 4], [0, 1, 2, 0], seq_ids=[0, 0, 0, 1], outputs=[0, 0, 1, 1],
                     generated=[False, False, False, True])
        batch = llama_cpp.llama_batch_init(8, 0, 1)
        try:
            for j, (t, p, s, o) in enumerate(zip([1, 2, 3, 4], [0, 1, 2, 0], [0, 0, 0, 1], [0, 0, 1, 1])):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = t, p, 1, s, o
            batch.n_tokens = 4
            assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        llm.raise_hook_error()
        r0, r1 = h0.take()[1], h1.take()[1]
    assert r0.generated.tolist() == [False] * 3 and r1.generated.tolist() == [True]
    # the reference: the same tokens alone, unsteered (sequence 0) and steered (sequence 1)
    solo = open_llm(qwen3)
    with solo.capture({1: sae}) as ref0:
        solo.eval([1, 2, 3])
    solo.reset()
    with solo.steer(saehook.Steering(sae, layer=0).add(5, 50.0)), solo.capture({1: sae}) as ref1:
        solo.eval([4])
    np.testing.assert_array_equal(r0.indices, ref0[1].indices)
    np.testing.assert_array_equal(r1.indices, ref1[1].indices)
    with pytest.raises(ValueError, match="flags for"):
        llm.announce([1, 2], [0, 1], generated=[True])


def test_sequence_hook_validation_and_close(qwen3, sae):
    llm = open_llm(qwen3)
    with pytest.raises(ValueError, match="seq_id"):
        llm.hook_sequence(-1)
    with pytest.raises(ValueError, match="outside the model"):
        llm.hook_sequence(0, capture={7: sae})
    with pytest.raises(ValueError, match="no layer"):
        llm.hook_sequence(0, steerings=[saehook.Steering(sae).clamp(1, 1.0)])
    assert llm.live_entry_ids() == [] and not llm._entries  # a refused hook adds nothing
    h = llm.hook_sequence(3, steerings=steerings(sae, 1), capture={0: sae, 2: sae})
    assert len(llm.live_entry_ids()) == 3
    h.close()
    h.close()  # idempotent
    assert llm.live_entry_ids() == []
    with pytest.raises(RuntimeError, match="closed"):
        h.take()


# ---------------------------------------------------------------------------------------------
# row order on contexts that group rows by sequence


def _with_batch(llm, entries, generated=True):
    batch = llama_cpp.llama_batch_init(32, 0, 1)
    try:
        for j, (s, t, p) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = t, p, 1, s, 1
        batch.n_tokens = len(entries)
        llm.announce_batch(batch, generated=generated)
    finally:
        llama_cpp.llama_batch_free(batch)


def test_grouping_contexts_refuse_batches_whose_order_is_not_kept(qwen3, qwen35):
    for llm in (open_llm(qwen3, context_overrides={"n_seq_max": 3, "kv_unified": False}),
                open_llm(qwen35, context_overrides={"n_seq_max": 3})):
        # chunks of different lengths: split_equal takes one token of each per micro-batch first
        with pytest.raises(ValueError, match="different numbers of tokens"):
            _with_batch(llm, [(0, 1, 0), (0, 2, 1), (1, 3, 0)])
        # one sequence in two runs
        with pytest.raises(ValueError, match="not consecutive"):
            _with_batch(llm, [(0, 1, 0), (1, 2, 0), (0, 3, 1), (1, 4, 1)])
        # one token per sequence, ids not increasing: split_equal(sequential) reorders
        with pytest.raises(ValueError, match="increasing"):
            _with_batch(llm, [(2, 1, 0), (0, 2, 0), (1, 3, 0)])
        with pytest.raises(ValueError, match="increasing"):
            _with_batch(llm, [(1, 1, 0), (1, 2, 1), (0, 3, 0), (0, 4, 1)])
        _with_batch(llm, [(0, 1, 0), (1, 2, 0), (2, 3, 0)])  # allowed
        _with_batch(llm, [(0, 1, 0), (0, 2, 1), (1, 3, 0), (1, 4, 1), (2, 5, 0), (2, 6, 1)])  # equal chunks
        _with_batch(llm, [(1, 1, 0), (1, 2, 1)])  # one sequence: always in order
    # equal chunks spanning two micro-batches: split_equal would take part of each sequence per micro-batch
    llm = open_llm(qwen35, n_batch=32, context_overrides={"n_seq_max": 3, "n_ubatch": 4})
    with pytest.raises(ValueError, match="more than one micro-batch"):
        _with_batch(llm, [(0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 4, 0), (1, 5, 1), (1, 6, 2)])
    _with_batch(llm, [(0, 1, 0), (0, 2, 1), (1, 4, 0), (1, 5, 1)])
    _with_batch(llm, [(0, 1, 0), (1, 2, 0), (2, 3, 0)])  # one token each: any number of micro-batches


# ---------------------------------------------------------------------------------------------
# qwen35: hybrid recurrent memory


@pytest.mark.parametrize("model,kv_unified,order", [("qwen35", False, None), ("qwen35", True, [2, 0, 1]),
                                                    ("qwen3", False, None)])
def test_generation_steps_on_grouping_contexts_equal_each_alone(request, sae, model, kv_unified, order):
    """On qwen35 the prompts (of different lengths) go one per decode (llama.cpp's split_equal
    would interleave a prompt with a shorter one), and every generation step decodes one token of each sequence together:
    in batch order, as saehook_llama.h argues from split_equal. With kv_unified the split is
    non-sequential, so any order of sequence ids is kept too. qwen3 with one KV stream per
    sequence splits with split_equal(sequential) as well."""
    n = 3
    path = request.getfixturevalue(model)
    sts = steerings(sae, n, layer=1)
    prompts = PROMPTS[:n]
    solo = open_llm(path)
    llm = open_llm(path, context_overrides={"n_seq_max": n, "kv_unified": kv_unified})
    assert llm._rows_may_be_grouped_by_sequence()
    before = llm.encode_count
    out, recs, decodes = batched(llm, prompts, sts, sae, order=order, prompts_together=False)
    assert decodes == n + N_GEN - 1
    assert llm.encode_count - before == decodes  # one encode per decode at layer 1
    assert_same_as_alone(solo, prompts, sts, sae, out, recs)


@pytest.mark.parametrize("model,kv_unified", [("qwen35", True), ("qwen35", False), ("qwen3", False)])
def test_equal_prompt_chunks_together_on_grouping_contexts_equal_each_alone(request, sae, model, kv_unified):
    """Prompts of the same length in ONE decode (one run of tokens per sequence, one micro-batch):
    split_equal takes every run whole, in batch order, so the hook maps every row, and each
    sequence equals its solo run, prompt rows included."""
    n = 3
    path = request.getfixturevalue(model)
    sts = steerings(sae, n, layer=1)
    prompts = [p[:6] for p in PROMPTS[:n]]
    solo = open_llm(path)
    llm = open_llm(path, context_overrides={"n_seq_max": n, "kv_unified": kv_unified})
    assert llm._rows_may_be_grouped_by_sequence()
    before = llm.encode_count
    out, recs, decodes = batched(llm, prompts, sts, sae, prompts_together=True)
    assert decodes == N_GEN  # the prompts together, then N_GEN - 1 steps
    assert llm.encode_count - before == decodes
    assert_same_as_alone(solo, prompts, sts, sae, out, recs)


def test_the_refused_batches_would_be_mislabelled(qwen35, sae, monkeypatch):
    """Why announce refuses them: with the check bypassed, llama.cpp computes the rows of these
    batches out of batch order on the hybrid model, and the sequences no longer equal their
    solo runs (if llama.cpp ever keeps their order, this test says the refusal can go)."""
    n = 3
    sts = steerings(sae, n, layer=1)
    prompts = PROMPTS[:n]
    solo = open_llm(qwen35)
    monkeypatch.setattr(HookedLlama, "_check_row_order", lambda self, seqs: None)
    equal = [p[:6] for p in prompts]
    # ids not increasing (sequential split); prompts of different lengths together; equal prompts
    # together over two micro-batches (18 rows, n_ubatch 8)
    for kv_unified, order, ps, n_ubatch in ((False, [0, 2, 1], None, 64), (True, None, prompts, 64),
                                            (True, None, equal, 8)):
        llm = open_llm(qwen35, context_overrides={"n_seq_max": n, "kv_unified": kv_unified, "n_ubatch": n_ubatch})
        out, recs, _ = batched(llm, ps or prompts, sts, sae, order=order, prompts_together=ps is not None)
        with pytest.raises(AssertionError):
            assert_same_as_alone(solo, ps or prompts, sts, sae, out, recs)


def test_kv_layout_benchmark_counts_the_micro_batches_of_a_step(qwen3):
    """bench/bench_kv_layout.py (README "Serve", why the server keeps one unified cache): with one
    KV stream per sequence llama.cpp cuts a step of sequences [0, 2, 3] into one micro-batch per
    run of consecutive ids ([0], [2, 3]); the unified cache takes it in one."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_kv_layout.py")
    r = subprocess.run([sys.executable, script, "--model", str(qwen3), "--parallel", "4", "--seqs", "0,2,3",
                        "--context", "8", "--steps", "2", "--rounds", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines() if "ms per step" in line}
    assert len(rows) == 4, r.stdout
    for name, line in rows.items():
        want = 1 if name.startswith("unified") else 2
        assert f"micro-batches per step {want} " in line, line
