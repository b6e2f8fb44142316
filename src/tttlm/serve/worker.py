"""The one thread that runs the engine: admits requests, batches their decoding, saves
sessions.

All engine and state work happens here, so nothing of torch runs on the event loop and no two
engine calls overlap. A request is prefilled alone when it arrives (its session's unread
tokens and its prompt), then joins the running batch: every step reads one token per running
request with one :meth:`Engine.step` over their stacked states (the engine handles sequences
at different positions of their chunks), and each row is sampled with its request's own
settings and random generator. A request that finishes leaves the batch with its row of the
state (``State.select``); its session is saved before the reply ends.

Like :class:`~tttlm.inference.TokenStream`, a request's last sampled token is not read into the
state: it stays the session's unread token, read by the next request's prefill. Greedy
decoding of a session over several requests therefore follows one long ``Engine.generate``
token for token.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tttlm.errors import UserError
from tttlm.inference.engine import Engine
from tttlm.inference.sampling import sample
from tttlm.inference.state import State
from tttlm.memory.memory import ContextMemory
from tttlm.memory.recall import RecallPolicy
from tttlm.serve.api_errors import APIError, bad_request
from tttlm.serve.sessions import Session, SessionStore
from tttlm.serve.text import TextTracker

log = logging.getLogger("tttlm.serve")


@dataclass
class Delta:
    """One generated token: the text it makes visible (may be empty) and its logprobs."""

    token: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str  # the text held back until the end (no token of its own)
    session: dict[str, Any] | None = None


@dataclass
class Failed:
    error: APIError


Event = Delta | Done | Failed


@dataclass
class Job:
    """One generation request. ``emit`` is called on the worker thread (it must be thread
    safe); ``cancel`` may be called from any thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    tracker: TextTracker
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; n: the token's and the n most likely
    session_id: str | None = None
    create: bool = False  # a new session (POST /v1/sessions) rather than a continued one
    deadline: float = float("inf")
    # Filled in on the worker thread.
    session: Session | None = None
    state: State | None = None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prompt_tokens: int = 0
    memory: ContextMemory | None = None  # with retrieval: the sequence's memory
    rag: str | None = None  # this request's recall (off, end, chunk); None: the server's
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating at the next token (a client that went away, shutdown); the
        session keeps what was generated."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Worker(threading.Thread):
    """Runs jobs and store operations one after another, decoding running jobs together."""

    def __init__(self, engine: Engine, store: SessionStore | None, max_batch: int,
                 policy: RecallPolicy | None = None, rag: str = "end") -> None:
        super().__init__(name="tttlm-serve-engine", daemon=True)
        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch} must be >= 1")
        self.engine = engine
        self.store = store
        self.max_batch = max_batch
        self.policy = policy  # retrieval (--rag end|chunk): recall before each prompt's end
        self.rag = rag  # the recall of a request that does not choose (with a policy)
        self.bos = engine.config.bos_token_id
        self.inbox: queue.Queue[Job | tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self.inbox = queue.Queue()
        self.waiting: collections.deque[Job] = collections.deque()
        self.batch: list[Job] = []
        self.batch_state: State | None = None
        self.stopping = threading.Event()

    # ------------------------------------------------------------- from other threads
    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise APIError(503, "the server is shutting down; retry on its successor")
        self.inbox.put(job)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the worker thread, between decoding steps."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.stopping.is_set():
            future.set_exception(APIError(503, "the server is shutting down"))
        else:
            self.inbox.put((fn, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Finish: running jobs end at their next token (their sessions saved), queued ones
        are refused."""
        self.stopping.set()
        self.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def run(self) -> None:
        while True:
            self._drain(block=not self.batch and not self.waiting)
            if self.stopping.is_set():
                for job in [*self.batch]:
                    job.cancel()
                while self.waiting:
                    self._fail(self.waiting.popleft(), APIError(503, "the server is shutting "
                                                                     "down; retry later"))
                if not self.batch:
                    self._drain(block=False)
                    return
            while self.waiting and len(self.batch) < self.max_batch:
                self._admit(self.waiting.popleft())
            if self.batch:
                self._guarded(self._step)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if isinstance(item, Job):
                if self.stopping.is_set():
                    self._fail(item, APIError(503, "the server is shutting down; retry later"))
                else:
                    self.waiting.append(item)
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # handed to the waiting request
                        future.set_exception(err)

    def _guarded(self, fn: Callable[[], None]) -> None:
        """A failure of a batched step fails every job of the batch, not the server."""
        try:
            fn()
        except Exception as err:
            log.exception("decoding step failed")
            jobs, self.batch, self.batch_state = self.batch, [], None
            for job in jobs:
                self._fail(job, _as_api_error(err))

    def _admit(self, job: Job) -> None:
        try:
            if time.monotonic() > job.deadline:
                raise APIError(503, "the request timed out waiting for the engine; retry "
                                    "or raise the server's --timeout")
            if job.session_id is not None:
                assert self.store is not None
                job.session = (self.store.new(job.session_id) if job.create
                               else self.store.checkout(job.session_id))
                job.state, unread = job.session.state, job.session.unread
            else:
                job.state, unread = self.engine.new_state(1), []
            tokens = [*unread, *job.prompt]
            if job.state.lengths[0] == 0 and not unread and tokens[:1] != [self.bos]:
                tokens.insert(0, self.bos)  # every sequence begins with BOS, as in training
            if not tokens:
                raise bad_request("the prompt encodes to no tokens; give a prompt", "prompt")
            job.prompt_tokens = len(tokens) - len(unread)
            if job.seed is not None:
                job.generator = torch.Generator(device=job.state.device)
                job.generator.manual_seed(job.seed)
            if self.policy is not None:
                job.memory = (job.session.memory if job.session is not None
                              and job.session.memory is not None
                              else self.policy.new_memory(self.engine))
                if job.session is not None:
                    job.session.memory = job.memory
            rag = job.rag or self.rag
            if job.max_tokens == 0:  # read only (a document): the last token stays unread
                if len(tokens) > 1:
                    self._read(job, tokens[:-1], rag)
                self._finish(job, "length", unread=tokens[-1:])
                return
            if job.memory is not None and rag == "off":
                job.memory.extend(tokens)  # recorded, nothing recalled
            elif job.memory is not None:
                assert self.policy is not None
                # Retrieval: read the head (rag=chunk: recalling before each of its chunks),
                # then the passages the query recalls, then the query (tttlm.memory.recall);
                # the memory records the prompt, not the quotes.
                head, query = self.policy.split(tokens)
                if head:
                    self._read(job, head, rag)
                tokens, _ = self.policy.cue(job.memory, query)
                job.memory.extend(query)
            logits, job.state = self.engine.prefill([tokens], job.state)
            reason = self._sample(job, logits)
            if reason is not None:
                self._finish(job, reason)
            else:
                self.batch_state = (job.state if self.batch_state is None
                                    else State.stack([self.batch_state, job.state]))
                self.batch.append(job)
                job.state = None  # its row of the batch is the state from now on
        except Exception as err:
            self._fail(job, _as_api_error(err))

    def _read(self, job: Job, tokens: list[int], rag: str) -> None:
        """Read ``tokens`` into the job's state (in place) and, with retrieval, its memory
        (``rag="chunk"``: recalling before each chunk)."""
        assert job.state is not None
        if job.memory is None:
            self.engine.prefill([tokens], job.state)
            return
        assert self.policy is not None
        self.policy.read(self.engine, job.state, job.memory, tokens, every_chunk=rag == "chunk")

    def _step(self) -> None:
        assert self.batch_state is not None
        last = [job.generated[-1] for job in self.batch]
        logits, _ = self.engine.step(self.batch_state, last)
        reasons = [self._sample(job, logits[r:r + 1]) for r, job in enumerate(self.batch)]
        done = [r for r, reason in enumerate(reasons) if reason is not None]
        if not done:
            return
        keep = [r for r, reason in enumerate(reasons) if reason is None]
        states = ({done[0]: self.batch_state} if len(self.batch) == 1
                  else {r: self.batch_state.select([r]) for r in done})
        jobs = self.batch
        self.batch = [jobs[r] for r in keep]
        self.batch_state = self.batch_state.select(keep) if keep else None
        for r in done:
            jobs[r].state = states[r]
            self._finish(jobs[r], reasons[r])  # type: ignore[arg-type]

    def _sample(self, job: Job, logits: torch.Tensor) -> str | None:
        """Sample the job's next token from ``logits [1, V]``, emit it; the finish reason
        when the job ends with it."""
        token = int(sample(logits, job.temperature, job.top_k, job.top_p, job.generator)[0])
        job.generated.append(token)
        logprob = top = None
        if job.logprobs is not None:
            logprobs = torch.log_softmax(logits[0].float(), -1)
            logprob = float(logprobs[token])
            if job.logprobs:
                values, ids = torch.topk(logprobs, min(job.logprobs, logprobs.shape[0]))
                top = list(zip(ids.tolist(), values.tolist()))
        stop_token = token in job.stop_ids
        text, stop_string = job.tracker.push(None if stop_token else token)
        job.emit(Delta(token, text, logprob, top))
        if stop_token or stop_string:
            return "stop"
        if (len(job.generated) >= job.max_tokens or job.cancelled
                or time.monotonic() > job.deadline):
            return "length"
        return None

    def _finish(self, job: Job, reason: str, unread: list[int] | None = None) -> None:
        try:
            info = None
            if job.memory is not None and unread is None:
                job.memory.extend(job.generated[:-1])  # read back by the state; last: unread
            if job.session is not None:
                assert self.store is not None and job.state is not None
                job.session.state = job.state
                job.session.unread = unread if unread is not None else job.generated[-1:]
                self.store.checkin(job.session)
                info = job.session.info(in_memory=True)
            done = Done(reason, job.prompt_tokens, len(job.generated), job.tracker.flush(), info)
        except Exception as err:
            self._fail(job, _as_api_error(err))
            return
        # Released before the reply goes out: a client may send its next request to the
        # session the moment it has the reply, and must not find it busy.
        self._release(job)
        try:
            job.emit(done)
        except Exception:  # the client went away; the session is saved
            log.debug("could not deliver a finished reply", exc_info=True)

    def _fail(self, job: Job, error: APIError) -> None:
        # A session's state may be half-updated: it is not checked back in, so the next
        # request reloads the last saved one.
        with contextlib.suppress(Exception):
            job.emit(Failed(error))
        self._release(job)

    def _release(self, job: Job) -> None:
        if job.session_id is not None and self.store is not None:
            self.store.release(job.session_id)


def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, UserError):
        return bad_request(str(err))
    log.error("request failed", exc_info=err)
    return APIError(500, f"internal error: {type(err).__name__}: {err}")
