#!/usr/bin/env python
"""Serving benchmark: `saehook serve` next to llama.cpp's llama-server and llama-cpp-python's own
server (`python -m llama_cpp.server`) on the same model, in the same run.

    python bench/bench_serve.py                            # synthetic qwen3 and qwen35, Q4_K_M
    python bench/bench_serve.py --arch qwen3 --hidden 256 --layers 2 --d-sae 1024 --gen-tokens 16 --reqs 2   # smoke

For each model (a random-weight qwen3, and a qwen35 hybrid one, written here and quantized by
llama.cpp) every server is started, then `--rounds` rounds each give every server and scenario,
at each concurrency (1, 4, 8 by default), `--reqs` streamed completions per client, in an order
rotated every round (this VM's speed drifts within minutes: the ratios are taken within a round,
then their median and range printed); reported per server and scenario (medians of the rounds):
aggregate generated tokens/s, time to first token (p50) and inter-token latency (p50, p99). saehook runs unsteered and steered (each
request clamps a different feature: one encode per step serves the whole batch). The targets
(README "Serve"): at concurrency 8 unsteered, >= 0.9x llama-server and >= 3x llama_cpp.server;
steered, the added time per decode step at most the SAE's W_enc read bound + 10%. Next to that
difference of two runs, saehook's rows carry the hook's own time per step as the server timed it
(/health hook_seconds over the run's steps), which the VM's drift between runs does not touch.

Configurations (printed with each server, and kept in the JSON with the machine's load before its
run): llama-server with its defaults (flash attention auto, one KV stream per slot, OpenMP's
default spin-wait) and as llama-server-spin with saehook's GOMP_SPINCOUNT=1000 (the target is
taken against the faster of the two); saehook serve as shipped (flash attention off) and as
saehook-fa with flash attention auto (load_server(flash_attn="auto")).

llama-server is built from the llama.cpp that llama-cpp-python's sdist vendors (--llama-cpp-src,
or the sdist is fetched with `pip download`), once, into --cache; or pass --llama-server BIN.
llama_cpp.server needs llama-cpp-python's server extra (`pip install 'llama-cpp-python[server]'`:
sse-starlette, starlette-context). Every request generates exactly --gen-tokens tokens (ignore_eos; llama_cpp.server, which has no
such option, gets a logit_bias against the end-of-text token).
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_llama import synthetic_model  # noqa: E402  (the qwen3 of bench_llama)


# ---------------------------------------------------------------------------------------------
# a synthetic Qwen3.5 (hybrid: Gated DeltaNet layers and a full-attention layer every 4th)


def synthetic_qwen35(cache: str, hidden: int, layers: int, ffn: int, quant: str) -> str:
    from saehook.demo.gguf_writer import quantize, write_random_qwen35

    os.makedirs(cache, exist_ok=True)
    # -w2: written by saehook.demo.gguf_writer.write_random_qwen35 (the tests' writer); files of
    # the former bench-only writer (other random values, same shapes) are not reused
    name = f"qwen35-h{hidden}-l{layers}-f{ffn}-i{min(4, layers)}-w2"
    out = os.path.join(cache, f"{name}-{quant}.gguf")
    if os.path.exists(out):
        return out
    heads = max(1, hidden // 256)
    f32 = os.path.join(cache, f"{name}-f32.gguf")
    print(f"writing {f32} ...", flush=True)
    write_random_qwen35(f32, hidden=hidden, layers=layers, ffn=ffn, heads=heads, head_dim=256 if hidden >= 256 else 64,
                        kv_heads=max(1, heads // 4), lin_k_heads=max(1, hidden // 128),
                        lin_v_heads=max(2, hidden // 64), lin_head_dim=128 if hidden >= 256 else 32,
                        full_attention_interval=min(4, layers), context_length=4096)
    if quant.lower() == "f32":
        return f32
    print(f"quantizing to {quant} ...", flush=True)
    quantize(f32, out, quant)
    os.remove(f32)
    return out


# ---------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary(args) -> str:
    if args.llama_server:
        return args.llama_server
    build = os.path.join(args.cache, "llama-server-build")
    binary = os.path.join(build, "bin", "llama-server")
    if os.path.exists(binary):
        return binary
    src = args.llama_cpp_src
    if not src:
        import llama_cpp

        ver = llama_cpp.__version__
        d = os.path.join(args.cache, "sdist")
        tars = glob.glob(os.path.join(d, f"llama_cpp_python-{ver}.tar.gz"))
        if not tars:
            subprocess.check_call([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                                   "--no-binary", ":all:", "-d", d])
            tars = glob.glob(os.path.join(d, f"llama_cpp_python-{ver}.tar.gz"))
        with tarfile.open(tars[0]) as t:
            t.extractall(d, filter="data")
        src = os.path.join(d, f"llama_cpp_python-{ver}", "vendor", "llama.cpp")
    print(f"building llama-server from {src} (once) ...", flush=True)
    subprocess.check_call(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
                           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF",
                           "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"])
    subprocess.check_call(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count())])
    return binary


def health_of(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


class Server:
    def __init__(self, name: str, cmd: List[str], port: int, health: str, env: Dict[str, str] = None):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: List[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"{name} exited:\n{''.join(self.log)[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", health)
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{''.join(self.log)[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def machine_load() -> str:
    """The load average and the other processes using CPU right now (the VM is shared)."""
    with open("/proc/loadavg") as f:
        la = " ".join(f.read().split()[:3])
    me = {os.getpid()}
    try:
        out = subprocess.run(["top", "-bn1", "-w", "200"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"load {la}"
    busy = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 12 and f[0].isdigit() and int(f[0]) not in me:
            try:
                cpu = float(f[8])
            except ValueError:
                continue
            if cpu >= 10:
                busy.append(f"{f[11]}(nice {f[3]}, {cpu:.0f}%)")
    return f"load {la}; busy: {', '.join(busy) or 'none'}"


# saehook serve with load_server(flash_attn="auto") (llama-server's attention setting; the CLI
# serves with flash attention off, see README "Serve")
SAEHOOK_FA = ("import json, sys; from saehook.serve import load_server, run; a = json.loads(sys.argv[1]); "
              "run(load_server(a.pop('model'), {'bench': a.pop('sae')}, flash_attn='auto', **a['load']), "
              "host='127.0.0.1', port=a['port'], log_level='warning')")


def stream_completion(port: int, body: dict) -> Dict[str, float]:
    """One streamed /v1/completions: TTFT, the gaps between token chunks, the tokens received."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    times = []
    usage = None
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.splitlines():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"stream error: {obj}")
                if obj.get("usage"):
                    usage = obj["usage"]
                ch = obj.get("choices") or []
                # one chunk per token on all three servers (a token whose bytes end inside a UTF-8
                # character still gets its chunk, with empty text); the last one only says why it ended
                if ch and (ch[0].get("finish_reason") is None or ch[0].get("text")):
                    times.append(time.perf_counter())
    c.close()
    # the generated tokens: the server's own count where it gives one (llama-server sends no chunk
    # for a token that ends inside a UTF-8 character), else one per chunk
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else len(times)
    end = time.perf_counter()
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": list(np.diff(times)), "tokens": tokens,
            "tail": end - times[-1] if times else float("nan"), "end": end}


