"""The generation loop of `saehook serve`: continuous batching over llama.cpp sequences, each
with its own SAE steering, feature capture and sampler.

One worker thread owns the model. Every step it
  1. admits waiting requests into free slots (one llama.cpp sequence each, up to --parallel),
     reusing a slot's cached prefix when its tokens *and the steering they were evaluated
     under* match the new prompt (protocol.token_key); a recurrent/hybrid model's state cannot
     be cut back, so there a prefix is reused whole or from the slot's checkpoint, the state
     CHECKPOINT_TAIL tokens before the end of the last prompt it evaluated (as llama-server);
     with one KV stream per sequence a request runs next to the running ones, a longer cached
     prefix elsewhere copied over (_choose_slot);
  2. builds one batch: the pending token of every generating request, then prompt chunks of
     newly admitted ones up to n_batch tokens (so running streams keep flowing while a long
     prompt is processed);
  3. decodes it: mode "batched" (transformer models on the unified cache) puts the whole step in
     one llama_decode; mode "split" (one KV stream per sequence, the default layout on
     transformer models, and recurrent/hybrid models such as qwen35: llama.cpp groups a micro-batch's rows by
     sequence) decodes the one-token segments of all sequences together, and the prompt
     chunks together in further llama_decodes, every chunk of one decode of the same length (the
     prompt with the fewest tokens left sets it; the others go on in the next one): the only multi-sequence
     batches whose rows the hook can map exactly (HookedLlama.announce refuses the others). That
     costs no extra pass over the weights: llama.cpp's split_equal cuts a shared batch into the
     same micro-batches (one token per sequence, then equal parts of the prompts). Mode
     "sequential" decodes every sequence alone (for comparison);
  4. reads each sequence's captured features, samples each sequence's next token with its own
     llama.cpp sampler chain, and hands tokens to the HTTP side through `Job.emit`.

A generated token's features come from the decode that evaluates it, one step after it was
sampled; a request that asked for features gets its last token evaluated once more at the end
(llama.cpp never evaluates the last sampled token otherwise), so every token has its entry.
Steering and capture are per sequence (HookedLlama.hook_sequence): entries at one layer with the
same SAE share one encode per micro-batch, so 8 requests with 8 different clamps cost one encode
per step.
"""
from __future__ import annotations

import codecs
import collections
import ctypes
import itertools
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

import llama_cpp

from .protocol import APIError, GenerationRequest, token_key


@dataclass
class TokenInfo:
    """One generated token as the HTTP side sees it."""

    id: int
    position: int
    text: str                      # the text this token releases (may be "" while a stop string is possible)
    piece: bytes                   # the token's own bytes
    logprob: Optional[Tuple[float, List[Tuple[int, float]]]] = None  # (logprob, [(id, logprob)] alternatives)
    features: Optional[Dict[str, Any]] = None


_job_ids = itertools.count(1)


@dataclass
class Job:
    """A request in the scheduler. `emit(kind, payload)` is called from the worker thread with
    ("prompt_features", [entries]), ("token", TokenInfo), ("done", {finish_reason, usage}) or
    ("error", APIError)."""

    req: GenerationRequest
    prompt: List[int]
    emit: Callable[[str, Any], None]
    id: int = field(default_factory=lambda: next(_job_ids))
    cancelled: bool = False
    # --- worker state ---
    slot: Optional["_Slot"] = None
    n_cached: int = 0
    n_past: int = 0                      # tokens of this sequence in the KV cache
    generated: List[int] = field(default_factory=list)
    pending: List[TokenInfo] = field(default_factory=list)   # sampled, waiting for their features
    to_eval: Optional[int] = None        # the sampled token the next decode evaluates
    finishing: Optional[str] = None      # finish reason once decided (last token may still need its eval)
    sampler: Any = None
    seq_hook: Any = None
    prompt_rows: List[Dict[str, Any]] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    decoder: Any = None
    t_start: float = 0.0

    def cancel(self) -> None:
        """Called by the HTTP side (any thread) when the client went away."""
        self.cancelled = True


# Recurrent/hybrid models: the state a prompt leaves this many tokens before its end is kept (as
# llama-server's context checkpoints do), so that a later prompt sharing all but its last few
# tokens (a regenerated answer, an edited last message) restarts there instead of at token 0.
CHECKPOINT_TAIL = 4

