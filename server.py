"""`lstream serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over the continuous
batching engine (core/batching.py). The engine runs on the main thread and uvicorn on a thread of
its own: numba's OpenMP kernels launched from any other thread cost ~3x more per parallel call
(6 vs 18 us measured), which halved a single request's decode speed.

    POST /v1/chat/completions   the model's chat template; streaming (SSE) or not
    POST /v1/completions        a prompt string (or token ids)
    GET  /v1/models, /health, /metrics (Prometheus text)

Each request gets an asyncio queue the engine thread feeds (call_soon_threadsafe). A client that
disconnects cancels its request: the engine frees its slot at the next step. More requests than
slots wait in a bounded queue; beyond it, 503. SIGINT/SIGTERM: waiting requests get 503, running
ones finish (up to --grace seconds, then they are cancelled), and the process exits with status 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import server_protocol as P
from .core.batching import Engine, QueueFull, ShuttingDown
from .core.serve_request import Event, GenParams, GenRequest


class Service:
    """The model and its engine, as the routes see them."""

    def __init__(self, model, engine: Engine, alias: str, defaults: GenParams | None = None, log=None):
        self.model, self.engine, self.alias = model, engine, alias
        self.defaults = defaults or GenParams()
        self.log = log
        self.created = int(time.time())

    def warmup(self) -> float:
        """The engine's warm-up, and the chat template rendered once: its first render imports and
        compiles the template (1.0 s for SmolLM2's on the 2-core machine), which the first chat
        request paid before. Seconds taken."""
        t0 = time.perf_counter()
        self.engine.warmup()
        try:
            self.model.tokenizer.encode(self.model.tokenizer.apply_chat([{"role": "user", "content": "Hello"}]),
                                        bos=False)
        except Exception:  # noqa: BLE001 - a template may refuse this message; requests then say why
            pass
        return time.perf_counter() - t0

    def stop(self) -> None:
        """The engine finishes what runs and returns from its loop (on the main thread)."""
        self.engine.stop()

    # -- requests ----------------------------------------------------------------------------
    def tokens(self, parsed: P.Parsed) -> list[int]:
        tok = self.model.tokenizer
        if parsed.messages is not None:
            try:
                text = tok.apply_chat(parsed.messages)
            except Exception as e:  # noqa: BLE001 - jinja raises many kinds (a template's own checks)
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise P.BadRequest(f"the chat template cannot render these messages: {msg}") from None
            return tok.encode(text, bos=False)
        if isinstance(parsed.prompt, str):
            return tok.encode(parsed.prompt)
        vocab = self.model.config.vocab_size
        if min(parsed.prompt) < 0 or max(parsed.prompt) >= vocab:
            raise P.BadRequest(f"prompt token ids must be in [0, {vocab})")
        return list(parsed.prompt)

    def check_length(self, n_prompt: int, params: GenParams, given: bool) -> None:
        room = self.engine.n_ctx_slot
        if n_prompt == 0:
            raise P.BadRequest("the prompt is empty")
        if n_prompt >= room:
            raise P.BadRequest(f"the prompt is {n_prompt} tokens, more than a slot's context of {room} "
                               f"(-c {self.engine.model.kv.n_ctx} / -np {self.engine.n_slots}) allows")
        if not given:
            params.max_tokens = room - n_prompt


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(P.error_body(status, message), status_code=status)


async def _parse(request: Request, svc: Service, chat: bool):
    """(parsed, prompt tokens) or an error response."""
    try:
        body = P.parse_body(await request.body())
        parsed = (P.parse_chat if chat else P.parse_completion)(body, svc.defaults)
        toks = await run_in_threadpool(svc.tokens, parsed)
        svc.check_length(len(toks), parsed.params, parsed.max_tokens_given)
        return parsed, toks
    except P.BadRequest as e:
        return _error(400, str(e)), None


def _submit(svc: Service, toks, params, stream: bool):
    """(request, its event queue) or an error response. A whole answer (not streamed) wakes the event
    loop once, at its end: each wake-up takes a core from the spinning kernel threads (2 cores: one
    request alone went 53 t/s through HTTP against 70 in the engine alone, woken per token)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Event] = asyncio.Queue()
    wake = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)  # noqa: E731
    if stream:
        emit = wake
    else:
        texts: list[str] = []

        def emit(ev: Event) -> None:
            if ev.kind == "text":
                texts.append(ev.text)
                return
            if texts:
                wake(Event("text", "".join(texts)))
            wake(ev)
    req = GenRequest(toks, params, emit=emit)
    try:
        svc.engine.submit(req)
    except (QueueFull, ShuttingDown) as e:
        return _error(503, str(e)), None
    return req, q


