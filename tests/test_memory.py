"""Retrieval memory: a needle from 16x the window away comes back, the recall policy quotes it
before the query, ``rag="off"`` is the engine token for token, and a session with its memory
survives save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import tiny_model
from tttlm.errors import UserError
from tttlm.inference import Engine
from tttlm.memory import BM25Index, ContextMemory, FTS5Index, RecallSession
from tttlm.memory.index import PassageIndex, default_index, fts5_available

needs_fts5 = pytest.mark.skipif(not fts5_available(), reason="this SQLite has no FTS5")


def bm25s_index() -> PassageIndex:
    pytest.importorskip("bm25s")
    return BM25Index()


def fts5_index() -> PassageIndex:
    if not fts5_available():
        pytest.skip("this SQLite has no FTS5")
    return FTS5Index()


INDEXES = pytest.mark.parametrize("new_index", [bm25s_index, fts5_index],
                                  ids=["bm25s", "fts5"])

NEEDLE = [201, 202, 203, 204, 205, 206, 207, 208]


def make() -> Any:
    """A tiny float64 model with a byte-sized vocabulary, window 16, chunks (passages) of 4."""
    return tiny_model(vocab_size=256, window=16, chunk_size=4)


def haystack(length: int, needle_at: int, seed: int = 0) -> list[int]:
    """Filler tokens from 3..150 (so the needle's 201.. are unique), the needle at
    ``needle_at``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 150, (length,), generator=g).tolist()
    tokens[needle_at:needle_at + len(NEEDLE)] = NEEDLE
    return tokens


@INDEXES
def test_index_ranks_the_passage_with_the_phrase_first(new_index: Any) -> None:
    index = new_index()
    index.add([[1, 2, 3, 4], [5, 6, 7], [1, 9, 9], [4, 3, 2, 1]])
    hits = index.search([1, 2, 3], 4)
    assert hits[0][0] == 0  # the exact phrase beats the same tokens in another order (3)
    assert {pid for pid, _ in hits} == {0, 2, 3}  # passage 1 shares nothing
    assert index.search([77], 3) == [] and len(index) == 4


@needs_fts5
def test_default_index_is_fts5_updated_in_place() -> None:
    """Passages added after a search are found, and the results equal those of an index
    built with all passages at once (no stale state from the earlier search)."""
    assert isinstance(default_index(), FTS5Index)
    g = torch.Generator().manual_seed(0)
    passages = torch.randint(3, 60, (40, 8), generator=g).tolist()
    grown, whole = FTS5Index(), FTS5Index()
    whole.add(passages)
    queries = [passages[i][2:6] for i in (3, 17, 35)] + [[7, 8, 9]]
    for cut in (10, 25, 40):
        grown.add(passages[len(grown):cut])
        for q in queries:
            if cut == 40:
                assert grown.search(q, 5) == whole.search(q, 5)
            hits = grown.search(q, 5)
            assert all(pid < cut for pid, _ in hits)
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert grown.search(passages[35][2:6], 1)[0][0] == 35
    assert grown.nbytes() > 0 and len(grown) == 40


@INDEXES
def test_memory_indexes_only_what_left_the_window(new_index: Any) -> None:
    memory = ContextMemory(window=16, passage_len=8, index=new_index())
    memory.extend(list(range(20)))  # 4 tokens outside the window: no whole passage yet
    assert memory.passages == 0
    memory.extend(list(range(20, 40)))  # 24 outside: passages [0, 8) [8, 16) [16, 24)
    assert memory.passages == 3
    assert [p.start for p in memory.recall([17, 18, 19], budget=100)] == [16]
    assert memory.recall([30, 31], budget=100) == []  # still in the window: not recalled


