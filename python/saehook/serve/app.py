"""The HTTP side of `saehook serve`: a FastAPI app with OpenAI's endpoints and shapes.

    GET  /v1/models                the one model
    GET  /v1/saehook/saes          the loaded SAEs
    POST /v1/chat/completions      messages -> the GGUF's chat template -> tokens
    POST /v1/completions           prompt (text or token ids)
    GET  /health
    GET  /                         the steering playground (playground.py, its own endpoints)

Requests are checked (protocol.parse_request), tokenized here, and handed to the Scheduler;
its worker thread sends tokens back through an asyncio queue. Streams are Server-Sent Events
ending with `data: [DONE]`; a client that goes away cancels its job, which frees its slot at
the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, GenerationRequest, Limits, SAERegistry, bad, parse_request
from .scheduler import Job, Scheduler, TokenInfo


class ServeState:
    """What the routes share: the model, its chat formatter, the SAEs, the scheduler, limits."""

    def __init__(self, llm, scheduler: Scheduler, registry: SAERegistry, *, model_name: str, chat_formatter,
                 limits: Limits, api_key: Optional[str] = None):
        self.llm, self.scheduler, self.registry = llm, scheduler, registry
        self.model_name, self.chat_formatter, self.limits, self.api_key = model_name, chat_formatter, limits, api_key
        self.created = int(time.time())


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _tokenize(state: ServeState, req: GenerationRequest) -> List[int]:
    llm = state.llm
    if req.kind == "chat":
        try:
            fmt = state.chat_formatter(messages=req.prompt, **req.chat_template_kwargs)
        except APIError:
            raise
        except Exception as e:  # the template's raise_exception, a missing variable...
            raise bad("messages", f"the chat template rejected these messages: {e}")
        req.stop = list(req.stop) + [s for s in ([fmt.stop] if isinstance(fmt.stop, str) else (fmt.stop or []))
                                     if s and s not in req.stop]
        tokens = llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)
        param = "messages"
    elif isinstance(req.prompt, list):
        tokens = list(req.prompt)
        n_vocab = llm.n_vocab()
        for i, t in enumerate(tokens):
            if not 0 <= t < n_vocab:
                raise bad(f"prompt[{i}]", f"prompt[{i}]: token id {t} is outside the vocabulary (0..{n_vocab - 1})")
        param = "prompt"
    else:
        # as llama_cpp.Llama.create_completion tokenizes a prompt
        tokens = llm.tokenize(req.prompt.encode("utf-8"), special=True) if req.prompt else [llm.token_bos()]
        param = "prompt"
    if not tokens:
        raise bad(param, "the prompt has no tokens")
    n_ctx = state.scheduler.n_ctx
    if len(tokens) >= n_ctx:
        raise bad(param, f"the prompt has {len(tokens)} tokens; this server's context holds {n_ctx} per request "
                  "(--n-ctx), prompt and generated tokens together", "context_length_exceeded")
    return tokens


def _piece_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


class _Result:
    """Collects a job's events for a non-streamed response."""

    def __init__(self):
        self.tokens: List[TokenInfo] = []
        self.text = ""
        self.features: List[Dict[str, Any]] = []
        self.done: Optional[Dict[str, Any]] = None

    def add(self, kind: str, payload: Any) -> None:
        if kind == "prompt_features":
            self.features.extend(payload)
        elif kind == "token":
            self.text += payload.text
            if payload.id >= 0:
                self.tokens.append(payload)
                if payload.features is not None:
                    self.features.append(payload.features)
        elif kind == "done":
            self.done = payload


def _chat_logprobs(llm, toks: List[TokenInfo]) -> Optional[Dict[str, Any]]:
    if not toks or toks[0].logprob is None:
        return None

    def entry(tid: int, lp: float, piece: Optional[bytes] = None):
        b = piece if piece is not None else llm.detokenize([tid])
        return {"token": _piece_text(b), "logprob": lp, "bytes": list(b)}

    return {"content": [{**entry(t.id, t.logprob[0], t.piece),
                         "top_logprobs": [entry(a, lp) for a, lp in t.logprob[1]]} for t in toks],
            "refusal": None}


def _completion_logprobs(llm, toks: List[TokenInfo], offset0: int = 0) -> Optional[Dict[str, Any]]:
    if not toks or toks[0].logprob is None:
        return None
    offsets, o = [], offset0
    for t in toks:
        offsets.append(o)
        o += len(_piece_text(t.piece))
    return {"tokens": [_piece_text(t.piece) for t in toks], "token_logprobs": [t.logprob[0] for t in toks],
            "top_logprobs": [{_piece_text(llm.detokenize([a])): lp for a, lp in t.logprob[1]} for t in toks],
            "text_offset": offsets}


