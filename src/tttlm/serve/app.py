"""The FastAPI application: OpenAI's endpoints, sessions, health; errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tttlm.memory.recall import RecallPolicy
from tttlm.serve.api_errors import NO_RETRY, APIError, bad_request, error_body
from tttlm.serve.formats import Reply
from tttlm.serve.limits import BodyLimit, Limits, check_bearer
from tttlm.serve.loading import Served
from tttlm.serve.schemas import ChatRequest, CompletionRequest, Sampling, SessionCreate, SessionFork
from tttlm.serve.sessions import SessionStore, check_session_id, new_session_id
from tttlm.serve.text import TextTracker
from tttlm.serve.worker import Delta, Done, Event, Failed, Job, Worker

log = logging.getLogger("tttlm.serve")
SESSION_HEADER = "x-session-id"
COMPLETION_DEFAULT_MAX = 16  # OpenAI's default max_tokens of /v1/completions


class Service:
    """What the routes share: the served model, the worker, the sessions, the limits."""

    def __init__(self, served: Served, store: SessionStore | None, *, limits: Limits,
                 max_batch: int = 32, api_key: str | None = None,
                 policy: RecallPolicy | None = None, rag: str = "end") -> None:
        limits.check()
        self.served = served
        self.engine = served.engine
        self.tokenizer = served.tokenizer
        self.store = store
        self.limits = limits
        self.api_key = api_key
        self.worker = Worker(served.engine, store, max_batch, policy, rag)
        self.vocab = served.engine.config.vocab_size
        self.eos = served.engine.config.eos_token_id
        self.started = int(time.time())

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Running requests end at their next token with their sessions saved; then the
        sessions folder is unlocked."""
        self.worker.stop()
        if self.store is not None:
            self.store.close()

    # ---------------------------------------------------------------------- checks
    def check_model(self, model: str) -> None:
        if model != self.served.name:
            raise APIError(404, f"model {model!r} is not served here; this server serves "
                                f"{self.served.name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def sessions(self) -> SessionStore:
        if self.store is None:
            raise bad_request("this server keeps no sessions; start it with --sessions DIR",
                              "session_id")
        return self.store

    def ids(self, tokens: list[int], param: str) -> list[int]:
        bad = next((t for t in tokens if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise bad_request(f"{param} holds token id {bad}, outside the model's vocabulary "
                              f"[0, {self.vocab})", param)
        if len(tokens) > self.limits.max_prompt_tokens:
            raise bad_request(f"{param} is {len(tokens)} tokens, over the server's limit of "
                              f"{self.limits.max_prompt_tokens} per request; send it in parts "
                              "to one session, or raise --max-prompt-tokens", param)
        return tokens

    def encode(self, text: str, param: str) -> list[int]:
        return self.ids(self.tokenizer.encode(text), param)

    # ------------------------------------------------------------------------ jobs
    def job(self, request: Request, body: Sampling, prompt: list[int], *,
            default_max: int, stops: list[str], logprobs: int | None
            ) -> tuple[Job, asyncio.Queue[Event]]:
        _refuse_unsupported(body)
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens > self.limits.max_tokens:
            raise bad_request(f"max_tokens={max_tokens} is over the server's limit of "
                              f"{self.limits.max_tokens} per request; ask for fewer (continue "
                              "the session for more) or raise --max-tokens", "max_tokens")
        if len(stops) > self.limits.max_stops:
            raise bad_request(f"{len(stops)} stop strings; give at most "
                              f"{self.limits.max_stops}", "stop")
        if body.rag not in (None, "off") and self.worker.policy is None:
            raise bad_request(f"rag={body.rag!r} needs the retrieval memory, which this server "
                              "runs without; start it with --rag end (or chunk), or drop rag",
                              "rag")
        session_id = body.session_id or request.headers.get(SESSION_HEADER)
        if session_id is not None:
            check_session_id(session_id)
            self.sessions().claim(session_id)
        try:
            return self.submit(Job(
                prompt=prompt, max_tokens=max_tokens, emit=lambda _: None,
                tracker=TextTracker(self.tokenizer, stops),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k or None, top_p=body.top_p, seed=body.seed,
                stop_ids=frozenset() if body.ignore_eos else frozenset({self.eos}),
                logprobs=logprobs, session_id=session_id, rag=body.rag,
                deadline=time.monotonic() + self.limits.timeout))
        except BaseException:
            if session_id is not None:
                self.sessions().release(session_id)
            raise

    def submit(self, job: Job) -> tuple[Job, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, event)

        job.emit = emit
        self.worker.submit(job)
        return job, events

    async def respond(self, job: Job, events: asyncio.Queue[Event], reply: Reply,
                      stream: bool, include_usage: bool) -> Any:
        headers = {SESSION_HEADER: job.session_id} if job.session_id else {}
        try:
            # The first event comes after the prefill: an error there still gets its status.
            first = await events.get()
            if isinstance(first, Failed):
                raise first.error
        except BaseException:
            job.cancel()
            raise
        if stream:
            return StreamingResponse(_sse(job, events, first, reply, include_usage),
                                     media_type="text/event-stream", headers=headers)
        try:
            event = first
            while not isinstance(event, Done):
                if isinstance(event, Failed):
                    raise event.error
                reply.add(event)
                event = await events.get()
        finally:
            job.cancel()  # a client gone away (this task cancelled) stops the generation
        return JSONResponse(reply.whole(event), headers=headers)

    async def call(self, fn: Any) -> Any:
        return await asyncio.wrap_future(self.worker.call(fn))


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(job: Job, events: asyncio.Queue[Event], first: Event, reply: Reply,
               include_usage: bool) -> AsyncIterator[str]:
    try:
        opening = reply.first_chunk()
        if opening is not None:
            yield _data(opening)
        event = first
        while True:
            if isinstance(event, Delta):
                chunk = reply.chunk(event)
                if chunk is not None:
                    yield _data(chunk)
            elif isinstance(event, Done):
                for chunk in reply.last_chunks(event, include_usage):
                    yield _data(chunk)
                yield "data: [DONE]\n\n"
                return
            else:  # the openai client raises an APIError for an error event
                yield _data(event.error.body())
                return
            event = await events.get()
    finally:
        job.cancel()


def _refuse_unsupported(body: Sampling) -> None:
    fields = {"n": (body.n, 1), "presence_penalty": (body.presence_penalty, 0.0),
              "frequency_penalty": (body.frequency_penalty, 0.0),
              "logit_bias": (body.logit_bias or None, None)}
    if isinstance(body, CompletionRequest):
        fields.update(echo=(body.echo, False), best_of=(body.best_of or 1, 1),
                      suffix=(body.suffix or None, None))
    if isinstance(body, ChatRequest):
        fields.update(tools=(body.tools or None, None))
    for name, (value, default) in fields.items():
        if value != default:
            raise bad_request(f"{name}={value!r} is not supported by tttlm serve; leave it out "
                              "(one choice per request: send concurrent requests instead, "
                              "the server batches them)" if name == "n" else
                              f"{name}={value!r} is not supported by tttlm serve; leave it out",
                              name)


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _validation_error(err: RequestValidationError) -> APIError:
    """The first problems pydantic found, on one line, naming the fields."""
    parts, params = [], []
    for e in err.errors()[:3]:
        if e.get("type") == "json_invalid":
            return bad_request("the request body is not valid JSON; send a JSON object")
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        params.append(loc)
    return bad_request("invalid request: " + "; ".join(parts), params[0] if params else None)


# ------------------------------------------------------------------------------- routes
def create_app(service: Service) -> FastAPI:
    """The application; its lifespan starts the worker and, at shutdown, lets running
    requests end with their sessions saved."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="tttlm serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.limits.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        headers = NO_RETRY if err.status < 500 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)),
                            status_code=err.status_code, headers=NO_RETRY)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception) -> JSONResponse:
        log.error("request failed", exc_info=err)
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"),
                            status_code=500)

    async def authorized(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), service.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        store = service.store
        return {"status": "ok", "model": service.served.name,
                "running": len(service.worker.batch),
                "sessions_in_memory": len(store.hot) if store is not None else None}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": service.served.name, "object": "model", "created": service.started,
             "owned_by": "tttlm"}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        service.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(f"{len(prompt)} prompts in one request; send one prompt per "
                                  "request (concurrent requests are batched)", "prompt")
            prompt = prompt[0]  # type: ignore[assignment]
        ids = (service.encode(prompt, "prompt") if isinstance(prompt, str)
               else service.ids(list(prompt), "prompt"))  # type: ignore[arg-type]
        job, events = service.job(request, body, ids, default_max=COMPLETION_DEFAULT_MAX,
                                  stops=_stops(body.stop), logprobs=body.logprobs)
        reply = Reply("completion", service.served.name, service.tokenizer,
                      body.logprobs is not None, body.return_token_ids, job.session_id)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await service.respond(job, events, reply, body.stream, usage)

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        service.check_model(body.model)
        template = service.served.template
        continuing = bool(body.session_id or request.headers.get(SESSION_HEADER))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = template.render(messages, continuing)
        except Exception as err:  # a template's raise_exception, or a bad template
            raise bad_request(f"the chat template refused these messages: {err}",
                              "messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job, events = service.job(request, body, service.encode(text, "messages"),
                                  default_max=service.limits.max_tokens,
                                  stops=[*template.stops, *_stops(body.stop)],
                                  logprobs=logprobs)
        reply = Reply("chat", service.served.name, service.tokenizer, body.logprobs,
                      body.return_token_ids, job.session_id)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await service.respond(job, events, reply, body.stream, usage)

    # ---------------------------------------------------------------------- sessions
    @v1.post("/sessions")
    async def create_session(body: SessionCreate | None = None) -> Any:
        body = body or SessionCreate()
        store = service.sessions()
        session_id = check_session_id(body.session_id or new_session_id())
        doc = body.document
        ids = (service.encode(doc, "document") if isinstance(doc, str)
               else service.ids(list(doc or []), "document"))
        store.claim(session_id)
        try:
            job, events = service.submit(Job(
                prompt=ids, max_tokens=0, emit=lambda _: None,
                tracker=TextTracker(service.tokenizer, []), session_id=session_id,
                create=True, deadline=time.monotonic() + service.limits.timeout))
        except BaseException:
            store.release(session_id)
            raise
        event = await events.get()
        if isinstance(event, Failed):
            raise event.error
        assert isinstance(event, Done)
        return {**(event.session or {}), "prompt_tokens": event.prompt_tokens}

    @v1.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        store = service.sessions()
        return {"object": "list", "data": await service.call(store.list)}

    @v1.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        store = service.sessions()
        check_session_id(session_id)
        return await service.call(lambda: store.info(session_id))  # type: ignore[no-any-return]

    @v1.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        store = service.sessions()
        check_session_id(session_id)
        store.claim(session_id)
        try:
            await service.call(lambda: store.delete(session_id))
        finally:
            store.release(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @v1.post("/sessions/{session_id}/fork")
    async def fork_session(session_id: str, body: SessionFork | None = None) -> Any:
        body = body or SessionFork()
        store = service.sessions()
        check_session_id(session_id)
        target = check_session_id(body.session_id or new_session_id())
        store.claim(session_id)
        try:
            store.claim(target)
            try:
                info = await service.call(lambda: store.fork(session_id, target))
            finally:
                store.release(target)
        finally:
            store.release(session_id)
        return info

    app.include_router(v1)
    return app
