"""The dense passage index (faiss): the contract of every index against a naive cosine top-k, a
needle recalled from 16 windows away, copies and saves that keep the vectors (and old saves
that still load), the model's own embedder, and ``--rag-index`` on the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_close, tiny_model
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.inference import Engine
from tttlm.memory import (
    CallableEmbedder,
    ContextMemory,
    DenseIndex,
    Embedder,
    FTS5Index,
    ModelEmbedder,
    RecallSession,
)
from tttlm.memory.index import fts5_available
from tttlm.memory.memory import MANIFEST, TOKENS_FILE, VECTORS_FILE
from tttlm.memory.recall import check_index

pytest.importorskip("faiss")

NEEDLE = [201, 202, 203, 204, 205, 206, 207, 208]


class BagOfTokens:
    """A deterministic fake embedder: the sum of one fixed random 64-dim vector per token id
    (seeded by the id), so that a passage holding the query's tokens is its nearest. Counts
    the passages it embeds, to tell reused vectors from embedded ones."""

    dim = 64

    def __init__(self, name: str = "bag-of-tokens") -> None:
        self.name = name
        self.calls = 0
        self.table = np.random.default_rng(0).standard_normal((256, self.dim))

    def embed(self, passages: Sequence[Sequence[int]]) -> np.ndarray:
        self.calls += len(passages)
        return np.stack([self.table[list(p)].sum(0) if len(p) else np.zeros(self.dim)
                         for p in passages]).astype(np.float32)


def table_embedder(vectors: np.ndarray, query: dict[str, np.ndarray] | None = None
                   ) -> CallableEmbedder:
    """Passage ``[i]`` is ``vectors[i]``, passage ``[-1]`` is ``query["q"]``: an index over
    given vectors."""
    return CallableEmbedder(
        lambda passages: np.stack([vectors[p[0]] if p[0] >= 0 else query["q"]  # type: ignore[index]
                                   for p in passages]), vectors.shape[1], "table")


def naive_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Cosine similarity in float64, best first, ties to the earlier passage."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    order = sorted(range(len(vectors)), key=lambda i: (-scores[i], i))
    return [(i, float(scores[i])) for i in order[:k]]


def haystack(length: int, needle_at: int, seed: int = 0) -> list[int]:
    """Filler tokens from 3..150, the needle (201..) at ``needle_at``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 150, (length,), generator=g).tolist()
    tokens[needle_at:needle_at + len(NEEDLE)] = NEEDLE
    return tokens


def test_fake_embedders_are_embedders() -> None:
    assert isinstance(BagOfTokens(), Embedder)
    assert isinstance(ModelEmbedder(tiny_model()), Embedder)


def test_search_is_the_naive_cosine_top_k_with_ties_to_the_earlier_passage() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((60, 8))
    tied = rng.standard_normal(8)
    # 30 equal passages, more than the first request asks for, so that the tie at the k-th
    # place is settled by asking faiss again.
    spots = rng.choice(60, size=30, replace=False)
    vectors[spots] = tied
    vectors = vectors.astype(np.float32)
    query: dict[str, np.ndarray] = {}
    index = DenseIndex(table_embedder(vectors, query))
    index.add([[i] for i in range(25)])
    index.add([[i] for i in range(25, 60)])  # added in two parts, searched as one
    assert len(index) == 60 and index.nbytes() == 60 * 8 * 4
    for q, k in [(tied, 4), (tied, 31), (vectors[3], 5), (rng.standard_normal(8), 100)]:
        query["q"] = q
        hits = index.search([-1], k)
        want = naive_top_k(vectors.astype(np.float64), q, k)
        assert [i for i, _ in hits] == [i for i, _ in want]  # k > len: all 60
        assert_close(np.array([s for _, s in hits]), np.array([s for _, s in want]), atol=1e-5,
                     name="cosine (float32 vs float64)")
    query["q"] = tied
    assert [i for i, _ in index.search([-1], 4)] == sorted(spots)[:4]
    assert index.search([-1], 0) == [] and index.search([], 3) == []
    assert DenseIndex(index.embedder).search([-1], 3) == []