# One KV stream per sequence: a longer cached prefix on a slot away from the running sequences is
# copied to the slot the request runs on when it saves at least this many prompt tokens, and at
# least what the copy costs in tokens (Scheduler._copy_pays).
STREAM_COPY_MIN_TOKENS = 4
# The copy moves a whole stream (n_ctx cells, read and written) while a prompt token costs about
# 2 x n_params FLOPs: a CPU does about this many FLOPs per byte of memory traffic (2-core Zen 4:
# ~470 GFLOP/s of bf16 products against 30-60 GB/s; a GPU's ratio is higher, so this errs on the
# side of recomputing there).
FLOPS_PER_BYTE = 10.0


@dataclass
class _Checkpoint:
    """A recurrent/hybrid sequence's recurrent state after its first n tokens (the attention KV
    of those tokens stays in the cache and is cut back to them on restore)."""

    n: int
    data: Any   # ctypes uint8 array from llama_state_seq_get_data_ext(..., PARTIAL_ONLY)
    size: int


@dataclass
class _Slot:
    seq: int
    tokens: List[int] = field(default_factory=list)     # what this sequence's KV holds
    keys: List[Tuple] = field(default_factory=list)     # the steering each of those tokens was evaluated under
    job: Optional[Job] = None
    last_used: float = 0.0
    checkpoint: Optional[_Checkpoint] = None            # recurrent models: state after tokens[:checkpoint.n]


class _Pad:
    """A padding segment's stand-in for a Job (Scheduler._fill_gaps): an idle slot's sequence,
    one token at the end of what its KV holds, removed again after the decode."""

    req = None
    seq_hook = None

    def __init__(self, slot: _Slot):
        self.slot, self.n_past = slot, len(slot.tokens)


class QueueFull(APIError):
    def __init__(self, n: int):
        super().__init__(503, f"the server is busy: {n} requests are already waiting (--queue); retry later",
                         code="queue_full")


