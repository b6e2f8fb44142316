"""``tttlm serve`` driven by the official ``openai`` client against a real server process.

One server (a tiny float64 model, at most one idle session in memory, an API key) serves most
tests; the crash test starts its own twice. Sessions are compared token for token with one
long greedy ``Engine.generate`` in this process, on the same weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tttlm import TTTConfig, TTTForCausalLM  # noqa: E402
from tttlm.cli import main  # noqa: E402
from tttlm.files import FolderLock  # noqa: E402
from tttlm.inference import Engine  # noqa: E402

KEY = "test-key"
NAME = "tiny"
BOS = 1


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def client(self, **options: Any) -> Any:
        settings = {"api_key": KEY, "max_retries": 0, "timeout": 30, **options}
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", **settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model_dir: Path, sessions: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TTTLM_API_KEY": KEY}
    args = [sys.executable, "-m", "tttlm.cli", "serve", "--model", str(model_dir), "--port",
            str(port), "--sessions", str(sessions), "--dtype", "float64", "--model-name", NAME,
            "--log-level", "warning", *extra]
    with open(log, "ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log)
    deadline = time.monotonic() + 60
    try:
        client = server.client(timeout=2)
        while True:
            try:
                client.models.list()
                return server
            except openai.APIConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the server did not start:\n"
                                         + log.read_text()) from None
                time.sleep(0.2)
    except BaseException:
        stop(server, signal.SIGKILL)
        raise


def stop(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.process.poll() is None:
        server.process.send_signal(sig)
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # Byte-level vocabulary (256): the server falls back to the byte tokenizer.
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    return TTTForCausalLM(config).save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(TTTForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval())


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    # --ttt-group 2: requests read together learn two at a time, and must still equal the
    # engine's one-sequence results (test_concurrent_requests_are_decoded_together_and_exactly)
    running = start(model_dir, root / "sessions", root / "server.log",
                    "--max-sessions-in-memory", "1", "--max-tokens", "3000",
                    "--max-request-bytes", "100000", "--ttt-group", "2")
    yield running
    stop(running)
    # uvicorn re-raises the signal it shut down for, after a clean shutdown.
    assert running.process.returncode in (0, -signal.SIGTERM), running.log.read_text()
    assert "Traceback" not in running.log.read_text()


def expected(engine: Engine, ids: list[int], n: int) -> list[int]:
    """One long greedy generation with no stop token."""
    return engine.generate([ids], n, temperature=0.0, stop=()).tokens[0]


def token_ids(response: Any) -> list[int]:
    return list(response.choices[0].model_extra["token_ids"])


def new_session(client: Any, document: list[int] | str | None = None, **body: Any) -> Any:
    if document is not None:
        body["document"] = document
    return client.post("/sessions", body=body, cast_to=object)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


def continue_session(client: Any, session: str, prompt: list[int] | str, n: int,
                     **extra: Any) -> list[int]:
    body = {**GREEDY["extra_body"], "session_id": session}
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                    extra_body=body, **extra)
    assert out.model_extra["session_id"] == session
    return token_ids(out)


# ------------------------------------------------------------------------------ basics
def test_models_and_health(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.get("/models", cast_to=object)["object"] == "list"


def test_completion_stream_equals_whole(server: Server, engine: Engine) -> None:
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="Hello", max_tokens=12, **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == 6  # BOS + 5
    assert token_ids(whole) == expected(engine, [BOS, *b"Hello"], 12)
    chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=12,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [t for c in chunks for t in c.choices[0].model_extra.get("token_ids") or []] \
        == token_ids(whole)


def test_sampling_settings_and_logprobs(server: Server) -> None:
    client = server.client()
    args = dict(model=NAME, prompt=[BOS, 10, 20, 30], max_tokens=8, temperature=0.9, top_p=0.9,
                seed=7, extra_body={"top_k": 20, "return_token_ids": True, "ignore_eos": True})
    a, b = client.completions.create(**args), client.completions.create(**args)
    assert token_ids(a) == token_ids(b)  # a seed makes sampling reproducible
    out = client.completions.create(**{**args, "logprobs": 3})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    # stop strings end the text before them
    text = client.completions.create(**{**args, "max_tokens": 30}).choices[0].text
    cut = text[3:5]
    if cut:
        stopped = client.completions.create(**{**args, "max_tokens": 30, "stop": [cut]})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[:text.find(cut)]


def test_chat_whole_and_streamed(server: Server) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=2)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    # The default template: "System: ...\nUser: ...\nAssistant:" after BOS.
    assert whole.usage.prompt_tokens == 1 + len("System: Be brief.\nUser: Hi\nAssistant:")
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


# ---------------------------------------------------------------------------- sessions
def test_session_over_three_requests_equals_one_generation(server: Server,
                                                           engine: Engine) -> None:
    client = server.client()
    document = list(range(3, 40))  # crosses several chunks of 8
    session = new_session(client, document)
    sid = session["id"]
    assert session["tokens"] == 1 + len(document)
    got = continue_session(client, sid, [50, 51, 52], 7)
    # Another session takes the only memory slot: the first is evicted to disk...
    other = new_session(client, "another document")
    continue_session(client, other["id"], " more", 3)
    assert client.get(f"/sessions/{sid}", cast_to=object)["in_memory"] is False
    # ...and reloaded from it; an empty prompt continues where the last reply stopped.
    got += continue_session(client, sid, "", 6)
    got += continue_session(client, sid, "", 9, extra_headers={"X-Session-Id": sid})
    assert got == expected(engine, [BOS, *document, 50, 51, 52], 22)
    assert client.get(f"/sessions/{sid}", cast_to=object)["tokens"] == 1 + len(document) + 25


def test_fork_and_delete(server: Server, engine: Engine) -> None:
    client = server.client()
    sid = new_session(client, [5, 6, 7, 8, 9], session_id="forkme")["id"]
    assert sid == "forkme"
    fork = client.post(f"/sessions/{sid}/fork", body={"session_id": "forked"}, cast_to=object)
    assert fork["id"] == "forked" and fork["tokens"] == 6
    # Copy-on-write: the fork's state is the parent's files, hard-linked, not copies.
    sessions = server.log.parent / "sessions"

    def files(session: str) -> dict[str, int]:
        meta = json.loads((sessions / session / "serve.json").read_text())
        return {p.name: p.stat().st_ino for p in (sessions / session / meta["state"]).iterdir()
                if not p.name.startswith(".")}

    assert files("forked") == files(sid) and "session.json" in files(sid)
    a = continue_session(client, "forked", [11], 5)
    b = continue_session(client, sid, [11], 5)
    assert a == b == expected(engine, [BOS, 5, 6, 7, 8, 9, 11], 5)
    ids = {s["id"] for s in client.get("/sessions", cast_to=object)["data"]}
    assert {"forkme", "forked"} <= ids
    assert client.delete("/sessions/forked", cast_to=object)["deleted"] is True
    with pytest.raises(openai.NotFoundError, match="session forked does not exist"):
        continue_session(client, "forked", [11], 1)
    with pytest.raises(openai.ConflictError, match="exists already"):
        new_session(client, session_id="forkme")


def test_concurrent_request_to_one_session_is_409(server: Server) -> None:
    client = server.client()
    sid = new_session(client, "busy")["id"]
    stream = client.completions.create(model=NAME, prompt="x", max_tokens=2500, stream=True,
                                       extra_body={"session_id": sid, "ignore_eos": True})
    next(iter(stream))  # the first request is running
    with pytest.raises(openai.ConflictError, match=f"session {sid} is busy"):
        client.completions.create(model=NAME, prompt="y", max_tokens=1,
                                  extra_body={"session_id": sid})
    # Other sessions and plain requests are served meanwhile (decoded in the same batch).
    other = new_session(client, "free")["id"]
    assert continue_session(client, other, "z", 2)
    stream.close()  # the client goes away: the generation stops, the session keeps it
    deadline = time.monotonic() + 20
    while True:
        try:
            continue_session(client, sid, "", 1)
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert client.get(f"/sessions/{sid}", cast_to=object)["tokens"] < 2500


def test_concurrent_requests_are_decoded_together_and_exactly(server: Server,
                                                              engine: Engine) -> None:
    """Requests at different positions of their chunks share decoding steps; each gets what
    it would get alone."""
    client = server.client()
    prompts = [[BOS, *range(3, 3 + n)] for n in (2, 5, 9, 14)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: client.completions.create(
            model=NAME, prompt=p, max_tokens=20, **GREEDY), prompts))
    assert [token_ids(o) for o in outs] == [expected(engine, p, 20) for p in prompts]


def test_bad_requests_are_4xx_with_a_message(server: Server, model_dir: Path) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="over the server's limit of 3000"):
        client.completions.create(model=NAME, prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="token id 999, outside"):
        client.completions.create(model=NAME, prompt=[1, 999])
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model=NAME, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.NotFoundError, match="session nope does not exist"):
        client.completions.create(model=NAME, prompt="x", extra_body={"session_id": "nope"})
    with pytest.raises(openai.BadRequestError, match="not a valid id"):
        client.completions.create(model=NAME, prompt="x", extra_body={"session_id": "../x"})
    with pytest.raises(openai.APIStatusError, match="over the server's limit of 100000 bytes") \
            as big:
        client.completions.create(model=NAME, prompt="x" * 200_000)
    assert big.value.status_code == 413
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(api_key="wrong").models.list()


def test_a_second_server_on_the_same_sessions_is_refused(
        server: Server, model_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    args = list(server.process.args)  # type: ignore[arg-type]
    sessions = args[args.index("--sessions") + 1]
    assert main(["serve", "--model", str(model_dir), "--sessions", str(sessions),
                 "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm serve: error: ") and "in use by `tttlm serve`" in err
    assert err.count("\n") == 1


# ------------------------------------------------------------------------------ crashes
def test_kill_9_loses_at_most_the_request_in_flight(model_dir: Path, engine: Engine,
                                                    tmp_path: Path) -> None:
    sessions, log = tmp_path / "sessions", tmp_path / "server.log"
    first = start(model_dir, sessions, log)
    try:
        client = first.client()
        sid = new_session(client, [7, 8, 9, 10])["id"]
        got = continue_session(client, sid, [20], 6)
        # ignore_eos: sampled at temperature 1, the request could end on an EOS (and be
        # saved, as a completed request is) before the kill lands; it must still be running
        stream = client.completions.create(model=NAME, prompt="lost", max_tokens=2000,
                                           stream=True, extra_body={"session_id": sid,
                                                                    "ignore_eos": True})
        next(iter(stream))
    finally:
        stop(first, signal.SIGKILL)  # mid-request
    second = start(model_dir, sessions, log, "--shutdown-timeout", "1")
    try:
        client = second.client()
        assert client.get(f"/sessions/{sid}", cast_to=object)["tokens"] == 5 + 1 + 6
        got += continue_session(client, sid, "", 5)
        assert got == expected(engine, [BOS, 7, 8, 9, 10, 20], 11)
        # A graceful shutdown ends a running request early and saves its session.
        stream = client.completions.create(model=NAME, prompt="", max_tokens=2000,
                                           stream=True, extra_body={"session_id": sid,
                                                                    "ignore_eos": True})
        next(iter(stream))
    finally:
        stop(second)
    assert second.process.returncode in (0, -signal.SIGTERM), log.read_text()
    tokens = json.loads((sessions / sid / "serve.json").read_text())["tokens"]
    assert 5 + 1 + 11 < tokens < 5 + 1 + 11 + 2000
    with FolderLock(sessions, "test"):  # released
        pass