def test_min_score_leaves_out_far_passages() -> None:
    vectors = np.eye(3, dtype=np.float32)
    index = DenseIndex(table_embedder(vectors), min_score=0.5)
    index.add([[0], [1], [2]])
    assert index.search([1], 3) == [(1, pytest.approx(1.0))]


def test_bad_embedder_output_is_a_user_error() -> None:
    index = DenseIndex(CallableEmbedder(lambda passages: np.zeros((len(passages), 3)), 4, "x"))
    with pytest.raises(UserError, match="shape"):
        index.add([[1, 2]])
    index = DenseIndex(CallableEmbedder(lambda p: np.full((len(p), 4), np.nan), 4, "nan"))
    with pytest.raises(UserError, match="non-finite"):
        index.add([[1, 2]])


def test_a_needle_from_16_windows_away_is_recalled() -> None:
    memory = ContextMemory(window=16, passage_len=4, index=DenseIndex(BagOfTokens()))
    memory.extend(haystack(17 * 16, needle_at=8))
    assert memory.passages == 16 * 16 // 4
    [passage] = memory.recall(NEEDLE[:4], budget=4, k=1)
    assert passage.start == 8 and passage.tokens == NEEDLE[:4]
    # Through the recall policy, quoted before the query.
    model = tiny_model(vocab_size=256, window=16, chunk_size=4)
    memory = ContextMemory(window=16, passage_len=4, index=DenseIndex(BagOfTokens()))
    session = RecallSession(Engine(model), "end", query_len=4, memory=memory)
    session.read(haystack(17 * 16, needle_at=8))
    assert len(session.generate([3, 4, 5, *NEEDLE[4:]], 2, temperature=0.0)) == 2
    assert any(p.start == 12 and p.tokens == NEEDLE[4:] for p in session.last_recall)


def test_copy_keeps_the_vectors_and_is_independent() -> None:
    embedder = BagOfTokens()
    memory = ContextMemory(window=16, passage_len=4, index=DenseIndex(embedder))
    memory.extend(haystack(10 * 16, needle_at=40))
    embedded = embedder.calls
    twin = memory.copy()
    assert embedder.calls == embedded  # nothing embedded again
    assert isinstance(twin.index, DenseIndex) and twin.index is not memory.index
    assert np.array_equal(twin.index.vectors(), memory.index.vectors())
    assert twin.recall(NEEDLE[:4], 8) == memory.recall(NEEDLE[:4], 8)
    twin.extend(list(range(3, 67)))
    assert twin.passages == memory.passages + 16 and len(twin) == len(memory) + 64
    assert len(memory.index) == memory.passages  # the original did not grow


def test_lexical_copies_keep_their_settings() -> None:
    if not fts5_available():
        pytest.skip("this SQLite has no FTS5")
    memory = ContextMemory(window=16, passage_len=4, index=FTS5Index(ngram=3))
    memory.extend(haystack(80, needle_at=8))
    twin = memory.copy()
    assert isinstance(twin.index, FTS5Index) and twin.index.ngram == 3
    assert twin.recall(NEEDLE[:4], 8) == memory.recall(NEEDLE[:4], 8)


def test_save_and_load_reuse_the_vectors_of_the_same_embedder(tmp_path: Path) -> None:
    embedder = BagOfTokens()
    memory = ContextMemory(window=16, passage_len=4, index=DenseIndex(embedder))
    memory.extend(haystack(10 * 16, needle_at=40))
    memory.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert meta["version"] == 1 and meta["vectors"]["embedder"] == "bag-of-tokens"
    assert meta["vectors"]["shape"] == [memory.passages, 64]

    reader = BagOfTokens()
    loaded = ContextMemory.load(tmp_path / "m", DenseIndex(reader))
    assert reader.calls == 0  # the saved vectors, not embedded again
    assert np.array_equal(loaded.index.vectors(), memory.index.vectors())
    assert loaded.tokens == memory.tokens and loaded.passages == memory.passages
    assert loaded.recall(NEEDLE[:4], 8) == memory.recall(NEEDLE[:4], 8)

    # Another embedder's name: its own vectors, from the tokens.
    other = BagOfTokens("another-model")
    again = ContextMemory.load(tmp_path / "m", DenseIndex(other))
    assert other.calls == memory.passages
    assert again.recall(NEEDLE[:4], 8) == memory.recall(NEEDLE[:4], 8)

    # A vectors file that is not the one the manifest describes: embedded again.
    (tmp_path / "m" / VECTORS_FILE).write_bytes(b"torn")
    reader = BagOfTokens()
    assert ContextMemory.load(tmp_path / "m", DenseIndex(reader)).passages == memory.passages
    assert reader.calls == memory.passages


