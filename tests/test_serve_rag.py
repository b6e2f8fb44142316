"""``tttlm serve --rag end``: a prompt's end recalls passages of the session that left the
window and reads them again before it; the session's memory is saved with it and survives
eviction and a restart."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("bm25s")

from test_serve import continue_session, new_session, start, stop  # noqa: E402
from tttlm import TTTConfig, TTTForCausalLM  # noqa: E402

NEEDLE = [200, 201, 202, 203, 204, 205, 206, 207]


DENSE = pytest.param(["--rag-index", "dense"], id="dense", marks=pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed"))


@pytest.mark.parametrize("index", [pytest.param([], id="default"), DENSE])
def test_rag_session_recalls_across_eviction_and_restart(tmp_path: Path,
                                                        index: list[str]) -> None:
    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    model_dir = TTTForCausalLM(config).save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    # The needle at the start, then 20 windows of other tokens (3..150).
    document = [*NEEDLE, *(rng.randrange(3, 150) for _ in range(320))]
    sessions = tmp_path / "sessions"
    server = start(model_dir, sessions, tmp_path / "log", "--rag", "end", *index,
                   "--max-sessions-in-memory", "0")  # every session is evicted after use
    try:
        client = server.client()
        sid = new_session(client, document)["id"]
        before = client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
        assert before == 1 + len(document)
        continue_session(client, sid, NEEDLE[:4], 2)
        # Read: the prompt, 2 new tokens, and one recalled passage (budget: a quarter of the
        # window = 4 tokens) after a separator, then a separator before the query.
        quoted = 1 + 4 + 1
        after = client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
        assert after == before + 4 + 2 + quoted
        (memory,) = [p for p in (sessions / sid).iterdir() if p.name.startswith("memory-")]
        # A dense memory keeps its vectors: a reload does not embed the context again.
        assert (memory / "memory-vectors.npy").is_file() == bool(index)
    finally:
        stop(server)
    server = start(model_dir, sessions, tmp_path / "log", "--rag", "end", *index)
    try:
        client = server.client()
        continue_session(client, sid, NEEDLE[:4], 1)  # the reloaded memory recalls again
        assert client.get(f"/sessions/{sid}", cast_to=object)["tokens"] == after + 4 + 1 + quoted
    finally:
        stop(server)
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_rag_horizon_quotes_a_needle_still_in_the_window(tmp_path: Path) -> None:
    """``--rag-horizon 8`` (window 16): a needle 8-16 tokens back is still in the window, so
    by default it is not in the memory and nothing is quoted; with the horizon its passage is
    indexed and quoted before the query."""
    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    model_dir = TTTForCausalLM(config).save_pretrained(tmp_path / "model")
    rng = random.Random(1)
    document = [*(rng.randrange(3, 150) for _ in range(4)), *NEEDLE,
                *(rng.randrange(3, 150) for _ in range(8))]
    read = {}
    for horizon in ([], ["--rag-horizon", "8"]):
        server = start(model_dir, tmp_path / f"sessions{len(horizon)}", tmp_path / "log",
                       "--rag", "end", *horizon)
        try:
            client = server.client()
            sid = new_session(client, document)["id"]
            before = client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
            continue_session(client, sid, NEEDLE[:4], 2)
            read[len(horizon)] = client.get(f"/sessions/{sid}", cast_to=object)["tokens"] - before
        finally:
            stop(server)
    # the prompt and 2 new tokens; with the horizon also a separator, one passage (budget: a
    # quarter of the window = 4 tokens) and the separator before the query
    assert read == {0: 4 + 2, 2: 4 + 2 + 1 + 4 + 1}
    assert "Traceback" not in (tmp_path / "log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--rag-index", "dense"], "--rag-index dense chooses the index of --rag end"),
    (["--rag", "end", "--rag-index", "vectors"], "rag index 'vectors' is not one of"),
    (["--rag-horizon", "8"], "--rag-horizon 8 sets when --rag end indexes passages"),
    (["--rag", "end", "--rag-horizon", "17"],
     "the recall horizon (17 tokens) must be between 1 and the window (16)"),
])
def test_bad_rag_index_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], message: str) -> None:
    from tttlm.cli import main

    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    model_dir = TTTForCausalLM(config).save_pretrained(tmp_path / "model")
    assert main(["serve", "--model", str(model_dir), "--sessions", str(tmp_path / "s"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm serve: error: ") and message in err and err.count("\n") == 1


def test_rag_chunk_server_and_the_request_switch(tmp_path: Path) -> None:
    import openai

    from test_serve import NAME

    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    model_dir = TTTForCausalLM(config).save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    document = [*NEEDLE, *(rng.randrange(3, 150) for _ in range(160)), *NEEDLE[:4],
                *(rng.randrange(3, 150) for _ in range(12))]

    def ask(client: object, sid: str, rag: str | None) -> None:
        body = {"session_id": sid, "ignore_eos": True, **({"rag": rag} if rag else {})}
        client.completions.create(model=NAME, prompt=NEEDLE[:4], max_tokens=2,  # type: ignore[attr-defined]
                                  temperature=0, extra_body=body)

    server = start(model_dir, tmp_path / "sessions", tmp_path / "log", "--rag", "chunk")
    try:
        client = server.client()
        sid = new_session(client, document)["id"]
        tokens = client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
        assert tokens > 1 + len(document)  # passages quoted before chunks while reading
        ask(client, sid, "off")  # this request recalls nothing: the prompt and 2 tokens
        after_off = client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
        assert after_off == tokens + 4 + 2
        ask(client, sid, "end")  # one passage of 4 between separators before the query
        assert client.get(f"/sessions/{sid}", cast_to=object)["tokens"] == after_off + 4 + 2 + 6
    finally:
        stop(server)
    server = start(model_dir, tmp_path / "plain", tmp_path / "log2")
    try:
        client = server.client()
        sid = new_session(client, document)["id"]
        with pytest.raises(openai.BadRequestError, match="start it with --rag end"):
            ask(client, sid, "end")
        ask(client, sid, "off")
    finally:
        stop(server)
    assert "Traceback" not in (tmp_path / "log").read_text()