async def _completion(request: Request, chat: bool) -> Response:
    svc: Service = request.app.state.service
    parsed, toks = await _parse(request, svc, chat)
    if toks is None:
        return parsed
    req, q = _submit(svc, toks, parsed.params, parsed.stream)
    if q is None:
        return req
    rid = P.new_id(chat)
    if parsed.stream:
        return StreamingResponse(_stream(svc, req, q, rid, chat, parsed.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, svc, req, q, rid, chat)


async def _collect(request: Request, svc: Service, req, q, rid: str, chat: bool) -> Response:
    """Wait for the whole answer, cancelling it if the client goes away first."""
    parts: list[str] = []
    waiter = asyncio.ensure_future(_drain(q, parts))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            svc.engine.cancel(req)
            waiter.cancel()
        gone.cancel()
    if not waiter.done() or waiter.cancelled():
        return Response(status_code=499)
    ev = waiter.result()
    if ev.kind == "error":
        return _error(ev.status or 500, ev.text)
    if ev.finish_reason == "cancelled":
        return _error(503, "the request was cancelled: the server is shutting down")
    return JSONResponse(P.completion(chat, rid, svc.alias, "".join(parts), ev.finish_reason, req))


async def _drain(q, parts: list[str]) -> Event:
    while True:
        ev = await q.get()
        if ev.kind == "text":
            parts.append(ev.text)
        else:
            return ev


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _stream(svc: Service, req, q, rid: str, chat: bool, include_usage: bool):
    """SSE chunks; the request is cancelled whenever the stream ends early (client gone)."""
    done = False
    try:
        if chat:
            yield P.sse(P.chunk(chat, rid, svc.alias, "", None, first=True))
        while True:
            ev = await q.get()
            if ev.kind == "text":
                yield P.sse(P.chunk(chat, rid, svc.alias, ev.text, None))
                continue
            done = True
            if ev.kind == "error" or ev.finish_reason == "cancelled":
                msg = ev.text if ev.kind == "error" else "the request was cancelled: the server is shutting down"
                yield P.sse(P.error_body(ev.status or 503, msg))
            else:
                last = P.chunk(chat, rid, svc.alias, None, ev.finish_reason)
                last["timings"] = req.timings.as_dict()
                yield P.sse(last)
                if include_usage:
                    u = P.chunk(chat, rid, svc.alias, None, None)
                    u["choices"], u["usage"] = [], P.usage(req)
                    yield P.sse(u)
            yield b"data: [DONE]\n\n"
            return
    finally:
        if not done:
            svc.engine.cancel(req)


async def chat_completions(request: Request) -> Response:
    return await _completion(request, chat=True)


async def completions(request: Request) -> Response:
    return await _completion(request, chat=False)


async def models(request: Request) -> Response:
    svc: Service = request.app.state.service
    m = svc.model
    meta = {"n_ctx": m.kv.n_ctx, "n_ctx_slot": svc.engine.n_ctx_slot, "n_slots": svc.engine.n_slots,
            "n_vocab": m.config.vocab_size, "n_params": None}
    return JSONResponse({"object": "list", "data": [
        {"id": svc.alias, "object": "model", "created": svc.created, "owned_by": "lstream", "meta": meta}]})


async def health(request: Request) -> Response:
    svc: Service = request.app.state.service
    if not svc.engine.accepting:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    svc: Service = request.app.state.service
    e = svc.engine
    text = e.stats.prometheus(e.queue_len, len(e.active), e.paged.pool.n_used, e.paged.pool.n_blocks)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def _not_found(request: Request, exc) -> Response:
    return _error(404, f"no route {request.method} {request.url.path}")


async def _server_error(request: Request, exc) -> Response:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _error(500, f"{type(exc).__name__}: {msg}")


def create_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            service.stop()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found, 500: _server_error})
    app.state.service = service
    return app


def serve(service: Service, host: str = "127.0.0.1", port: int = 8080, grace: float = 10.0,
          verbose: bool = False, on_ready=None) -> int:
    """Run until SIGINT/SIGTERM: uvicorn on a thread, the engine on this (the main) thread.
    Returns 0 after a clean shutdown, uvicorn's exit status when it could not start (port taken)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                # waiting requests: 503 at once; running ones go on until shortly before uvicorn's
                # grace period ends, then they are cancelled here, so every stream still ends
                # with its error chunk and [DONE] instead of a cut connection
                service.engine.stop_accepting()
                t = threading.Timer(max(grace - 1.0, 0.0), service.engine.cancel_running)
                t.daemon = True
                t.start()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready()

    config = uvicorn.Config(create_app(service), host=host, port=port, timeout_graceful_shutdown=grace,
                            log_level="info" if verbose else "warning", access_log=verbose, lifespan="on")
    server = _Server(config)
    status = [0]

    def http():
        try:
            server.run()  # not the main thread: uvicorn leaves the signals to us
        except SystemExit as e:  # uvicorn exits when it cannot bind
            status[0] = e.code if isinstance(e.code, int) else 1
        finally:
            service.stop()  # the engine loop below returns once nothing runs

    old = {s: signal.signal(s, lambda sig, frame: server.handle_exit(sig, frame)) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="lstream-http", daemon=True)
    try:
        thread.start()
        service.engine.run()
        thread.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return status[0]