def test_save_without_vectors_and_old_saves_load(tmp_path: Path) -> None:
    memory = ContextMemory(window=16, passage_len=4, index=DenseIndex(BagOfTokens()))
    memory.extend(haystack(10 * 16, needle_at=40))
    memory.save(tmp_path / "m")
    memory.save(tmp_path / "m", vectors=False)  # replaces the save: its vectors go
    assert not (tmp_path / "m" / VECTORS_FILE).exists()
    assert "vectors" not in json.loads((tmp_path / "m" / MANIFEST).read_text())
    reader = BagOfTokens()
    loaded = ContextMemory.load(tmp_path / "m", DenseIndex(reader))
    assert reader.calls == memory.passages
    assert np.array_equal(loaded.index.vectors(), memory.index.vectors())

    # A save in the first format, as written before vectors existed.
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / TOKENS_FILE, np.asarray(memory.tokens, dtype=np.int32))
    (old / MANIFEST).write_text(json.dumps({
        "format": "tttlm-memory", "version": 1, "window": 16, "passage_len": 4,
        "tokens": len(memory.tokens)}))
    dense = ContextMemory.load(old, DenseIndex(BagOfTokens()))
    assert dense.recall(NEEDLE[:4], 8) == memory.recall(NEEDLE[:4], 8)
    if fts5_available():
        lexical = ContextMemory.load(old)
        assert lexical.passages == memory.passages and lexical.recall(NEEDLE[:4], 4)
    # And a dense save loads into a lexical index (the vectors are ignored).
    if fts5_available():
        assert ContextMemory.load(tmp_path / "m", FTS5Index()).passages == memory.passages


def test_model_embedder_shape_determinism_and_batch_invariance() -> None:
    torch.manual_seed(0)
    passages = torch.randint(0, 256, (7, 8)).tolist() + [[5, 6, 7], []]
    for dtype, atol in [(torch.float64, 1e-6), (torch.float32, 2e-5)]:
        model = tiny_model(vocab_size=256, window=16, chunk_size=8, dtype=dtype)
        embedder = ModelEmbedder(model, batch_size=3)  # 7 passages of one length: 3 batches
        vectors = embedder.embed(passages)
        assert vectors.shape == (9, 16) and vectors.dtype == np.float32
        assert np.isfinite(vectors).all() and vectors[:8].any(axis=1).all()
        assert not vectors[8].any()  # an empty passage: a zero row
        assert np.array_equal(embedder.embed(passages), vectors)  # deterministic
        for i in (0, 4, 7):
            # float32 outputs of a float64 model; a float32 model's batched products may
            # round differently from a single row's.
            assert_close(embedder.embed([passages[i]])[0], vectors[i], atol=atol,
                         name=f"passage {i} alone vs in a batch ({dtype})")
        # The mean of the hidden states the head reads.
        ids = torch.tensor(passages[:2])
        head = model(ids, ttt=False).logits
        assert_close(model.hidden_states(ids) @ model.head_weight.mT, head, atol=1e-4,
                     name="hidden_states -> head")
        assert_close(vectors[:2], model.hidden_states(ids).float().mean(1).detach(),
                     atol=1e-6, name="mean pooling")
    assert ModelEmbedder(tiny_model(seed=0)).name != ModelEmbedder(tiny_model(seed=1)).name
    assert ModelEmbedder(tiny_model()).name != ModelEmbedder(tiny_model().float()).name


