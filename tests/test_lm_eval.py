"""The lm-evaluation-harness model type `tttlm` (tttlm.hf.harness): log-likelihoods are the
engine's, rolling log-likelihood is `tttlm eval loss`'s, generation is the engine's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from _helpers import assert_close, tiny_model  # noqa: E402
from tttlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tttlm.errors import UserError  # noqa: E402
from tttlm.hf import save_tokenizer  # noqa: E402
from tttlm.hf.harness import TTTLMHarness  # noqa: E402

BOS = 256
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom."


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> TTTLMHarness:
    path = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=258, bos_token_id=BOS, eos_token_id=257).save_pretrained(path)
    save_tokenizer("bytes", path)
    return TTTLMHarness.create_from_arg_string(f"pretrained={path}",
                                               {"batch_size": 3, "device": None})


def req(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def test_registered() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("tttlm") is TTTLMHarness


def test_loglikelihood_is_the_engines(lm: TTTLMHarness) -> None:
    """One request at a time: exactly the engine's log-softmax, token by token; batched
    ragged requests: the same up to float64 rounding of batched matrix products."""
    pairs = [("It was the best", " of times"), ("", "It was"), ("it was the age of ", "wisdom"),
             ("x", "")]
    batched = lm.loglikelihood([req(*p) for p in pairs])
    alone = [lm.loglikelihood([req(*p)])[0] for p in pairs]
    for (b, g), (a, h) in zip(batched, alone):
        assert g == h
        assert_close(torch.tensor(b), torch.tensor(a), atol=1e-9, name="batched")
    assert batched[3] == (0.0, True)
    enc = ByteTokenizer().encode
    for (context, cont), (score, greedy) in zip(pairs[:3], alone):
        context, cont = context.rstrip(" "), context[len(context.rstrip(" ")):] + cont
        ids = [BOS, *enc(context), *enc(cont)]
        logits, state = lm.engine.prefill([ids[:len(ids) - len(enc(cont))]])
        total, all_greedy = 0.0, True
        for t, token in enumerate(enc(cont)):
            logp = torch.log_softmax(logits.double(), -1)[0]
            total += float(logp[token])
            all_greedy &= int(logp.argmax()) == token
            if t + 1 < len(enc(cont)):
                logits, state = lm.engine.step(state, [token])
        assert (score, greedy) == (total, all_greedy)


def test_rolling_equals_tttlm_eval_loss(lm: TTTLMHarness) -> None:
    from tttlm.eval import EvalModel, evaluate_loss, tokenize_documents

    got = lm.loglikelihood_rolling([req(TEXT), req(TEXT[:40]), req(TEXT[::-1])])
    corpus = tokenize_documents([("doc", TEXT)], ByteTokenizer(), "text")
    em = EvalModel(lm.model, "m", lm.pretrained, True, "f")
    report = evaluate_loss([em], corpus, [len(TEXT)])
    _, count, total = report["results"]["m"][str(len(TEXT))]["per_sequence"][0]
    assert count == len(TEXT)
    assert_close(torch.tensor(-got[0]), torch.tensor(total), atol=1e-9, name="rolling")
    # Equal-length documents share a batch; the result does not depend on the batch, up to
    # float64 rounding of batched products (the BLAS picks kernels by shape: one ulp of
    # difference on some CPUs), as the model's own batch test allows.
    alone = lm.loglikelihood_rolling([req(TEXT[::-1])])[0]
    assert_close(torch.tensor(got[2]), torch.tensor(alone), rel_l2=1e-12, name="batch")


def test_generate_until_is_the_engines_greedy_text(lm: TTTLMHarness) -> None:
    context = "It was the"
    ids = [BOS, *ByteTokenizer().encode(context)]
    ref = lm.engine.generate([ids], 20, temperature=0.0).tokens[0]
    text = ByteTokenizer().decode(ref)
    got = lm.generate_until([req(context, {"until": [], "max_gen_toks": 20})])
    assert got == [text]
    stop = text[3:5]
    cut = lm.generate_until([req(context, {"until": [stop], "max_gen_toks": 20})])[0]
    assert cut == text[:text.index(stop)]


def test_longer_requests_are_refused_not_truncated(lm: TTTLMHarness) -> None:
    lm.max_length = 30
    try:
        with pytest.raises(UserError, match="nothing is truncated"):
            lm.loglikelihood_rolling([req(TEXT)])
        with pytest.raises(UserError, match="max_length=30"):
            lm.loglikelihood([req(TEXT, "x")])
    finally:
        lm.max_length = None


def test_simple_evaluate_runs_a_task(lm: TTTLMHarness, tmp_path: Path) -> None:
    """lm-eval's own loop over a local task (no dataset hub): scores come back."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the best of times"}\n{"text": "the worst of times"}\n')
    (tmp_path / "tiny.yaml").write_text(
        "task: tttlm_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: bits_per_byte\n")
    out = lm_eval.simple_evaluate(model=lm, tasks=["tttlm_tiny"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    result = out["results"]["tttlm_tiny"]
    assert result["bits_per_byte,none"] > 0


def test_rag_end_recalls_and_matches_the_engine_when_nothing_left_the_window(
        lm: TTTLMHarness) -> None:
    pytest.importorskip("bm25s")
    rag = TTTLMHarness(lm.pretrained, device="cpu", dtype="float64", rag="end", rag_budget=8,
                       rag_query=4)
    short = [("It was", " the best")]  # nothing has left the window (12): no quotes
    assert_close(torch.tensor(rag.loglikelihood([req(*p) for p in short])[0][0]),
                 torch.tensor(lm.loglikelihood([req(*p) for p in short])[0][0]), atol=1e-9,
                 name="rag, nothing to recall")
    # A long context: the query recalls a passage of it, so the score differs from the engine's.
    context = "Zebra quartz. " + TEXT * 2 + " Zebra"
    plain = lm.loglikelihood([req(context, " quartz")])[0][0]
    recalled = rag.loglikelihood([req(context, " quartz")])[0][0]
    assert recalled != pytest.approx(plain, abs=1e-9)
    session = rag._recall_session()
    ids = [BOS, *ByteTokenizer().encode(context)]
    session.score(ids, ByteTokenizer().encode(" quartz"))
    assert session.last_recall
    assert rag.generate_until([req(context, {"until": ["\n"], "max_gen_toks": 4})])[0] == \
        rag.generate_until([req(context, {"until": ["\n"], "max_gen_toks": 4})])[0]
    with pytest.raises(UserError, match="rag='x'"):
        TTTLMHarness(lm.pretrained, device="cpu", rag="x")


def test_rag_index_reaches_the_memory(lm: TTTLMHarness) -> None:
    pytest.importorskip("faiss")
    from tttlm.memory import DenseIndex

    rag = TTTLMHarness(lm.pretrained, device="cpu", dtype="float64", rag="end", rag_budget=8,
                       rag_query=4, rag_index="dense")
    assert isinstance(rag._recall_session().memory.index, DenseIndex)
    context = "Zebra quartz. " + TEXT * 2 + " Zebra"
    assert rag.loglikelihood([req(context, " quartz")])[0][0] < 0
    with pytest.raises(UserError, match="rag index 'x'"):
        TTTLMHarness(lm.pretrained, device="cpu", rag="end", rag_index="x")
    with pytest.raises(UserError, match="add rag=end"):
        TTTLMHarness(lm.pretrained, device="cpu", rag_index="dense")


def test_rag_separator_reaches_the_policy(lm: TTTLMHarness) -> None:
    rag = TTTLMHarness(lm.pretrained, device="cpu", rag="end", rag_separator="\\n\\nQuote: ")
    want = tuple(rag.tokenizer.encode("\n\nQuote: "))
    assert want and rag._recall_session().policy.separator == want
    with pytest.raises(UserError, match="add rag=end"):
        TTTLMHarness(lm.pretrained, device="cpu", rag_separator="x")


def test_rag_chunk_reaches_the_session(lm: TTTLMHarness) -> None:
    rag = TTTLMHarness(lm.pretrained, device="cpu", dtype="float64", rag="chunk", rag_budget=8,
                       rag_query=4)
    assert rag._recall_session().rag == "chunk"
    context = "Zebra quartz. " + TEXT * 2 + " Zebra"
    assert rag.loglikelihood([req(context, " quartz")])[0][0] < 0


def test_rag_horizon_reaches_the_memory(lm: TTTLMHarness) -> None:
    rag = TTTLMHarness(lm.pretrained, device="cpu", rag="end", rag_horizon=4)
    session = rag._recall_session()
    assert session.policy.horizon == 4 and session.memory.window == 4
    with pytest.raises(UserError, match="add rag=end"):
        TTTLMHarness(lm.pretrained, device="cpu", rag_horizon=4)
