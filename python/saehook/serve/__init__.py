"""`saehook serve`: an OpenAI-compatible local server with per-request SAE steering and
per-token features (README "Serve").

    from saehook.serve import load_server, run
    state = load_server("model.gguf", {"res": "layer12.sae.pt"}, parallel=4, n_ctx=4096)
    run(state, host="127.0.0.1", port=8080)

Modules: protocol (wire format and errors), scheduler (continuous batching), app (HTTP routes).
Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations

import inspect
import os
import signal
import warnings
from typing import Mapping, Optional

from ..sae import apply_prefilter, check_prefilter_mode
from .protocol import APIError, Limits, SAERegistry


def chat_formatter(llm, chat_format: Optional[str] = None):
    """llama-cpp-python's chat formatter for this model: the GGUF's own template (default), one of
    its named templates (`chat_template.NAME`), a Jinja template file, or a format llama-cpp-python
    registers (e.g. chatml)."""
    from llama_cpp import llama_chat_format as lcf

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
    bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
    templates = {name[len("tokenizer."):]: t for name, t in llm.metadata.items()
                 if name.startswith("tokenizer.chat_template.")}
    if "tokenizer.chat_template" in llm.metadata:
        templates["chat_template.default"] = llm.metadata["tokenizer.chat_template"]
    name = chat_format or "chat_template.default"
    if name in templates:
        return lcf.Jinja2ChatFormatter(template=templates[name], eos_token=eos, bos_token=bos,
                                       stop_token_ids=[eos_id])
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return lcf.Jinja2ChatFormatter(template=f.read(), eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
    if chat_format is None:
        raise ValueError("the GGUF has no chat template (tokenizer.chat_template): pass --chat-format "
                         "(a llama-cpp-python format such as chatml, or a Jinja template file)")
    try:
        handler = lcf.get_chat_completion_handler(name)
    except Exception:
        handler = None
    # llama-cpp-python keeps registered formats only as completion handlers; the formatter is
    # the handler's closure variable (chat_formatter_to_chat_completion_handler).
    fmt = inspect.getclosurevars(handler).nonlocals.get("chat_formatter") if handler else None
    if fmt is None:
        known = sorted(set(templates) | set(lcf.LlamaChatCompletionHandlerRegistry()._chat_handlers))
        raise ValueError(f"unknown --chat-format {name!r}: use a file or one of {', '.join(known)}")
    return fmt


DEFAULT_N_CTX = 4096  # per request, when the model's training context is not shorter


def load_server(model: str, saes: Mapping[str, str], *, parallel: int = 4, n_ctx: Optional[int] = None,
                n_batch: int = 512,
                n_threads: Optional[int] = None, n_gpu_layers: int = 0, chat_format: Optional[str] = None,
                api_key: Optional[str] = None, limits: Limits = Limits(), queue_size: int = 64,
                decode: str = "auto", model_name: Optional[str] = None, k: Optional[int] = None,
                flash_attn: str = "off", prefilter: Optional[str] = "auto", kv_layout: str = "auto"):
    """Loads the model and SAEs and starts the scheduler; returns the ServeState an app serves.
    The KV cache holds n_ctx tokens for each of the `parallel` sequences (kv_layout below).
    n_ctx None: DEFAULT_N_CTX, or the model's training context when that is shorter (as
    llama-server defaults to it); a larger n_ctx is used as given, with a warning. llama.cpp's
    own warnings are off (its errors print): with one unified cache it compares the whole
    cache, n_ctx x parallel, with the training context, and so warned on every correct setup.
    flash_attn: "off" (default), "on", or "auto" (llama-server's default: on where the backend
    has the kernel, as the CPU does). Off keeps every request's result independent of what else
    is in the unified cache: the plain attention path masks other sequences' cells to exact
    zeros, while llama.cpp's flash-attention kernels tile the cache and round in f16 (on the
    demo model, features then differ from HookedLlama.capture of the same tokens by up to 0.4%,
    even with flash attention there too). On is faster on the CPU (fewer graph nodes, so fewer
    thread barriers per decode; README "Serve"). prefilter (saehook.sae.apply_prefilter): "auto"
    (default) gives every SAE with a float32 encoder the bf16 prefilter when the hook encodes on
    the CPU (n_gpu_layers 0) and the copies fit in a quarter of the available memory (warned
    otherwise); "bf16" asks it for every SAE (a narrower encoder is refused); None or "off"
    encodes in float32 alone. The prefilter encodes through a bf16 copy of W_enc
    (SAE.set_prefilter): the same features, in about the bf16 encode's time, for half of W_enc's
    bytes more memory. kv_layout: "streams" (one KV stream per sequence, as llama-server: each
    token attends over its own cells only; transformer models; the scheduler places requests
    next to the running ones and keeps every generation step one micro-batch,
    Scheduler._choose_slot and _fill_gaps), "unified" (one KV cache for all sequences: every
    token attends over every sequence's cells, idle slots' cached prompts included, the others
    masked; a prompt chunk shares its step's pass over the weights; the layout --decode batched
    needs), or "auto" (default): streams, but unified on a recurrent/hybrid model (qwen35),
    whose per-sequence state the scheduler serves in split mode on the unified cache, and with
    decode="batched" (README "Serve", KV layout)."""
    from .. import load
    from ..engines.llama import HookedLlama  # first: it sets GOMP_SPINCOUNT before llama_cpp loads libgomp
    from ..formats import SAESet
    from .app import ServeState
    from .scheduler import Scheduler

    import llama_cpp

    fa_types = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
    if flash_attn not in fa_types:
        raise ValueError(f"flash_attn must be one of {', '.join(fa_types)}, got {flash_attn!r}")
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    check_prefilter_mode(prefilter)  # before the SAEs and the model load
    if kv_layout not in ("auto", "unified", "streams"):
        raise ValueError(f"--kv-layout must be auto, unified or streams, got {kv_layout!r}")
    from ..engines.protocol import default_context, gguf_model_facts, model_keeps_recurrent_state, quiet_llama_log

    n_ctx_train = gguf_model_facts(model)["n_ctx_train"] if os.path.isfile(model) else None
    quiet_llama_log()
    if kv_layout == "auto":
        recurrent = decode != "batched" and os.path.isfile(model) and model_keeps_recurrent_state(model)
        kv_layout = "unified" if decode == "batched" or recurrent else "streams"
    if n_ctx is None:
        n_ctx = default_context(DEFAULT_N_CTX, n_ctx_train)
    elif n_ctx_train and n_ctx > n_ctx_train:
        warnings.warn(f"--n-ctx {n_ctx} is above {os.path.basename(model)}'s training context ({n_ctx_train} "
                      "tokens): requests that run past it may produce garbage", stacklevel=2)
    if n_ctx < 8:
        raise ValueError(f"--n-ctx must be >= 8, got {n_ctx}")
    loaded = {}
    for name, path in saes.items():
        obj = load(path, k=k)
        if isinstance(obj, SAESet):
            raise ValueError(f"--sae {path} holds layers {obj.layers}: pass one layer's file")
        loaded[name] = obj
    # auto: only where the hook encodes on the host (with offloaded layers it runs on the GPU,
    # where a host copy would be memory for nothing)
    _, note = apply_prefilter(loaded, prefilter, on_cpu=n_gpu_layers == 0, name_of=lambda n: f"--sae {n}={saes[n]}")
    if note:
        warnings.warn(note, stacklevel=2)
    kw = {}
    if n_threads is not None:  # llama.cpp's threads and the hook kernels' (they run in turn, never at once)
        kw = {"n_threads": n_threads, "n_threads_batch": n_threads}
        from .. import set_num_threads

        set_num_threads(n_threads)
    llm = HookedLlama(model, n_ctx=n_ctx * parallel, n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers,
                      verbose=False, context_overrides={"n_seq_max": parallel, "kv_unified": kv_layout == "unified",
                                                         "flash_attn_type": fa_types[flash_attn]}, **kw)
    for name, sae in loaded.items():
        if sae.d_model != llm.n_embd_model:
            raise ValueError(f"--sae {name}={saes[name]}: d_model {sae.d_model} does not match the model's "
                             f"n_embd {llm.n_embd_model}")
        if sae.layer is not None and not 0 <= sae.layer < llm.n_layer:
            raise ValueError(f"--sae {name}={saes[name]}: layer {sae.layer} is outside the model "
                             f"({llm.n_layer} layers)")
    fmt = chat_formatter(llm, chat_format) if (chat_format or "tokenizer.chat_template" in llm.metadata) else None
    try:
        sched = Scheduler(llm, parallel=parallel, n_ctx=n_ctx, n_batch=n_batch, queue_size=queue_size, mode=decode)
    except Exception:
        llm.close()
        raise
    return ServeState(llm, sched, SAERegistry(loaded, saes, llm.n_layer),
                      model_name=model_name or os.path.basename(model), chat_formatter=fmt or _no_template,
                      limits=limits, api_key=api_key)


def _no_template(**kw):
    raise APIError(400, "this model has no chat template: use /v1/completions, or restart the server with "
                   "--chat-format", param="messages", code="no_chat_template")


def run(state, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serves until SIGTERM / Ctrl-C; then stops taking requests, lets the running ones finish
    (uvicorn's graceful shutdown) and stops the scheduler."""
    import uvicorn

    from .app import create_app

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn re-raises a captured signal once it has shut down, so the process would die
            # by SIGTERM before the scheduler and model are closed; a drained server exits 0.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)
    server = _Server(config)
    try:
        server.run()
    finally:
        state.scheduler.close()
        state.llm.close()


__all__ = ["APIError", "Limits", "load_server", "run", "chat_formatter"]