class _AuthAndSize:
    """The API key and the declared body size, checked before a route runs. A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware (@app.middleware) would pass every streamed token
    through an extra task and memory stream."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, scope) -> Optional[APIError]:
        state = self.state
        headers = Headers(scope=scope)
        if state.api_key and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
                return APIError(401, "missing or wrong API key: send Authorization: Bearer <key> "
                                "(the --api-key this server was started with)", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > state.limits.max_body_bytes:
            return APIError(413, f"the request body has {length} bytes; at most {state.limits.max_body_bytes} "
                            "are allowed (--max-body)", code="body_too_large")
        return None


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="saehook serve", description="OpenAI-compatible server with per-request SAE steering",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                        else None))

    app.add_middleware(_AuthAndSize, state=state)

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "saehook"}]}

    @app.get("/v1/saehook/saes")
    async def saes():
        return {"object": "list", "data": state.registry.describe()}

    async def _body(request: Request) -> Any:
        raw = b""
        async for chunk in request.stream():  # a chunked body has no content-length to check first
            raw += chunk
            if len(raw) > state.limits.max_body_bytes:
                raise APIError(413, f"the request body exceeds {state.limits.max_body_bytes} bytes (--max-body)",
                               code="body_too_large")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(None, f"the request body is not valid JSON: {e}", "invalid_json")

    async def _generate(request: Request, kind: str):
        body = await _body(request)
        req = parse_request(kind, body, state.registry, state.limits)
        tokens = _tokenize(state, req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind_: str, payload: Any) -> None:  # called from the scheduler's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind_, payload))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel()

        job = Job(req=req, prompt=tokens, emit=emit)
        state.scheduler.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = req.model or state.model_name
        if req.stream:
            # Starlette cancels the generator when the client disconnects (its finally cancels the job).
            return StreamingResponse(_stream(state, req, job, queue, rid, created, model),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        res = _Result()
        try:
            while res.done is None:
                try:
                    kind_, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        state.scheduler.wake()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind_ == "error":
                    raise payload
                res.add(kind_, payload)
        except asyncio.CancelledError:
            job.cancel()
            state.scheduler.wake()
            raise
        choice: Dict[str, Any] = {"index": 0, "finish_reason": res.done["finish_reason"]}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": res.text}
            choice["logprobs"] = _chat_logprobs(state.llm, res.tokens)
        else:
            choice["text"] = res.text
            choice["logprobs"] = _completion_logprobs(state.llm, res.tokens)
        if req.features is not None:
            choice["saehook"] = {"features": res.features}
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": res.done["usage"]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completion")

    from .playground import router as playground_router  # GET / (the page) and its endpoints

    app.include_router(playground_router(state))
    return app


async def _stream(state: ServeState, req: GenerationRequest, job: Job, queue: asyncio.Queue, rid: str, created: int,
                  model: str):
    """Server-Sent Events (`data: JSON` and a blank line each): one chunk per generated token (its text, logprobs and features), a last chunk
    with finish_reason, a usage chunk when stream_options.include_usage, then [DONE]."""
    chat = req.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    offset = 0

    def event(data: str) -> str:
        return f"data: {data}\n\n"

    def chunk(delta_text: Optional[str], *, role: bool = False, finish: Optional[str] = None,
              logprobs=None, features=None) -> str:
        c: Dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
        if chat:
            d: Dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta_text is not None:
                d["content"] = delta_text
            c["delta"] = d
        else:
            c["text"] = delta_text or ""
        if features is not None:
            c["saehook"] = {"features": features}
        return json.dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": [c]})

    try:
        first = True
        while True:
            kind, payload = await queue.get()
            if kind == "error":
                yield event(json.dumps(payload.body()))
                break
            if kind == "prompt_features":
                yield event(chunk("", role=chat, features=payload))
                first = False
                continue
            if first and chat:
                yield event(chunk("", role=True, features=[] if req.features is not None else None))
                first = False
            if kind == "token":
                t: TokenInfo = payload
                feats = None
                if req.features is not None:
                    feats = [t.features] if t.features is not None else []
                lp = None
                if t.id >= 0 and t.logprob is not None:
                    lp = _chat_logprobs(state.llm, [t]) if chat else _completion_logprobs(state.llm, [t], offset)
                offset += len(_piece_text(t.piece))
                yield event(chunk(t.text, logprobs=lp, features=feats))
            elif kind == "done":
                yield event(chunk(None if chat else "", finish=payload["finish_reason"]))
                if req.include_usage:
                    yield event(json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                            "choices": [], "usage": payload["usage"]}))
                break
        yield event("[DONE]")
    finally:  # normal end, or the client went away (the generator is cancelled)
        job.cancel()
        state.scheduler.wake()
