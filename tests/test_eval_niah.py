"""Needle in a haystack: exact, deterministic prompts; scoring with known answers; CLI."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import memory_windows, stand_in_cuda_graphs
from tttlm.cli import main
from tttlm.config import TTTConfig
from tttlm.data.tokenizer import ByteTokenizer
from tttlm.eval import niah
from tttlm.eval.adapters import (
    EvalError,
    TokenCorpus,
    builtin_books,
    generate_and_score,
    generate_and_score_batch,
    read_documents,
    tokenize_documents,
)
from tttlm.eval.common import EvalModel, load_model
from tttlm.eval.niah import NeedleKind, NiahSettings, Prediction
from tttlm.model import TTTForCausalLM

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def haystack() -> niah.Haystack:
    docs = read_documents(builtin_books("val")[0])
    # The first 20K characters of each held-out book: real text, fast to tokenize.
    return niah.build_haystack(tokenize_documents([(n, t[:20_000]) for n, t in docs], TOK,
                                                  "books"), TOK)


def save_tiny(path: Path, variant: str = "e2e", window: int = 16, chunk: int = 8) -> Path:
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=258, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, variant=variant, window=window, chunk_size=chunk,
                       bos_token_id=256, eos_token_id=257)
    TTTForCausalLM(config).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ samples
@pytest.mark.parametrize("kind", list(NeedleKind))
@pytest.mark.parametrize("length", [420, 1001])
def test_sample_is_exact(haystack: niah.Haystack, kind: NeedleKind, length: int) -> None:
    for depth in (0.0, 0.3, 0.5, 1.0):
        s = niah.build_sample(haystack, TOK, kind, length, depth, trial=1, seed=7)
        ids = list(s.input_ids)
        assert len(ids) == length
        assert ids[0] == TOK.bos_id
        assert ids[s.needle_start:s.needle_end] == TOK.encode(
            " " + niah.needle_text(kind, s.key, s.value) + " ")
        assert ids[s.question_start:] == TOK.encode("\n\n" + niah.question_text(kind, s.key))
        assert s.haystack_start <= s.needle_start < s.needle_end <= s.question_start
        # The haystack around the needle is one contiguous (cyclic) stretch of the pool.
        hay = ids[s.haystack_start:s.needle_start] + ids[s.needle_end:s.question_start]
        pool = haystack.tokens
        expected = pool[(s.pool_offset + np.arange(len(hay))) % len(pool)].tolist()
        assert hay == expected
        assert abs(s.actual_depth - depth) <= max(8, len(hay) // 50) / len(hay)
        assert list(s.answer_ids) == TOK.encode(" " + s.value)
        if depth == 0.0:
            assert s.needle_start == s.haystack_start
        if depth == 1.0:
            assert s.needle_end == s.question_start


def test_samples_are_deterministic(haystack: niah.Haystack) -> None:
    a = niah.build_sample(haystack, TOK, "number", 600, 0.5, trial=2, seed=3)
    assert a == niah.build_sample(haystack, TOK, "number", 600, 0.5, trial=2, seed=3)
    other_seed = niah.build_sample(haystack, TOK, "number", 600, 0.5, trial=2, seed=4)
    other_trial = niah.build_sample(haystack, TOK, "number", 600, 0.5, trial=3, seed=3)
    assert a.input_ids != other_seed.input_ids and a.input_ids != other_trial.input_ids
    # Depths of one trial move the same needle through the same haystack.
    deeper = niah.build_sample(haystack, TOK, "number", 600, 0.9, trial=2, seed=3)
    assert (deeper.value, deeper.pool_offset) == (a.value, a.pool_offset)
    assert deeper.needle_start > a.needle_start
    assert len(a.value) == 7 and a.value.isdigit() and a.value[0] != "0"


def test_short_pool_wraps_and_short_length_is_refused() -> None:
    corpus = tokenize_documents([("d", "One sentence. Two sentences.")], TOK, "tiny")
    small = niah.build_haystack(corpus, TOK)
    s = niah.build_sample(small, TOK, "passkey", 500, 0.5)
    assert len(s.input_ids) == 500 and s.question_start - s.needle_end > len(small.tokens)
    with pytest.raises(EvalError, match="too short for a uuid needle.*at least"):
        niah.build_sample(small, TOK, "uuid", 100, 0.5)


def test_unknown_kind_and_bad_depth(haystack: niah.Haystack) -> None:
    with pytest.raises(EvalError, match="unknown needle kind 'essay'.*passkey, number, uuid"):
        niah.parse_kinds("passkey,essay")
    assert niah.parse_kinds("uuid, passkey,uuid") == [NeedleKind.UUID, NeedleKind.PASSKEY]
    with pytest.raises(EvalError, match="outside"):
        niah.build_sample(haystack, TOK, "passkey", 500, 1.5)


# ------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize(("prediction", "value", "correct"), [
    (" 71432", "71432", True),
    ("71432.", "71432", True),
    (' "71432", I think', "71432", True),
    ("\n71432\nWhat", "71432", True),
    (" 7143", "71432", False),
    (" 714320", "71432", False),
    (" the pass key is 71432", "71432", False),
    ("", "71432", False),
    (" 0A1B2C3D-0000-4000-8000-000000000000.", "0a1b2c3d-0000-4000-8000-000000000000", True),
])
def test_score_answer(prediction: str, value: str, correct: bool) -> None:
    assert niah.score_answer(prediction, value) is correct


def _settings(**kw) -> NiahSettings:
    base = dict(kinds=list(NeedleKind), lengths=[420, 500], depths=[0.0, 0.5, 1.0], samples=3)
    return NiahSettings(**{**base, **kw})


def test_value_predictor_scores_one(haystack: niah.Haystack) -> None:
    settings = _settings()
    records = niah.evaluate_niah("oracle", haystack, TOK, settings, lambda s: f" {s.value}.")
    assert len(records) == 3 * 2 * 3 * 3 and all(r["correct"] for r in records)
    grids = niah.aggregate(records, settings.kinds, settings.lengths, settings.depths)
    for grid in grids.values():
        assert grid["accuracy"] == [[1.0, 1.0]] * 3 and grid["samples"] == [[3, 3]] * 3
        assert grid["overall_accuracy"] == 1.0


def test_constant_predictor_scores_chance(haystack: niah.Haystack) -> None:
    # One-digit values: a constant answer is right exactly when the value happens to be it.
    settings = _settings(kinds=[NeedleKind.PASSKEY, NeedleKind.NUMBER], lengths=[420],
                         depths=[0.5], samples=300, digits=1)
    records = niah.evaluate_niah("constant", haystack, TOK, settings, lambda s: " 7")
    for kind in ("passkey", "number"):
        mine = [r for r in records if r["kind"] == kind]
        hits = sum(r["value"] == "7" for r in mine)
        acc = niah.aggregate(records, [kind], [420], [0.5])[kind]["accuracy"][0][0]
        assert acc == hits / 300
        # Chance is 1/10; 300 draws put the rate within [0.04, 0.17] with p > 0.999.
        assert 0.04 <= acc <= 0.17
    assert niah.chance_accuracy("passkey", 1) == 0.1
    uuid_records = niah.evaluate_niah("constant", haystack, TOK,
                                      _settings(kinds=["uuid"], samples=5),
                                      lambda s: " 00000000-0000-4000-8000-000000000000")
    assert not any(r["correct"] for r in uuid_records)


def test_chance_rate_of_random_values() -> None:
    rng = random.Random(0)
    values = [niah.make_value(NeedleKind.PASSKEY, rng, 1) for _ in range(2000)]
    assert niah.accuracy([" 3"] * len(values), values) == pytest.approx(0.1, abs=0.025)
    assert niah.accuracy(values, values) == 1.0


def test_aggregate_known_grid() -> None:
    records = [{"kind": "passkey", "length": L, "depth": d, "correct": c, "logprob": lp,
                "answer_tokens": 2}
               for L, d, c, lp in [(100, 0.0, True, -2.0), (100, 0.0, False, -4.0),
                                   (200, 0.0, False, -6.0), (100, 1.0, True, None)]]
    grid = niah.aggregate(records, ["passkey"], [100, 200], [0.0, 1.0])["passkey"]
    assert grid["accuracy"] == [[0.5, 0.0], [1.0, None]]
    assert grid["samples"] == [[2, 1], [1, 0]]
    assert grid["logprob"] == [[-3.0, -6.0], [None, None]]
    assert grid["logprob_per_token"] == [[-1.5, -3.0], [None, None]]
    assert grid["by_length"] == [0.75, 0.0]


def test_resume_skips_done_samples(haystack: niah.Haystack, tmp_path: Path) -> None:
    calls = []

    def predictor(sample: niah.NiahSample) -> Prediction:
        calls.append(sample)
        return Prediction(" nope", -1.0)

    settings = _settings(kinds=["passkey"], samples=2)
    first = niah.evaluate_niah("m", haystack, TOK, settings, predictor, out_dir=tmp_path)
    assert len(calls) == 12
    again = niah.evaluate_niah("m", haystack, TOK, settings, predictor, out_dir=tmp_path)
    assert len(calls) == 12 and again == first
    niah.evaluate_niah("m", haystack, TOK, _settings(kinds=["passkey"], samples=3), predictor,
                       out_dir=tmp_path)
    assert len(calls) == 12 + 6  # only the new trial


# --------------------------------------------------------------------------- with models
def reference_generate_and_score(model: TTTForCausalLM, prompt: Sequence[int],
                                 max_new_tokens: int, answer: Sequence[int] = (), *,
                                 ttt: bool | None = None,
                                 eos_id: int | None = None) -> tuple[list[int], float | None]:
    """:func:`generate_and_score` by full forward passes (one per new token): quadratic, the
    reference the engine path is checked against. The forward pass makes the same inner
    updates at the same chunk boundaries as prefill + decode, so both must agree."""
    device = model.embed.weight.device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, T]
    bos = model.config.bos_token_id
    out: list[int] = []
    for _ in range(max_new_tokens):
        # The last target is unknown: a dummy label, not counted, so no update learns from it.
        labels = torch.cat([ids[:, 1:], ids.new_zeros(1, 1)], 1)
        mask = labels != bos
        mask[:, -1] = False
        result = model(ids, labels=labels, loss_mask=mask, ttt=ttt, return_logits=True)
        assert result.logits is not None
        token = int(result.logits[0, -1].argmax())
        if token == eos_id:
            break
        out.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], 1)
    if not answer:
        return out, None
    full = torch.tensor([[*prompt, *answer]], dtype=torch.long, device=device)  # [1, T + A]
    labels = full[:, 1:]
    result = model(full[:, :-1], labels=labels, loss_mask=labels != bos, ttt=ttt)
    assert result.token_nll is not None
    return out, -float(result.token_nll[0, len(prompt) - 1:].double().sum())


def test_engine_generation_matches_forward_reference(tmp_path: Path) -> None:
    # float64 so that greedy choices cannot flip on rounding; the prompt (45 tokens) ends
    # inside a chunk and the 12 new tokens cross two chunk boundaries.
    model = TTTForCausalLM.from_pretrained(save_tiny(tmp_path / "e2e"), dtype=torch.float64)
    prompt = [256, *torch.randint(0, 256, (44,), generator=torch.Generator().manual_seed(1))
              .tolist()]
    answer = [49, 50, 51, 52, 53, 54, 55, 56, 57, 58]
    with torch.inference_mode():
        fast = generate_and_score(model, prompt, 12, answer, eos_id=257)
        slow = reference_generate_and_score(model, prompt, 12, answer, eos_id=257)
        no_ttt = generate_and_score(model, prompt, 4, answer, ttt=False, eos_id=257)
        no_ttt_ref = reference_generate_and_score(model, prompt, 4, answer, ttt=False,
                                                  eos_id=257)
    assert fast[0] == slow[0]
    assert fast[1] == pytest.approx(slow[1], abs=1e-9)
    assert no_ttt[0] == no_ttt_ref[0] and no_ttt[1] == pytest.approx(no_ttt_ref[1], abs=1e-9)
    assert no_ttt[1] != pytest.approx(fast[1], abs=1e-6)


@pytest.mark.parametrize("variant", ["e2e", "full"])
def test_batched_generation_equals_one_prompt_at_a_time(tmp_path: Path, variant: str) -> None:
    """Rows of different lengths, answer lengths, token budgets (one of them 0), an empty
    answer and an EOS that stops one row early: each row as generate_and_score gives it."""
    model = TTTForCausalLM.from_pretrained(save_tiny(tmp_path / variant, variant),
                                           dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    prompts = [[256, *torch.randint(0, 256, (n,), generator=g).tolist()]
               for n in (44, 44, 37, 51)]
    budgets = [12, 3, 0, 9]
    answers = [[49, 50, 51], [], [52] * 11, [53, 54]]
    with torch.inference_mode():
        alone = [generate_and_score(model, p, n, a, eos_id=257)
                 for p, n, a in zip(prompts, budgets, answers)]
        eos = alone[0][0][4]  # a token row 0 generates: it stops there when it is EOS
        alone_eos = [generate_and_score(model, p, n, a, eos_id=eos)
                     for p, n, a in zip(prompts, budgets, answers)]
        together = generate_and_score_batch(model, prompts, budgets, answers, eos_id=257)
        together_eos = generate_and_score_batch(model, prompts, budgets, answers, eos_id=eos)
    assert len(alone_eos[0][0]) < len(alone[0][0])
    for got, want in [*zip(together, alone), *zip(together_eos, alone_eos)]:
        assert got[0] == want[0]
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            assert got[1] == pytest.approx(want[1], abs=1e-9)
    assert together[2][0] == [] and together[1][1] is None


def test_batched_niah_gives_the_same_records(haystack: niah.Haystack, tmp_path: Path) -> None:
    model = TTTForCausalLM.from_pretrained(save_tiny(tmp_path / "e2e", window=64, chunk=64),
                                           dtype=torch.float64)
    em = EvalModel(model=model, label="m", path="m", ttt=True, fingerprint="f")
    settings = _settings(kinds=["passkey", "number"], samples=2)
    predictor = niah.model_predictor(em, TOK)
    sizes: list[int] = []
    batch = predictor.batch

    def counting(samples):  # type: ignore[no-untyped-def]
        sizes.append(len(samples))
        assert len({s.length for s in samples}) == 1  # one prompt length per batch
        return batch(samples)

    predictor.batch = counting
    one = niah.evaluate_niah("m", haystack, TOK, settings, predictor, batch_size=1)
    assert sizes == [1] * len(one)
    sizes.clear()
    # Half done before (a cut run): the rest goes in batches of up to 5.
    niah.evaluate_niah("m", haystack, TOK, _settings(kinds=["passkey"], samples=2), predictor,
                       out_dir=tmp_path / "out", batch_size=5)
    sizes.clear()
    many = niah.evaluate_niah("m", haystack, TOK, settings, predictor,
                              out_dir=tmp_path / "out", batch_size=5)
    assert sizes == [5, 1, 5, 1]  # the 6 "number" cells left at each length, 5 at a time
    for a, b in zip(one, many):
        assert a["prediction"] == b["prediction"] and a["correct"] == b["correct"]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-9)
        assert (a["kind"], a["length"], a["depth"], a["trial"]) == (
            b["kind"], b["length"], b["depth"], b["trial"])
    with pytest.raises(EvalError, match="batch size 0 must be positive"):
        niah.evaluate_niah("m", haystack, TOK, settings, predictor, batch_size=0)


def test_cli_niah_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny(tmp_path / "e2e", window=64, chunk=64)  # few inner steps: fast
    hay = tmp_path / "hay.txt"
    hay.write_text("The cat sat on the mat. It was warm. The dog slept by the door.\n" * 20)
    out = tmp_path / "out"
    args = ["eval", "niah", "--model", str(model), "--tokenizer", "bytes", "--haystack",
            str(hay), "--lengths", "420,460", "--depths", "0,1", "--kinds", "passkey",
            "--samples", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "niah.json").read_text())
    grid = report["results"]["e2e"]["passkey"]
    assert grid["lengths"] == [420, 460] and grid["depths"] == [0.0, 1.0]
    assert all(v in (0.0, 1.0) for row in grid["accuracy"] for v in row)
    assert all(v < 0 for row in grid["logprob"] for v in row)
    samples = report["samples"]["e2e"]
    assert len(samples) == 4 and all(len(s["value"]) == 5 for s in samples)
    assert (out / "niah_accuracy.png").stat().st_size > 0
    assert "passkey" in capsys.readouterr().out

    assert main([*args[:-5], "--kinds", "passkey,essay", "--out", str(out), "--quiet"]) == 2
    assert "unknown needle kind 'essay'" in capsys.readouterr().err
    bad = [a if a != "420,460" else "50" for a in args]
    assert main(bad) == 2
    assert "too short for a passkey needle" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "nothing"), *args[4:]]) == 2
    assert "not a tttlm model directory" in capsys.readouterr().err


def test_vocabulary_mismatch_is_refused(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, variant="full", window=16, chunk_size=8)
    TTTForCausalLM(config).save_pretrained(tmp_path / "small")
    assert main(["eval", "niah", "--model", str(tmp_path / "small"), "--tokenizer", "bytes",
                 "--lengths", "500", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "vocab_size 200" in capsys.readouterr().err
    assert load_model(tmp_path / "small").label == "small"
    with pytest.raises(EvalError, match="no text"):
        niah.build_haystack(TokenCorpus(np.array([256]), np.zeros(1, np.int64), 256, "x", "x"),
                            TOK)


# ---------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("kind", list(NeedleKind))
def test_retrieval_quotes_the_needle_back_before_the_question(haystack: niah.Haystack,
                                                              tmp_path: Path,
                                                              kind: NeedleKind) -> None:
    pytest.importorskip("bm25s")
    from tttlm.inference import Engine
    from tttlm.memory import RecallSession

    em = load_model(save_tiny(tmp_path / "swa", "swa"))
    sample = niah.build_sample(haystack, TOK, kind, 1001, 0.2, trial=0, seed=7)
    assert sample.needle_end < 1001 - 16 * 16  # 16+ windows before the question
    session = RecallSession(Engine(em.model), "end", budget=32,
                            query_len=sample.length - sample.question_start)
    session.generate(sample.input_ids, 2, temperature=0.0)
    assert any(p.start < sample.needle_end and p.start + len(p.tokens) > sample.needle_start
               for p in session.last_recall)
    prediction = niah.recall_predictor(em, TOK, budget=32)(sample)
    assert isinstance(prediction, Prediction) and np.isfinite(prediction.logprob)


@pytest.mark.parametrize("variant", ["e2e", "swa"])
def test_batched_retrieval_equals_two_sessions_per_sample(haystack: niah.Haystack,
                                                          tmp_path: Path, variant: str) -> None:
    """A batch reads each haystack once and clones the state for scoring: each sample's
    prediction and log-probability as the two sessions of one sample give them."""
    pytest.importorskip("bm25s")
    from tttlm.inference import Engine
    from tttlm.memory import RecallSession

    model = TTTForCausalLM.from_pretrained(save_tiny(tmp_path / variant, variant),
                                           dtype=torch.float64)
    em = EvalModel(model=model, label=variant, path=variant, ttt=variant == "e2e",
                   fingerprint="f")
    samples = [niah.build_sample(haystack, TOK, kind, 600, depth, trial=0, seed=3)
               for kind in (NeedleKind.PASSKEY, NeedleKind.UUID) for depth in (0.1, 0.6)]

    def two_sessions(sample: niah.NiahSample) -> tuple[str, float]:
        def session() -> RecallSession:
            return RecallSession(Engine(model, ttt=em.ttt), "end", budget=32,
                                 query_len=sample.length - sample.question_start)
        ids = session().generate(sample.input_ids, len(sample.answer_ids) + 8,
                                 temperature=0.0, stop=(TOK.eos_id,))
        ids = [t for t in ids if t != TOK.eos_id]
        return TOK.decode(ids), -sum(session().score(sample.input_ids, sample.answer_ids))

    predictor = niah.recall_predictor(em, TOK, budget=32)
    for got, sample in zip(predictor.batch(samples), samples):
        text, logprob = two_sessions(sample)
        assert got.text == text and got.logprob == pytest.approx(logprob, abs=1e-9)


def test_retrieval_refuses_full_attention(tmp_path: Path) -> None:
    em = load_model(save_tiny(tmp_path / "full", "full"))
    with pytest.raises(EvalError, match="full attention"):
        niah.recall_predictor(em, TOK)


def test_cli_niah_with_retrieval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bm25s")
    model = save_tiny(tmp_path / "swa", "swa", window=64, chunk=64)
    hay = tmp_path / "hay.txt"
    hay.write_text("The cat sat on the mat. It was warm. The dog slept by the door.\n" * 20)
    out = tmp_path / "out"
    assert main(["eval", "niah", "--model", str(model), "--tokenizer", "bytes", "--haystack",
                 str(hay), "--lengths", "420", "--depths", "0", "--kinds", "passkey",
                 "--samples", "1", "--rag", "end", "--out", str(out), "--quiet",
                 "--no-plots"]) == 0
    report = json.loads((out / "niah.json").read_text())
    assert list(report["results"]) == ["swa + retrieval"]
    assert "swa + retrieval" in capsys.readouterr().out


def swa_niah_args(tmp_path: Path) -> tuple[list[str], Path]:
    """``tttlm eval niah`` of a tiny swa model (window 64, chunks of 32) on a short haystack
    at 420 tokens, one sample; and its output folder."""
    model = save_tiny(tmp_path / "swa", "swa", window=64, chunk=32)
    hay = tmp_path / "hay.txt"
    hay.write_text("The cat sat on the mat. It was warm. The dog slept by the door.\n" * 20)
    out = tmp_path / "out"
    return ["eval", "niah", "--model", str(model), "--tokenizer", "bytes", "--haystack",
            str(hay), "--lengths", "420", "--depths", "0", "--kinds", "passkey", "--samples",
            "1", "--out", str(out), "--quiet", "--no-plots"], out


def test_cli_niah_with_retrieval_at_every_chunk(tmp_path: Path) -> None:
    args, out = swa_niah_args(tmp_path)
    for rag, label in (("chunk", "swa + retrieval (chunk)"), ("end", "swa + retrieval")):
        assert main([*args, "--rag", rag]) == 0  # each filed apart in the one folder
        report = json.loads((out / "niah.json").read_text())
        assert list(report["results"]) == [label]


def test_cli_niah_rag_horizon_is_filed_apart_and_reaches_the_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args, out = swa_niah_args(tmp_path)
    args.extend(["--rag", "end"])
    windows = memory_windows(monkeypatch)
    assert main(args) == 0
    assert set(windows) == {64}
    windows.clear()
    assert main([*args, "--rag-horizon", "16"]) == 0
    assert set(windows) == {16}  # not answered from the first run's records
    samples = json.loads((out / "niah.json").read_text())["samples"]["swa + retrieval"]
    assert len(samples) == 1 and "horizon16" in samples[0]["key"][2]


@pytest.mark.parametrize("rag", ["off", "end"])
def test_cuda_graphs_route_gives_the_same_answers(haystack: niah.Haystack, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  rag: str) -> None:
    """``--cuda-graphs``: the engine's graph route (here through a stand-in capture that
    calls what a graph would replay) reads a haystack longer than the window chunk by chunk:
    the same answers, the same log-probabilities to rounding (fp64)."""
    if rag == "end":
        pytest.importorskip("bm25s")
    model = TTTForCausalLM.from_pretrained(save_tiny(tmp_path / "e2e"), dtype=torch.float64)
    em = EvalModel(model=model, label="m", path="m", ttt=True, fingerprint="f")
    samples = [niah.build_sample(haystack, TOK, kind, 600, depth, trial=0, seed=4)
               for kind in (NeedleKind.PASSKEY, NeedleKind.NUMBER) for depth in (0.2, 0.7)]

    def predictor(graphs: bool) -> niah.BatchPredictor:
        if rag == "end":
            return niah.recall_predictor(em, TOK, budget=4, cuda_graphs=graphs)
        return niah.model_predictor(em, TOK, cuda_graphs=graphs)

    plain = predictor(False).batch(samples)
    captured = stand_in_cuda_graphs(monkeypatch)
    graphed = predictor(True).batch(samples)
    assert captured  # the route was taken
    for a, b in zip(graphed, plain):
        assert a.text == b.text and a.logprob == pytest.approx(b.logprob, abs=1e-9)
