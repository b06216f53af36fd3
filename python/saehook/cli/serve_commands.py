"""`saehook serve`: an OpenAI-compatible server with per-request SAE steering (README "Serve")."""
from __future__ import annotations

import os
import sys

from ..sae import PREFILTER_MODES


def sae_specs(specs):
    """--sae [NAME=]PATH ... -> {name: path}; the name defaults to the file or folder name."""
    out = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = os.path.splitext(os.path.basename(spec.rstrip("/")))[0], spec
        if not name:
            raise ValueError(f"--sae {spec!r}: empty name")
        if name in out:
            raise ValueError(f"--sae {spec!r}: the name {name!r} is given twice (use NAME=PATH)")
        out[name] = path
    return out


def port_free(host: str, port: int) -> None:
    """Raises OSError naming host:port when a server can't bind there: said before the model
    loads, and before a startup line names the address. Binds as uvicorn's server does (asyncio's
    create_server): every address the host resolves to, SO_REUSEADDR on, IPv6 ones v6-only."""
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, addr in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): another server has it? choose "
                              "another --port") from None


def cmd_serve(args) -> int:
    try:
        from ..serve import Limits, load_server, run
    except ImportError as e:
        print(f"saehook serve needs the serve extra: pip install 'saehook[serve]' ({e})", file=sys.stderr)
        return 2
    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"{args.model}: no such model file")
    limits = Limits(max_body_bytes=args.max_body, max_tokens=args.max_tokens, max_steer_ops=args.max_steer_ops,
                    max_top=args.max_top)
    if args.ray is not None:  # N replicas of this server behind one endpoint (serve/ray_serve.py)
        from ..serve.ray_serve import run_on_ray

        print(f"saehook serve: {args.replicas} Ray Serve replicas of {args.model}; http://{args.host}:{args.port}/v1",
              file=sys.stderr, flush=True)
        run_on_ray(args.model, sae_specs(args.sae), replicas=args.replicas, address=args.ray or None, host=args.host,
                   port=args.port, num_cpus=args.threads or 1, parallel=args.parallel, n_ctx=args.n_ctx,
                   n_batch=args.n_batch, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                   chat_format=args.chat_format, api_key=args.api_key or os.environ.get("SAEHOOK_API_KEY"),
                   limits=limits, queue_size=args.queue, decode=args.decode, model_name=args.model_name, k=args.k,
                   flash_attn=args.flash_attn, prefilter=args.prefilter, kv_layout=args.kv_layout)
        return 0
    port_free(args.host, args.port)  # before the model loads: a taken port is said at once
    state = load_server(args.model, sae_specs(args.sae), parallel=args.parallel, n_ctx=args.n_ctx,
                        n_batch=args.n_batch, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                        chat_format=args.chat_format, api_key=args.api_key or os.environ.get("SAEHOOK_API_KEY"),
                        limits=limits, queue_size=args.queue, decode=args.decode, model_name=args.model_name,
                        k=args.k, flash_attn=args.flash_attn, prefilter=args.prefilter, kv_layout=args.kv_layout)
    saes = state.registry.saes
    pre = [n for n, s in saes.items() if s.prefilter]
    pre_bytes = sum(saes[n].prefilter_stats()["bytes"] for n in pre)
    pre = (f"; bf16 prefilter on {', '.join(pre)} (+{pre_bytes / 2**20:.3g} MiB; --prefilter off to save it)"
           if pre else "")
    print(f"saehook serve: {args.model} with {len(saes)} SAE(s) ({', '.join(saes) or 'none'}{pre}); "
          f"{args.parallel} sequences, {state.scheduler.mode} decoding; http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    run(state, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server with per-request SAE steering and features",
                       description="Serves MODEL.gguf at /v1/chat/completions, /v1/completions and /v1/models; each "
                       "request may carry a `saehook` object with `steer` operations and a `features` capture "
                       "(README \"Serve\"). GET /v1/saehook/saes lists the SAEs.")
    s.add_argument("model", metavar="MODEL.gguf", help="the GGUF model file")
    s.add_argument("--sae", action="append", metavar="[NAME=]PATH",
                   help="an SAE file to offer under NAME (default: the file name); repeat for several")
    s.add_argument("--k", type=int, help="features per token for SAEs whose file does not say (Qwen-Scope)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument("--parallel", type=int, default=4,
                   help="requests generated at once, one llama.cpp sequence each (default 4)")
    s.add_argument("--n-ctx", type=int, default=None,
                   help="context per request, prompt plus generated tokens; the KV cache holds "
                   "n_ctx x parallel tokens (default 4096, or the model's training context when shorter)")
    s.add_argument("--n-batch", type=int, default=512,
                   help="tokens per llama_decode: pending tokens of running requests plus a chunk of a new prompt "
                   "(default 512)")
    s.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: llama-cpp-python's choice)")
    s.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all; default 0)")
    s.add_argument("--chat-format", help="chat template: default the GGUF's own; chat_template.NAME for another "
                   "template in the GGUF, a Jinja file, or a llama-cpp-python format name (chatml, llama-2, ...)")
    s.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/ (or set SAEHOOK_API_KEY)")
    s.add_argument("--model-name", help="the model id reported by /v1/models (default: the file name)")
    s.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a free sequence; more are answered 503 (default 64)")
    s.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask (default 4096)")
    s.add_argument("--max-steer-ops", type=int, default=64, help="most saehook.steer operations per request "
                   "(default 64)")
    s.add_argument("--max-top", type=int, default=64, help="largest saehook.features.top (default 64)")
    s.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    s.add_argument("--decode", choices=["auto", "batched", "split", "sequential"], default="auto",
                   help="batched: one llama_decode per step for all running requests (auto on transformer "
                   "models); split: the generated tokens of all requests in one llama_decode, the prompt chunks in "
                   "further ones, each of chunks of one length (auto on recurrent/hybrid models such as qwen35, where "
                   "llama.cpp groups rows by sequence); sequential: one llama_decode per request (for comparison)")
    s.add_argument("--flash-attn", choices=["off", "on", "auto"], default="off",
                   help="llama.cpp's flash attention: off (default) keeps each request's output and features "
                   "independent of the other requests in the KV cache, exactly equal to HookedLlama; on/auto "
                   "(llama-server's default) is faster on the CPU, but its f16 tiling moves features slightly "
                   "(about 0.4%% on the demo) with what else is cached")
    s.add_argument("--kv-layout", choices=["auto", "streams", "unified"], default="auto",
                   help="streams: one KV stream per sequence, as llama-server, each token attending over its own "
                   "cells, requests placed next to the running ones; unified: one KV cache for all sequences, every "
                   "token attending over every sequence's cells (idle requests' cached prompts included, the others "
                   "masked), a prompt chunk sharing its step's pass over the weights; auto (default): streams, but "
                   "unified on recurrent/hybrid models (qwen35) and with --decode batched. README \"Serve\" (KV "
                   "layout) has the measured trade-off")
    s.add_argument("--prefilter", choices=PREFILTER_MODES, default="auto",
                   help="encode float32 SAEs through a bf16 copy of W_enc: the same features, in about the bf16 "
                   "encode's time (0.5-0.8x the float32 encode's per steered decode step on a 2-core Zen 4), for "
                   "half of W_enc's bytes more memory (README \"The bf16 prefilter\"). auto (default): for every "
                   "float32 SAE when the hook runs on the CPU (no --n-gpu-layers), while the copies fit in a "
                   "quarter of the available memory; bf16: for every SAE (a "
                   "narrower encoder is refused); off: the float32 encode alone")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    s.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="serve --replicas copies through Ray Serve (its HTTP proxy on --host/--port); ADDRESS as "
                        "ray.init takes it (auto, HOST:PORT), without one $RAY_ADDRESS or a new local cluster")
    s.add_argument("--replicas", type=int, default=2, help="--ray: replicas, each with its own model and SAEs, "
                   "each taking --threads CPUs of the cluster (default 2)")
    s.set_defaults(fn=cmd_serve)