def test_recall_session_with_the_models_own_index_survives_save_and_load(
        tmp_path: Path) -> None:
    model = tiny_model(vocab_size=256, window=16, chunk_size=4)
    session = RecallSession(Engine(model), "end", query_len=4, index="dense")
    assert isinstance(session.memory.index, DenseIndex)
    session.read(haystack(10 * 16, needle_at=20))
    session.save(tmp_path / "s")
    loaded = RecallSession.load(tmp_path / "s", Engine(model), query_len=4, index="dense")
    assert isinstance(loaded.memory.index, DenseIndex)
    assert np.array_equal(loaded.memory.index.vectors(), session.memory.index.vectors())
    prompt = [7, *NEEDLE[:4]]
    assert session.generate(prompt, 3, temperature=0.0) == \
        loaded.generate(prompt, 3, temperature=0.0)
    assert session.last_recall == loaded.last_recall and session.last_recall
    assert session.memory.copy().recall(NEEDLE[:4], 8) == session.memory.recall(NEEDLE[:4], 8)


def test_index_choice_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="rag index 'faiss' is not one of fts5, bm25, dense"):
        check_index("faiss")
    with pytest.raises(UserError, match="rag index"):
        RecallSession(Engine(tiny_model(window=16, chunk_size=4)), index="nope")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(UserError, match=r"pip install 'tttlm\[retrieval\]'"):
        check_index("dense")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    return TTTForCausalLM(config).save_pretrained(tmp_path_factory.mktemp("model"))


def generate_args(model_dir: Path, tmp_path: Path) -> list[str]:
    """``tttlm generate`` over a document whose key has left the window by the question."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The key is 4711. " + "Filler text that leaves the window. " * 8)
    return ["generate", "--model", str(model_dir), "--document", str(doc), "--prompt",
            "The key is", "--max-new-tokens", "4", "--temperature", "0"]


def test_generate_with_the_dense_index(model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = generate_args(model_dir, tmp_path)
    assert main([*args, "--rag", "end", "--rag-index", "dense"]) == 0
    err = capsys.readouterr().err
    assert "recalled" in err and "tok/s" in err
    assert main([*args, "--rag", "end", "--rag-index", "faiss"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: rag index 'faiss' is not one of")
    assert len(err.strip().splitlines()) == 1
    assert main([*args, "--rag-index", "dense"]) == 2  # without --rag end
    assert "add --rag end" in capsys.readouterr().err
    assert main([*args, "--rag", "end", "--save-session", str(tmp_path / "s")]) == 2
    assert "this run only" in capsys.readouterr().err


def test_eval_niah_refuses_a_bad_index_before_loading(model_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "niah", "--model", str(model_dir), "--lengths", "64", "--rag", "end",
                 "--rag-index", "nope", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm eval niah: error: rag index 'nope'")


def test_rag_separator_on_the_command_lines(model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = generate_args(model_dir, tmp_path)
    assert main([*args, "--rag", "end", "--rag-separator", "\\n\\nQuote: "]) == 0
    assert "recalled" in capsys.readouterr().err
    assert main([*args, "--rag-separator", "\\n"]) == 2  # without --rag end
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: --rag-separator marks the passages of")
    assert len(err.strip().splitlines()) == 1
    assert main([*args, "--rag", "end", "--rag-separator", ""]) == 2
    assert "encodes to no tokens" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", str(model_dir), "--lengths", "64",
                 "--rag-separator", "\\n", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "add --rag end" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--rag-separator", "\\n"]) == 2
    assert "add --rag end" in capsys.readouterr().err


def test_generate_recalls_before_each_chunk(model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = generate_args(model_dir, tmp_path)
    assert main([*args, "--rag", "chunk"]) == 0
    err = capsys.readouterr().err
    assert "tokens quoted before chunks while reading" in err
    assert main([*args, "--rag", "chunk", "--save-session", str(tmp_path / "s")]) == 2