def load(port: int, concurrency: int, reqs: int, make_body) -> Dict[str, float]:
    """`concurrency` clients, each sending `reqs` requests one after another."""
    results: List[Dict] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def client(i):
        for j in range(reqs):
            try:
                res = stream_completion(port, make_body(i, j))
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)
                return
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_ms": 1e3 * float(np.median([r["ttft"] for r in results])),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)) if itl else float("nan"),
            "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)) if itl else float("nan"),
            # what makes up the wall time (the aggregate rate): the means, and from a stream's last
            # token to its end (the response closing)
            "ttft_mean_ms": 1e3 * float(np.mean([r["ttft"] for r in results])),
            "itl_mean_ms": 1e3 * float(np.mean(itl)) if itl else float("nan"),
            "tail_mean_ms": 1e3 * float(np.mean([r["tail"] for r in results]))}


# llama_cpp.server as `python -m llama_cpp.server` runs it, with the model loaded without llama.cpp's
# extra buffer types (use_extra_bufts off, as HookedLlama loads on an AMX CPU, where llama.cpp's AMX
# weights segfault and llama_cpp.server has no option to load without them): Llama.__init__ takes
# its model parameters from llama_cpp.llama_cpp.llama_model_default_params, wrapped here.
LLAMA_CPP_SERVER_NO_EXTRA_BUFTS = (
    "import runpy, sys; import llama_cpp.llama_cpp as C; default = C.llama_model_default_params\n"
    "def params():\n    p = default(); p.use_extra_bufts = False; return p\n"
    "C.llama_model_default_params = params; sys.argv[0] = 'llama_cpp.server'\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


# ---------------------------------------------------------------------------------------------


# Environment each server gets on top of this one's (saehook sets GOMP_SPINCOUNT=1000 itself).
ENV = {"llama-server-spin": {"GOMP_SPINCOUNT": "1000"}, "llama_cpp.server": {"GOMP_SPINCOUNT": "1000"}}
# What each server runs with (besides -np / --parallel 8, the context, the threads).
CONFIG = {
    "llama-server-spin": "as llama-server, with GOMP_SPINCOUNT=1000 (saehook's OpenMP spin-wait)",
    "llama-server": "its defaults: n_batch 2048 (capped at the context), n_ubatch 512, flash attention auto (on, "
                    "CPU), one KV stream per slot (kv_unified off), prompt cache with context checkpoints; "
                    "OpenMP's default spin-wait",
    "llama_cpp.server": "one request at a time; n_batch 512, flash attention off; GOMP_SPINCOUNT=1000 (as saehook); "
                        "on an AMX CPU without llama.cpp's extra buffer types (as saehook)",
    "saehook": "n_batch = n_ubatch = 512, flash attention off, --kv-layout auto (one KV stream per sequence on "
               "qwen3, the requests placed next to each other; one unified cache on qwen35); prompt cache keyed by "
               "steering (checkpoints on recurrent models); the float32 SAE through the bf16 prefilter (the "
               "default, --prefilter auto); GOMP_SPINCOUNT=1000",
    "saehook-fa": "as saehook, with flash attention auto (as llama-server)",
    "saehook-sequential": "as saehook, every sequence decoded alone",
    "saehook-f32": "as saehook, the float32 SAE encoded without the prefilter (--prefilter off)",
    "saehook-streams": "as saehook, one KV stream per sequence on every model (--kv-layout streams; refused on qwen35)",
    "saehook-unified": "as saehook, one unified KV cache (--kv-layout unified; batched mode on qwen3)",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["qwen3", "qwen35"], choices=["qwen3", "qwen35"])
    p.add_argument("--model", help="a GGUF file instead of the synthetic models (its arch is then not checked)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--reqs", type=int, default=3, help="requests per client at each concurrency")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of alternation: each runs every server and scenario once per concurrency")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--servers", nargs="+",
                   default=["llama-server", "llama-server-spin", "llama_cpp.server", "saehook", "saehook-fa"],
                   choices=["llama-server", "llama-server-spin", "llama_cpp.server", "saehook", "saehook-fa",
                            "saehook-sequential", "saehook-f32", "saehook-streams", "saehook-unified"],
                   help="llama-server-spin: llama-server with saehook's OpenMP spin-wait (GOMP_SPINCOUNT=1000; "
                   "its default spin collapses when other processes want the cores); "
                   "saehook-fa: saehook serve with flash attention as llama-server (load_server(flash_attn="
                   "'auto')); saehook-sequential: saehook serve --decode sequential (one llama_decode per request), "
                   "to show what batching gains; saehook-f32: saehook serve --prefilter off (the float32 SAE "
                   "encoded in float32 alone; saehook serves it through its bf16 copy by default, the same features); "
                   "saehook-streams / saehook-unified: saehook serve --kv-layout streams / unified (the shipped auto "
                   "is streams on qwen3, unified on qwen35)")
    p.add_argument("--llama-server", help="a llama-server binary (default: built from --llama-cpp-src)")
    p.add_argument("--llama-cpp-src", help="llama.cpp source (default: the vendored one of llama-cpp-python's sdist)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "saehook-bench"))
    p.add_argument("--json", default="bench_serve.json")
    args = p.parse_args()

    import saehook
    from saehook.demo.gguf_writer import vocab
    from saehook.engines.llama import _llama_has_amx
    from common import read_bandwidth

    eos = vocab()[0].index("<|endoftext|>")
    par = max(args.concurrency)
    n_ctx = args.prompt_tokens + args.gen_tokens + 16
    rng = np.random.default_rng(1)
    all_rows = []
    for arch in ([None] if args.model else args.arch):
        if args.model:
            path = args.model
        elif arch == "qwen3":
            path = synthetic_model(args.cache, args.hidden, args.layers, args.ffn, args.quant)
        else:
            path = synthetic_qwen35(args.cache, args.hidden, args.layers, args.ffn, args.quant)
        layer = args.layers // 2
        sae_path = os.path.join(args.cache, f"sae-{args.hidden}x{args.d_sae}-k{args.k}-L{layer}.safetensors")
        if not os.path.exists(sae_path):
            W = rng.standard_normal((args.d_sae, args.hidden), dtype=np.float32) / np.sqrt(args.hidden)
            saehook.SAE(W, W, k=args.k, metadata={"layer": layer}).save(sae_path)
        sae = saehook.load(sae_path)
        # printable byte tokens, so that every server tokenizes the prompt the same way; a prompt of
        # its own for every run (and one for the warm-ups), so that no run finds an earlier run's
        # prompts in a server's prompt cache: a run's second wave of requests reuses its first
        # wave's prefixes on every server alike. (With one prompt per round, saehook's unsteered
        # runs after its steered ones found only steered KV, which its prompt cache must not hand
        # an unsteered request, while llama-server's cache stayed warm: 0.86x in its TTFT alone.)
        new_prompt = lambda: "".join(chr(c) for c in rng.integers(97, 123, args.prompt_tokens))  # noqa: E731
        warmup_prompt = new_prompt()
        print(f"\n== {os.path.basename(path)}: SAE {args.hidden}x{args.d_sae} k={args.k} at layer {layer} "
              f"(W_enc {sae.encoder_bytes / 2**20:.0f} MiB); prompt {args.prompt_tokens}, {args.gen_tokens} generated "
              f"tokens per request, threads {args.threads}", flush=True)

        def body(extra, prompt=warmup_prompt):
            return lambda i, j: {"model": "m", "prompt": prompt[: args.prompt_tokens - i] + str(j), "stream": True,
                                 "stream_options": {"include_usage": True},
                                 "max_tokens": args.gen_tokens, "temperature": 0, **extra(i)}

        scenarios = []
        # llama.cpp's AMX buffer type segfaults in its matrix product (README "llama.cpp"): on an
        # AMX CPU every server loads the weights without it, as HookedLlama does (llama-server with
        # --no-repack, llama_cpp.server through LLAMA_CPP_SERVER_NO_EXTRA_BUFTS).
        amx = _llama_has_amx()
        for name in args.servers:
            port = free_port()
            if name == "saehook-fa":
                cmd = [sys.executable, "-c", SAEHOOK_FA, json.dumps({
                    "model": path, "sae": sae_path, "port": port,
                    "load": {"parallel": par, "n_ctx": n_ctx, "n_threads": args.threads}})]
                scenarios.append((name, cmd, port, "/health", [("unsteered", lambda i: {"ignore_eos": True})]))
            elif name.startswith("saehook"):
                cmd = [sys.executable, "-m", "saehook", "serve", path, "--sae", f"bench={sae_path}", "--port", str(port),
                       "--parallel", str(par), "--n-ctx", str(n_ctx), "--threads", str(args.threads),
                       "--max-tokens", str(args.gen_tokens)]
                if name == "saehook-sequential":
                    cmd += ["--decode", "sequential"]
                if name == "saehook-f32":
                    cmd += ["--prefilter", "off"]
                if name in ("saehook-streams", "saehook-unified"):
                    cmd += ["--kv-layout", name.split("-")[1]]
                scenarios.append((name, cmd, port, "/health", [
                    ("unsteered", lambda i: {"ignore_eos": True}),
                    ("steered", lambda i: {"ignore_eos": True, "saehook": {"steer": [
                        {"feature": i, "op": "clamp", "value": 5.0}]}})]))
            elif name.startswith("llama-server"):
                cmd = [llama_server_binary(args), "-m", path, "--host", "127.0.0.1", "--port", str(port),
                       "-np", str(par), "-c", str(n_ctx * par), "-t", str(args.threads), "-tb", str(args.threads),
                       "--no-webui", "-lv", "0"] + (["--no-repack"] if amx else [])
                scenarios.append((name, cmd, port, "/health", [("unsteered", lambda i: {"ignore_eos": True})]))
            else:
                launch = ["-c", LLAMA_CPP_SERVER_NO_EXTRA_BUFTS] if amx else ["-m", "llama_cpp.server"]
                cmd = [sys.executable, *launch, "--model", path, "--host", "127.0.0.1", "--port",
                       str(port), "--n_ctx", str(n_ctx), "--n_threads", str(args.threads), "--n_threads_batch",
                       str(args.threads), "--verbose", "false", "--interrupt_requests", "false"]
                scenarios.append((name, cmd, port, "/v1/models", [
                    ("unsteered", lambda i: {"logit_bias": {str(eos): -100}})]))
        # Every server is started (and warmed up) first, then the runs alternate: each round runs
        # every (server, scenario) once at each concurrency, in an order rotated every round, with
        # the read bound measured at the start of the round. This VM's speed drifts within minutes,
        # so each ratio is taken within a round (the servers not under load sit idle meanwhile).
        loads: Dict[str, str] = {}
        started = []
        try:
            for name, cmd, port, health, variants in scenarios:
                loads[name] = machine_load()
                print(f"{name}: {CONFIG.get(name, '')}; before its start: {loads[name]}", flush=True)
                srv = Server(name, cmd, port, health, env=ENV.get(name))
                started.append(srv)
                try:
                    stream_completion(port, body(variants[0][1])(0, 0))  # warm-up
                except Exception:
                    time.sleep(0.5)
                    print("".join(srv.log)[-3000:], file=sys.stderr)
                    raise
            runs = [(name, vname, extra, port) for name, _, port, _, variants in scenarios for vname, extra in variants]
            per_round: Dict[tuple, List[dict]] = {}
            bounds = []
            for rnd in range(args.rounds):
                bw_r = read_bandwidth(args.threads)["bound"]
                bounds.append(sae.encoder_bytes / (bw_r * 1e9) * 1e3)
                print(f"-- round {rnd + 1}/{args.rounds}: read bound {bounds[-1]:.2f} ms at {bw_r:.0f} GB/s; "
                      f"{machine_load()}", flush=True)
                shift = rnd % len(runs)
                for conc in args.concurrency:
                    for name, vname, extra, port in runs[shift:] + runs[:shift]:
                        h0 = health_of(port) if name.startswith("saehook") else None
                        r = load(port, conc, args.reqs, body(extra, new_prompt()))
                        if h0 is not None:  # the hook's own time per step, timed inside the server
                            h1 = health_of(port)
                            r["hook_ms_per_step"] = ((h1["hook_seconds"] - h0["hook_seconds"]) * 1e3
                                                     / max(1, h1["steps"] - h0["steps"]))
                            r["hook_ms_per_decode_step"] = (
                                (h1["generation_hook_seconds"] - h0["generation_hook_seconds"]) * 1e3
                                / max(1, h1["generation_decodes"] - h0["generation_decodes"]))
                        per_round.setdefault((name, vname, conc), []).append(r)
                        hook = (f"  hook {r['hook_ms_per_step']:.2f} ms/step, {r['hook_ms_per_decode_step']:.2f} per "
                                f"decode step" if "hook_ms_per_step" in r else "")
                        print(f"{name:<17} {vname:<10} c={conc}: {r['tok_s']:8.1f} tok/s  TTFT p50 "
                              f"{r['ttft_p50_ms']:7.1f} ms  ITL p50 {r['itl_p50_ms']:7.2f} ms  p99 "
                              f"{r['itl_p99_ms']:7.2f} ms  ({r['tokens']} tokens; means: TTFT "
                              f"{r['ttft_mean_ms']:.1f}, ITL {r['itl_mean_ms']:.2f}, last token to end "
                              f"{r['tail_mean_ms']:.1f} ms){hook}", flush=True)
        finally:
            for srv in started:
                srv.stop()
        med = lambda v: float(np.median(v))  # noqa: E731
        results = {k: {m: med([r[m] for r in rs]) for m in rs[0] if isinstance(rs[0][m], (int, float))}
                   for k, rs in per_round.items()}
        bound_ms = med(bounds)
        top = max(args.concurrency)
        row = {"model": os.path.basename(path), "arch": arch, "encoder_read_bound_ms": bound_ms,
               "encoder_read_bound_ms_per_round": bounds, "rounds": args.rounds,
               "load_before_start": loads, "config": {n: CONFIG.get(n, "") for n in loads},
               "results": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()},
               "per_round": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in per_round.items()}}
        print(f"medians of {args.rounds} rounds:")
        for (name, vname, conc), r in sorted(results.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
            print(f"  {name:<17} {vname:<10} c={conc}: {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                  f"ITL p50 {r['itl_p50_ms']:7.2f} ms  p99 {r['itl_p99_ms']:7.2f} ms  mean {r['itl_mean_ms']:7.2f} ms")

        def per_round_ratio(key: str, values: List[float], what: str) -> None:
            if values:
                row[key] = {"median": med(values), "min": min(values), "max": max(values), "per_round": values}
                print(f"c={top} {what}: {med(values):.2f} (rounds {min(values):.2f}-{max(values):.2f})")

        def rounds_of(name: str, vname: str) -> List[dict]:
            return per_round.get((name, vname, top), [])

        s, st = rounds_of("saehook", "unsteered"), rounds_of("saehook", "steered")
        lss = [rs for rs in (rounds_of(n, "unsteered") for n in ("llama-server", "llama-server-spin")) if rs]
        lcs, fa = rounds_of("llama_cpp.server", "unsteered"), rounds_of("saehook-fa", "unsteered")
        ls = [max(rs[i]["tok_s"] for rs in lss) for i in range(len(s))] if s and lss else []  # the faster configuration
        per_round_ratio("vs_llama_server", [a["tok_s"] / b for a, b in zip(s, ls)],
                        "unsteered: saehook / llama-server (its faster configuration, per round) (target >= 0.9x)")
        per_round_ratio("fa_vs_llama_server", [a["tok_s"] / b for a, b in zip(fa, ls)],
                        "unsteered: saehook-fa / llama-server")
        for other in ("saehook-unified", "saehook-streams"):
            per_round_ratio(f"{other.split('-')[1]}_vs_llama_server",
                            [a["tok_s"] / b for a, b in zip(rounds_of(other, "unsteered"), ls)],
                            f"unsteered: {other} / llama-server")
        per_round_ratio("vs_llama_cpp_server", [a["tok_s"] / b["tok_s"] for a, b in zip(s, lcs)],
                        "unsteered: saehook / llama_cpp.server (target >= 3x)")
        per_round_ratio("steered_added_ms_per_step", [b["itl_p50_ms"] - a["itl_p50_ms"] for a, b in zip(s, st)],
                        f"steered: ms added per decode step (ITL p50, steered - unsteered) against a W_enc read "
                        f"bound of {bound_ms:.2f} ms (target <= {1.1 * bound_ms:.2f} ms)")
        per_round_ratio("steered_hook_ms_per_decode_step",
                        [b["hook_ms_per_decode_step"] for b in st if "hook_ms_per_decode_step" in b],
                        f"steered: the hook's own time per decode step (generated tokens only) inside the server "
                        f"(/health generation_hook_seconds) against the {bound_ms:.2f} ms bound")
        per_round_ratio("steered_hook_ms_per_step", [b["hook_ms_per_step"] for b in st if "hook_ms_per_step" in b],
                        "steered: the same over every step, prompt chunks included (/health hook_seconds)")
        pst = rounds_of("saehook-f32", "steered")
        per_round_ratio("f32_steered_hook_ms_per_decode_step",
                        [b["hook_ms_per_decode_step"] for b in pst if "hook_ms_per_decode_step" in b],
                        f"steered, --prefilter off: the hook's own time per decode step against the {bound_ms:.2f} ms "
                        f"float32 bound")
        for conc in args.concurrency:  # the shipped layout against the unified cache, per round
            for vname in ("unsteered", "steered"):
                a, b = per_round.get(("saehook", vname, conc), []), per_round.get(("saehook-unified", vname, conc), [])
                if a and b:
                    xs = [x["tok_s"] / y["tok_s"] for x, y in zip(a, b)]
                    row.setdefault("vs_unified", {})[f"{vname}|{conc}"] = xs
                    print(f"c={conc} {vname}: saehook / saehook-unified tok/s per round: "
                          + ", ".join(f"{v:.2f}" for v in xs))
        for conc in args.concurrency:  # the hook per steered decode step over the round's bound, per round
            for name in ("saehook", "saehook-f32", "saehook-unified", "saehook-streams"):
                rs = per_round.get((name, "steered", conc), [])
                if rs and all("hook_ms_per_decode_step" in r for r in rs):
                    xs = [r["hook_ms_per_decode_step"] / b for r, b in zip(rs, bounds)]
                    row.setdefault("hook_x_bound", {})[f"{name}|{conc}"] = xs
                    print(f"c={conc} {name} steered: hook per decode step / bound per round: "
                          + ", ".join(f"{v:.2f}" for v in xs))
        all_rows.append(row)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "rows": all_rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