def test_a_needle_from_16_windows_away_is_recalled_and_quoted_before_the_query() -> None:
    model = make()
    engine = Engine(model)
    window, chunk = engine.window, engine.chunk
    assert window is not None
    length = 17 * window
    document = haystack(length, needle_at=8)  # 16+ windows before the question
    session = RecallSession(engine, "end", query_len=4)
    session.read(document)
    before = session.state.lengths[0]
    question = [3, 4, 5, *NEEDLE[:4]]  # asks with the needle's first half
    new = session.generate(question, 3, temperature=0.0)
    assert len(new) == 3
    recalled = session.last_recall
    assert recalled and any(
        NEEDLE[:4] == p.tokens[i:i + 4] for p in recalled for i in range(len(p.tokens)))
    assert sum(len(p.tokens) for p in recalled) <= window // 4
    # Read: the question's head, each passage after a separator, a separator, the query,
    # and the generated tokens.
    quoted = sum(len(p.tokens) + 1 for p in recalled) + 1
    assert session.state.lengths[0] == before + (len(question) - 4) + quoted + 4 + 3
    assert len(session.memory) == length + len(question) + 3  # quotes are not recorded again
    assert session.memory.passage_len == min(chunk, window // 4)


def test_rag_off_is_the_engine_token_for_token() -> None:
    model = make()
    document = haystack(6 * 16, needle_at=4)
    prompt = [5, 6, *NEEDLE[:3]]
    session = RecallSession(Engine(model), "off")
    session.read(document)
    got = session.generate(prompt, 6, temperature=0.0)
    reference = Engine(model)
    _, state = reference.prefill([document])
    want = reference.generate([prompt], 6, temperature=0.0, state=state)
    assert got == want.tokens[0]
    for a, b in zip(session.state.fast, want.state.fast, strict=True):
        assert torch.equal(a, b)


def test_stream_is_generate_token_by_token_and_advances_the_session_at_its_end() -> None:
    model = make()
    window = Engine(model).window
    assert window is not None
    document = haystack(17 * window, needle_at=8)
    question = [3, 4, 5, *NEEDLE[:4]]
    sessions = [RecallSession(Engine(model), "end", query_len=4) for _ in range(2)]
    for s in sessions:
        s.read(document)
    want = sessions[0].generate(question, 5, temperature=0.0, stop=())
    streamed = sessions[1]
    before, recorded = streamed.state.lengths[0], len(streamed.memory)
    stream = streamed.stream(question, 5, temperature=0.0, stop=())
    # The prompt is read when the stream is made: its head, the quotes and the query.
    assert stream.read == stream.state.lengths[0] - before > len(question)
    assert streamed.last_recall == sessions[0].last_recall and streamed.last_recall
    got = [next(stream)[0] for _ in range(4)]
    assert len(streamed.memory) == recorded + len(question) - 4  # the head only, so far
    got += [t[0] for t in stream]
    assert got == want == stream.tokens[0]
    assert streamed.state.lengths[0] == sessions[0].state.lengths[0]
    assert streamed.memory.tokens == sessions[0].memory.tokens
    for a, b in zip(streamed.state.fast, sessions[0].state.fast, strict=True):
        assert torch.equal(a, b)
    assert list(stream) == []  # exhausted: the session advanced once
    assert streamed.memory.tokens == sessions[0].memory.tokens


def test_a_short_horizon_quotes_a_needle_still_in_the_window() -> None:
    """By default only what left the window is indexed; ``horizon`` indexes passages once
    they are that many tokens old, so a needle attention still sees, far from the query, is
    quoted next to it too."""
    model = make()
    window = Engine(model).window
    assert window == 16
    document = haystack(40, needle_at=28)  # 40 - 28 = 12 tokens back: inside the window
    question = [3, 4, 5, *NEEDLE[:4]]
    default = RecallSession(Engine(model), "end", query_len=4)
    near = RecallSession(Engine(model), "end", query_len=4, horizon=4)
    assert default.memory.window == window and near.memory.window == 4
    for session in (default, near):
        session.read(document)
        session.generate(question, 2, temperature=0.0)
    assert not any(NEEDLE[0] in p.tokens for p in default.last_recall)
    assert any(NEEDLE[:4] == p.tokens[i:i + 4] for p in near.last_recall
               for i in range(len(p.tokens)))
    for bad in (0, window + 1):
        with pytest.raises(UserError, match="recall horizon"):
            RecallSession(Engine(model), "end", horizon=bad)


def test_session_with_memory_survives_save_and_load(tmp_path: Path) -> None:
    model = make()
    document = haystack(10 * 16, needle_at=20)
    session = RecallSession(Engine(model), "end", query_len=4)
    session.read(document)
    session.save(tmp_path / "s")
    loaded = RecallSession.load(tmp_path / "s", Engine(model), query_len=4)
    assert loaded.memory.tokens == session.memory.tokens
    assert loaded.memory.passages == session.memory.passages
    prompt = [7, *NEEDLE[:4]]
    a = session.generate(prompt, 4, temperature=0.0)
    b = loaded.generate(prompt, 4, temperature=0.0)
    assert a == b and session.last_recall == loaded.last_recall and session.last_recall


def test_bad_settings_are_user_errors() -> None:
    engine = Engine(make())
    with pytest.raises(UserError, match="rag='sometimes'"):
        RecallSession(engine, "sometimes")
    with pytest.raises(UserError, match="prompt is empty"):
        RecallSession(engine).generate([], 1)


def test_a_plain_text_separator_marks_the_quotes() -> None:
    """``separator``: any tokens (``--rag-separator`` text, encoded) before each passage and
    the query, in place of BOS."""
    model = make()
    engine = Engine(model)
    assert engine.window is not None
    document = haystack(17 * engine.window, needle_at=8)
    session = RecallSession(engine, "end", query_len=4, separator=[10, 10])  # "\n\n" in bytes
    session.read(document)
    before = session.state.lengths[0]
    question = [3, 4, 5, *NEEDLE[:4]]
    context, passages = session.policy.cue(session.memory, question[-4:])
    assert passages and context[:2] == [10, 10] and context[-6:] == [10, 10, *NEEDLE[:4]]
    session.generate(question, 2, temperature=0.0)
    quoted = sum(len(p.tokens) + 2 for p in session.last_recall) + 2
    assert session.state.lengths[0] == before + (len(question) - 4) + quoted + 4 + 2


def test_separator_text_of_the_command_line() -> None:
    from tttlm.memory.recall import separator_tokens

    def encode(text: str) -> list[int]:
        return list(text.encode())

    assert separator_tokens(None, encode) is None  # the policy's default (BOS)
    assert separator_tokens("\\n\\nQuote: ", encode) == tuple(b"\n\nQuote: ")
    assert separator_tokens("→ \\t", encode) == tuple("→ \t".encode())  # non-ASCII survives
    assert separator_tokens("a\\b", encode) == (97, 8)
    for bad in ("", "\\x"):
        with pytest.raises(UserError, match="--rag-separator"):
            separator_tokens(bad, encode)


def test_rag_chunk_quotes_before_each_chunk_once_passages_left_the_window() -> None:
    model = make()
    engine = Engine(model)
    window, chunk = engine.window, engine.chunk
    assert window is not None
    # Within the first window nothing has left it: chunk mode reads as the engine alone.
    short = haystack(window, needle_at=2)
    plain, chunked = RecallSession(Engine(model), "off"), RecallSession(Engine(model), "chunk")
    plain.read(short)
    chunked.read(short)
    assert chunked.quoted_while_reading == 0
    for a, b in zip(plain.state.fast, chunked.state.fast, strict=True):
        assert torch.equal(a, b)
    # A long document: the needle, then 16 windows later its first half again, ending a chunk.
    length = 17 * window
    document = haystack(length, needle_at=8)
    cue_at = 16 * window
    document[cue_at - 4:cue_at] = NEEDLE[:4]
    session = RecallSession(engine, "chunk", query_len=4)
    quotes: list[list[int]] = []
    original = session.policy.quote

    def spy(memory: ContextMemory, query: list[int]) -> Any:
        out = original(memory, query)
        quotes.append([len(memory), *out[0]])
        return out

    object.__setattr__(session.policy, "quote", spy)
    session.read(document)
    assert len(session.memory) == length  # quotes are read, not recorded
    assert session.state.lengths[0] == length + session.quoted_while_reading
    assert session.quoted_while_reading == sum(len(q) - 1 for q in quotes) > 0
    # One recall per chunk boundary once a passage left the window, and the needle's passage
    # (16 windows back: its tokens are nowhere else outside the window) comes back before the
    # chunk after the cue, between separators.
    assert [q[0] for q in quotes] == list(range(window + chunk, length, chunk))
    after_cue = next(q for q in quotes if q[0] == cue_at)[1:]
    bos = model.config.bos_token_id
    assert after_cue[0] == after_cue[-1] == bos
    assert any(after_cue[i:i + 6] == [bos, *NEEDLE[:4], bos] for i in range(len(after_cue)))
    # Deterministic: the same reading again gives the same state.
    again = RecallSession(Engine(model), "chunk", query_len=4)
    again.read(document)
    for a, b in zip(session.state.fast, again.state.fast, strict=True):
        assert torch.equal(a, b)


def test_rag_horizon_on_the_command_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.cli import main

    folder = make().save_pretrained(tmp_path / "model")
    doc = tmp_path / "doc.txt"
    doc.write_text("The key is 4711. " + "Filler text that leaves the window. " * 4)
    args = ["generate", "--model", str(folder), "--document", str(doc), "--prompt",
            "The key is", "--max-new-tokens", "2", "--temperature", "0", "--rag", "end"]
    assert main([*args, "--rag-horizon", "8"]) == 0
    assert "recalled" in capsys.readouterr().err
    assert main([*args, "--rag-horizon", "17"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: the recall horizon (17 tokens) must be "
                          "between 1 and the window (16)") and len(err.splitlines()) == 1