class Scheduler:
    """Runs requests on a HookedLlama built with n_seq_max >= parallel, and kv_unified=True or
    one KV stream per sequence (load_server's kv_layout "streams", split mode)."""

    def __init__(self, llm, *, parallel: int, n_ctx: int, n_batch: int, queue_size: int = 64,
                 mode: str = "auto"):
        self.llm = llm
        self.parallel, self.n_ctx, self.n_batch, self.queue_size = int(parallel), int(n_ctx), int(n_batch), queue_size
        self.ctx = llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llm.n_vocab()
        model = llm._model.model
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self.token_flops = 2.0 * llama_cpp.llama_model_n_params(model)  # what a prompt token costs (_copy_pays)
        # One KV stream per sequence (kv_layout "streams"): llama.cpp groups a micro-batch's rows
        # by sequence and takes only consecutive sequence ids into one (split_equal, sequential).
        self.streams = llm.context_params.n_seq_max > 1 and not llm.context_params.kv_unified
        if self.streams and self.recurrent:
            raise ValueError("--kv-layout streams is for transformer models; a recurrent/hybrid model (such as "
                             "qwen35) keeps its per-sequence state in any layout: use --kv-layout unified")
        if mode == "auto":  # see the module docstring and README "Serve" for the split mode
            mode = "split" if self.recurrent or self.streams else "batched"
        if mode not in ("batched", "split", "sequential"):
            raise ValueError(f"unknown decode mode {mode!r} (auto, batched, split, sequential)")
        if mode == "batched" and (self.recurrent or self.streams):
            raise ValueError("batched decoding of prompt chunks next to other sequences is not exact on a recurrent/"
                             "hybrid model or with one KV stream per sequence (llama.cpp groups the rows by "
                             "sequence): use split or sequential")
        self._mode = mode
        self.slots = [_Slot(seq=i) for i in range(self.parallel)]
        self.waiting: Deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(self.ctx))
        self.steps = 0      # scheduler steps
        self.decodes = 0    # llama_decode calls (one per step in batched mode)
        self.stream_copies = 0  # streams: cached prefixes copied between slots (_choose_slot)
        self.encodes_per_decode: Dict[int, int] = {}  # SAE encodes in one decode -> how many decodes
        # decodes of generated tokens only (no prompt chunk) and the hook's time in them: what a
        # steered decode step costs (bench_serve)
        self.generation_decodes, self.generation_hook_seconds = 0, 0.0
        self.thread = threading.Thread(target=self._run, name="saehook-scheduler", daemon=True)
        self.thread.start()

    @property
    def mode(self) -> str:
        return self._mode

    # ---- HTTP side ----
    def submit(self, job: Job) -> None:
        with self.cv:
            if self.stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            busy = sum(s.job is not None for s in self.slots)
            if busy >= self.parallel and len(self.waiting) >= self.queue_size:
                raise QueueFull(len(self.waiting))
            self.waiting.append(job)
            self.cv.notify()

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def stats(self) -> Dict[str, Any]:
        with self.cv:
            return {"mode": self.mode, "parallel": self.parallel, "active": sum(s.job is not None for s in self.slots),
                    "waiting": len(self.waiting), "steps": self.steps, "decodes": self.decodes,
                    "encodes": self.llm.encode_count, "encodes_per_decode": dict(self.encodes_per_decode),
                    "hook_seconds": self.llm.hook_seconds, "generation_decodes": self.generation_decodes,
                    "generation_hook_seconds": self.generation_hook_seconds,
                    "stream_copies": self.stream_copies}

    def close(self) -> None:
        """Stops after the running requests (the HTTP server drains them first)."""
        with self.cv:
            self.stopping = True
            for j in self.waiting:
                j.cancelled = True
            self.cv.notify()
        self.thread.join(timeout=30)
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    # ---- worker ----
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not any(s.job for s in self.slots):
                    self.cv.wait()
                if self.stopping and not any(s.job for s in self.slots):
                    for j in self.waiting:
                        j.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
                    self.waiting.clear()
                    return
            try:
                self._admit()
                self._step()
            except Exception as e:  # a failed decode: fail the running requests, keep serving
                traceback.print_exc()
                for s in self.slots:
                    if s.job is not None:
                        s.job.emit("error", APIError(500, f"generation failed: {e}", code="internal_error"))
                        self._release(s, keep_cache=False)

    def _admit(self) -> None:
        while True:
            with self.cv:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                free = [s for s in self.slots if s.job is None]
                if not self.waiting or not free:
                    return
                job = self.waiting.popleft()
            try:
                self._start(job, free)
            except APIError as e:
                job.emit("error", e)
            except Exception as e:
                traceback.print_exc()
                job.emit("error", APIError(500, f"cannot start the request: {e}", code="internal_error"))

    def _reusable(self, slot: _Slot, job: Job) -> int:
        """Tokens of the slot's KV the job may keep: the longest prefix with the same tokens and
        the same steering per token; none when the job asked for its prompt's features (those
        rows must be evaluated); never the last prompt token (its logits are needed)."""
        f = job.req.features
        if f is not None and f.prompt:
            return 0
        key = token_key(job.req.steer_groups, False)
        n = 0
        limit = min(len(slot.tokens), len(job.prompt) - 1)
        while n < limit and slot.tokens[n] == job.prompt[n] and slot.keys[n] == key:
            n += 1
        if self.recurrent and n < len(slot.tokens):
            # recurrent state cannot be rolled back, only restored from the slot's checkpoint
            cp = slot.checkpoint
            return cp.n if cp is not None and cp.n <= n else 0
        return n

    def _cut(self, slot: _Slot, n: int) -> int:
        """Cuts the slot's sequence back to its first n tokens (a recurrent model's state comes
        from the checkpoint at n); returns the tokens kept (0 when that fails: the sequence is
        cleared)."""
        ok = True
        if n > 0 and self.recurrent:
            cp = slot.checkpoint
            ok = (cp is not None and cp.n == n and llama_cpp.llama_state_seq_set_data_ext(
                self.ctx, cp.data, cp.size, slot.seq, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == cp.size)
        if not (ok and llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, n, -1)):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            n = 0
        del slot.tokens[n:], slot.keys[n:]
        if slot.checkpoint is not None and slot.checkpoint.n > n:
            slot.checkpoint = None
        return n

    def _save_checkpoint(self, slot: _Slot) -> None:
        """Keeps the recurrent state after the slot's tokens so far (one checkpoint per slot; its
        buffer is reused: the state of one sequence has the same size every time)."""
        flag = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, slot.seq, flag)
        cp = slot.checkpoint
        data = cp.data if cp is not None and len(cp.data) == size else (ctypes.c_uint8 * size)()
        slot.checkpoint = None
        if size and llama_cpp.llama_state_seq_get_data_ext(self.ctx, data, size, slot.seq, flag) == size:
            slot.checkpoint = _Checkpoint(n=len(slot.tokens), data=data, size=size)

    def _choose_slot(self, job: Job, free: List[_Slot]) -> Tuple[_Slot, Optional[_Slot]]:
        """The free slot the job runs on, and the slot whose stream to copy into it first (or None).
        Unified cache: the slot with the longest reusable prefix (then the least recently used).
        Streams: a slot that keeps the running sequence ids together (a hole between them or a
        neighbour), since every idle slot between them costs a padding row per step (_fill_gaps);
        when another free slot holds a longer reusable prefix, its stream is copied over where
        that costs less than reading the extra tokens (_copy_pays: llama.cpp copies a whole
        stream between streams)."""
        rank = lambda s: (self._reusable(s, job), -s.last_used)  # noqa: E731
        best = max(free, key=rank)
        running = [s.seq for s in self.slots if s.job is not None]
        if not self.streams or not running:
            return best, None
        lo, hi = min(running), max(running)
        near = [s for s in free if lo - 1 <= s.seq <= hi + 1]
        slot = max(near, key=lambda s: (self._reusable(s, job), lo < s.seq < hi, -s.last_used))
        gain = self._reusable(best, job) - self._reusable(slot, job)
        return slot, (best if self._copy_pays(best, gain) else None)

    def _copy_pays(self, src: _Slot, gain: int) -> bool:
        """Whether copying src's stream (all n_ctx cells, 2 x their bytes of traffic) costs less
        than evaluating `gain` prompt tokens (2 x n_params FLOPs each, FLOPS_PER_BYTE): a small
        model with a long context recomputes a short prefix instead."""
        if gain < STREAM_COPY_MIN_TOKENS or not src.tokens:
            return False
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, src.seq, 0)  # counts, copies nothing
        copy_bytes = 2.0 * size / len(src.tokens) * self.n_ctx
        return gain * self.token_flops >= copy_bytes * FLOPS_PER_BYTE

    def _copy_stream(self, src: _Slot, dst: _Slot) -> None:
        """dst's stream becomes a copy of src's (the data moves at the next llama_decode)."""
        llama_cpp.llama_memory_seq_rm(self.mem, dst.seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, src.seq, dst.seq, -1, -1)
        dst.tokens, dst.keys = list(src.tokens), list(src.keys)
        self.stream_copies += 1

    def _start(self, job: Job, free: List[_Slot]) -> None:
        slot, source = self._choose_slot(job, free)
        f = job.req.features
        if job.req.steerings or f is not None:  # first: if it fails, nothing is held
            job.seq_hook = self.llm.hook_sequence(slot.seq, steerings=job.req.steerings,
                                                  capture=None if f is None else {f.layer: f.sae})
        if source is not None:
            self._copy_stream(source, slot)
        n = self._reusable(slot, job)
        if n < len(slot.tokens):
            n = self._cut(slot, n)
        job.slot, job.n_cached, job.n_past = slot, n, n
        job.t_start = time.monotonic()
        job.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        job.sampler = self._sampler(job.req)
        slot.job = job

    def _sampler(self, req: GenerationRequest):
        p = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(p)
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if req.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if req.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(req.temperature))
            seed = random.getrandbits(32) if req.seed is None else req.seed & 0xFFFFFFFF
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _release(self, slot: _Slot, *, keep_cache: bool = True) -> None:
        job = slot.job
        if job is None:
            return
        if job.seq_hook is not None:
            job.seq_hook.close()
            job.seq_hook = None
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        if not keep_cache:
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            slot.tokens, slot.keys, slot.checkpoint = [], [], None
        slot.job = None
        slot.last_used = time.monotonic()

    # ---- one step ----
    def _chunk_end(self, job: Job, start: int, budget: int) -> int:
        """Where a prompt chunk of the job from `start` ends with `budget` tokens: at the prompt's
        checkpoint (recurrent models: CHECKPOINT_TAIL tokens before its end), if that is ahead."""
        end = min(len(job.prompt), start + budget)
        cp = len(job.prompt) - CHECKPOINT_TAIL
        return min(end, cp) if self.recurrent and cp > start else end

    Segment = Tuple[Job, List[int], bool, bool]

    def _plan(self) -> List[List[Segment]]:
        """This step's decodes, each a list of (job, tokens, generated, wants_logits) segments:
        every generating job's pending token, then prompt chunks in admission order while n_batch
        allows. Mode batched: all in one decode; split: the pending tokens in one (by sequence id),
        then the prompts in equal chunks (_equal_chunks); sequential: one decode per segment."""
        gen: List[Scheduler.Segment] = []
        budget = self.n_batch
        jobs = [s.job for s in self.slots if s.job is not None]
        jobs.sort(key=lambda j: j.id)
        for j in jobs:
            if j.to_eval is not None:
                gen.append((j, [j.to_eval], True, j.finishing is None))  # a finishing job: features only
                budget -= 1
        prompts = [j for j in jobs if j.to_eval is None and j.finishing is None and j.n_past < len(j.prompt)]
        if self._mode == "split":
            by_seq = lambda g: sorted(g, key=lambda sg: sg[0].slot.seq)  # noqa: E731
            return [by_seq(g) for g in [self._fill_gaps(gen)] + self._equal_chunks(prompts, budget) if g]
        segs = gen
        for j in prompts:
            if budget <= 0:
                break
            chunk = j.prompt[j.n_past: self._chunk_end(j, j.n_past, budget)]
            segs.append((j, chunk, False, j.n_past + len(chunk) == len(j.prompt)))
            budget -= len(chunk)
        if not segs:
            return []
        return [segs] if self._mode == "batched" else [[sg] for sg in segs]

    def _fill_gaps(self, gen: List[Segment]) -> List[Segment]:
        """Streams: a step's pending tokens are one micro-batch only if their sequence ids are
        consecutive (llama.cpp's sequential split_equal cuts [0, 1, 3] into [0, 1] and [3]: two
        passes over the weights, two SAE encodes). An idle slot between them (no request; its
        cached prefix kept) gets a padding token, evaluated with the others and removed from its
        KV right after (_decode): one row more instead of one pass more. A slot whose request is
        reading its prompt is not padded (its capture would see the row); that step is cut."""
        if not self.streams or len(gen) < 2:
            return gen
        seqs = {sg[0].slot.seq for sg in gen}
        pads = [(_Pad(s), [s.tokens[-1] if s.tokens else 0], False, False) for s in self.slots
                if min(seqs) < s.seq < max(seqs) and s.seq not in seqs and s.job is None
                and len(s.tokens) < self.n_ctx]  # a full stream has no cell for it: that step is cut
        return gen + pads

    def _equal_chunks(self, prompts: List[Job], budget: int) -> List[List[Segment]]:
        """Split mode: the prompts being read, as decodes of the same number of tokens of every
        prompt in them, all in one micro-batch: the one multi-sequence batch of prompt chunks whose
        rows llama.cpp keeps in batch order on a recurrent/hybrid model (split_equal takes the same
        number of tokens of every sequence per micro-batch: HookedLlama._check_row_order). As
        split_equal cuts a shared batch: the prompt with the fewest tokens left (to its end or its
        checkpoint) sets the length, the others go on in the next decode of the step, so N
        prompts arriving together cost one pass over the weights (and one SAE encode) per chunk,
        not N, and a long prompt keeps its whole budget next to short ones."""
        groups: List[List[Scheduler.Segment]] = []
        at = {j.id: j.n_past for j in prompts}
        while prompts and budget > 0:
            room = min(budget, self.n_ubatch)
            part = prompts[:room]  # at least one token each
            n = min(min(self._chunk_end(j, at[j.id], room) - at[j.id] for j in part), room // len(part))
            groups.append([(j, j.prompt[at[j.id]: at[j.id] + n], False, at[j.id] + n == len(j.prompt)) for j in part])
            for j in part:
                at[j.id] += n
            budget -= n * len(part)
            prompts = [j for j in prompts if at[j.id] < len(j.prompt)]
        return groups

    def _step(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self._release(s)
        groups = self._plan()
        if not groups:
            return
        self.steps += 1  # counted before any token of this step reaches a client (/health stays consistent)
        for group in groups:
            records = self._decode(group)
            for i, (job, toks, generated, wants) in enumerate(group):
                if isinstance(job, _Pad):  # its token leaves the slot's KV as it was (_fill_gaps)
                    llama_cpp.llama_memory_seq_rm(self.mem, job.slot.seq, job.n_past, -1)
                    continue
                self._after(job, toks, generated, wants, records.get(job.id), group, i)

    def _decode(self, group) -> Dict[int, Any]:
        """One llama_decode of the group's segments; returns each job's captured rows."""
        b = self.batch
        n = 0
        toks, pos, seqs, outs, gens = [], [], [], [], []
        last_layer = self.llm.n_layer - 1
        for job, tokens, generated, wants in group:
            f = job.req.features if job.req is not None else None
            # The last block's output keeps only the rows whose logits are requested: a capture
            # there needs every captured row to be an output.
            all_out = f is not None and f.layer == last_layer and (generated or f.prompt)
            for k, t in enumerate(tokens):
                p = job.n_past + k
                out = all_out or (wants and k == len(tokens) - 1)
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = t, p, 1, job.slot.seq, out
                toks.append(t), pos.append(p), seqs.append(job.slot.seq), outs.append(out), gens.append(generated)
                n += 1
        b.n_tokens = n
        llm = self.llm
        llm.announce(toks, pos, seq_ids=seqs, outputs=outs, generated=gens)
        e0, h0 = llm.encode_count, llm.hook_seconds
        rc = llama_cpp.llama_decode(self.ctx, b)
        self.decodes += 1
        e = llm.encode_count - e0
        if all((generated or isinstance(job, _Pad)) and len(tokens) == 1 for job, tokens, generated, _ in group):
            self.generation_decodes += 1
            self.generation_hook_seconds += llm.hook_seconds - h0
        self.encodes_per_decode[e] = self.encodes_per_decode.get(e, 0) + 1
        if rc != 0:
            llm._reset_queue()
            raise RuntimeError(f"llama_decode returned {rc}" + (" (the KV cache is full)" if rc == 1 else ""))
        llm.raise_hook_error()
        out: Dict[int, Any] = {}
        for job, _, _, _ in group:
            if job.seq_hook is not None and job.req is not None and job.req.features is not None:
                out[job.id] = job.seq_hook.take().get(job.req.features.layer)
        return out

    def _feature_rows(self, job: Job, rec) -> Dict[int, Dict[str, Any]]:
        """position -> {"position", "id", "token", "top"} for the job's rows of one decode."""
        rows = {}
        if rec is None:
            return rows
        top = job.req.features.top
        labels = job.req.features.sae.labels  # read once per SAE; empty when it has no label file
        seq = job.slot.seq
        for r in range(len(rec.tokens)):
            if len(rec.seq_ids) and rec.seq_ids[r] not in (seq, -1):
                continue
            idx, val = rec.indices[r], rec.values[r]
            keep = idx >= 0
            idx, val = idx[keep], val[keep]
            order = np.argsort(-val, kind="stable")[:top]
            tok = int(rec.tokens[r])
            rows[int(rec.positions[r])] = {
                "position": int(rec.positions[r]), "id": tok,
                "token": self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace"),
                "top": [_feature_entry(int(idx[o]), float(val[o]), labels) for o in order]}
        return rows

    def _after(self, job: Job, toks: List[int], generated: bool, wants: bool, rec, group, i: int) -> None:
        slot = job.slot
        key = token_key(job.req.steer_groups, generated)
        slot.tokens.extend(toks)
        slot.keys.extend([key] * len(toks))
        job.n_past += len(toks)
        if not generated and self.recurrent and job.n_past == len(job.prompt) - CHECKPOINT_TAIL:
            self._save_checkpoint(slot)
        feats = self._feature_rows(job, rec) if job.req.features is not None else {}
        if not generated:
            if job.req.features is not None and job.req.features.prompt:
                job.prompt_rows.extend(feats[p] for p in sorted(feats))
            if job.n_past == len(job.prompt) and job.prompt_rows:
                job.emit("prompt_features", job.prompt_rows)
        else:
            job.to_eval = None
            for t in job.pending:  # the token just evaluated
                if t.features is None and t.position in feats:
                    t.features = feats[t.position]
        self._release_ready(job)
        if job.finishing is not None:
            if job.to_eval is None and not job.pending:
                self._finish(job)
            return
        if not wants:
            return
        # The batch index of this segment's output row (its last token).
        idx = sum(len(s[1]) for s in group[:i]) + len(toks) - 1
        self._sample(job, idx)

    def _sample(self, job: Job, idx: int) -> None:
        logprob = None
        if job.req.logprobs is not None:
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, idx)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        tok = int(llama_cpp.llama_sampler_sample(job.sampler, self.ctx, idx))
        if job.req.logprobs is not None:
            m = logits.max()
            lp = logits - (m + np.log(np.exp(logits - m).sum()))
            n = job.req.logprobs
            alts = []
            if n:  # the n most likely tokens, without sorting the whole vocabulary
                part = np.argpartition(-lp, n - 1)[:n]
                alts = part[np.argsort(-lp[part], kind="stable")]
            logprob = (float(lp[tok]), [(int(a), float(lp[a])) for a in alts])
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok) and not job.req.ignore_eos:
            self._decide(job, "stop")
            return
        job.generated.append(tok)
        piece = self.llm.detokenize([tok])
        job.text += job.decoder.decode(piece)
        info = TokenInfo(id=tok, position=job.n_past, text="", piece=piece, logprob=logprob)
        reason = None
        stops = job.req.stop
        hit = min((p for p in (job.text.find(s) for s in stops) if p >= 0), default=-1)
        if hit >= 0:
            job.text = job.text[:hit]
            job.decoder = None  # what follows the stop string is dropped, incomplete bytes too
            reason = "stop"
            safe = hit
        else:
            hold = 0
            for s in stops:  # keep back a tail that may begin a stop string
                for h in range(min(len(s) - 1, len(job.text)), 0, -1):
                    if job.text.endswith(s[:h]):
                        hold = max(hold, h)
                        break
            safe = len(job.text) - hold
        if safe > job.sent:
            info.text = job.text[job.sent:safe]
            job.sent = safe
        if reason is None:
            if job.req.max_tokens is not None and len(job.generated) >= job.req.max_tokens:
                reason = "length"
            elif job.n_past + 1 >= self.n_ctx:  # no room to evaluate another token
                reason = "length"
        job.pending.append(info)
        if job.req.features is not None:
            job.to_eval = tok  # its features come from its evaluation, next step
        elif reason is None:
            job.to_eval = tok
        if reason is not None:
            self._decide(job, reason)
        else:
            self._release_ready(job)

    def _decide(self, job: Job, reason: str) -> None:
        job.finishing = reason
        if job.decoder is not None:  # bytes of an unfinished UTF-8 character: U+FFFD, as the decoder does
            job.text += job.decoder.decode(b"", final=True)
            job.decoder = None
        # Text held back for a possible stop string that never came is released at the end.
        if job.sent < len(job.text) and job.pending:
            job.pending[-1].text += job.text[job.sent:]
            job.sent = len(job.text)
        elif job.sent < len(job.text):
            job.emit("token", TokenInfo(id=-1, position=-1, text=job.text[job.sent:], piece=b""))
            job.sent = len(job.text)
        self._release_ready(job)
        if job.to_eval is None and not job.pending:
            self._finish(job)

    def _release_ready(self, job: Job) -> None:
        wants_features = job.req.features is not None
        while job.pending and (not wants_features or job.pending[0].features is not None):
            job.emit("token", job.pending.pop(0))

    def _finish(self, job: Job) -> None:
        slot = job.slot
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.generated),
                 "total_tokens": len(job.prompt) + len(job.generated),
                 "prompt_tokens_details": {"cached_tokens": job.n_cached}}
        self._release(slot)
        job.emit("done", {"finish_reason": job.finishing, "usage": usage})


def _feature_entry(feature: int, value: float, labels) -> Dict[str, Any]:
    """{"feature", "value"} plus "label" when the SAE's label store names the feature."""
    entry: Dict[str, Any] = {"feature": feature, "value": value}
    label = labels.label(feature) if len(labels) else None
    if label:
        entry["label"] = label
    return entry
