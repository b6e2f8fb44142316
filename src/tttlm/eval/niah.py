"""Needle in a haystack, in the style of RULER's single-needle tasks.

A prompt of exactly ``length`` tokens is::

    BOS | intro | haystack[:j] | needle | haystack[j:] | question

The haystack is a contiguous stretch of real book text (the built-in books by default) cut on
token boundaries to whatever length makes the total exact; the needle, a sentence carrying a key
and a value, goes in at the sentence boundary nearest to ``depth`` of the haystack; the question
asks for the key's value and ends in an answer prefix, so that even a base model continues with
the value. Every piece is tokenized separately and the ids are concatenated, so the needle and
the question are exact token spans that never overlap each other or the haystack.

Scoring (pure functions, tested with fake predictors): exact match of the first word of the
greedy continuation with the value, and the log-probability of the value's tokens given the
prompt, which moves long before a small model gets the answer right.
"""

from __future__ import annotations

import enum
import hashlib
import os
import random
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.devices import autocast
from tttlm.eval.adapters import (
    EvalError,
    TokenCorpus,
    Tokenizer,
    generate_and_score_batch,
)
from tttlm.eval.common import EvalModel, PartialResults, progress_bar, write_json

RESULT_TYPE = "tttlm.eval.niah"
RESULT_VERSION = 1
# Bumped whenever the prompt text changes, so stale resumable results are not reused.
TEMPLATE_VERSION = 1

INTRO = ("A special piece of information is hidden inside the following text. Find it and "
         "memorize it. I will quiz you about it afterwards.\n\n")


class NeedleKind(str, enum.Enum):
    """What the needle's value is (RULER: passkey retrieval, niah_single_2, niah_single_3)."""

    PASSKEY = "passkey"  # "The pass key is 71432.", a 5-digit number
    NUMBER = "number"  # "One of the special magic numbers for <key> is: 4730121.", 7 digits
    UUID = "uuid"  # "One of the special magic uuids for <key> is: <uuid4>."


DEFAULT_DIGITS = {NeedleKind.PASSKEY: 5, NeedleKind.NUMBER: 7}

# Keys are adjective-noun pairs as in RULER; a short fixed list keeps them reproducible.
_ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "distant",
               "eager", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly",
               "lively", "lonely", "mighty", "narrow", "noble", "pale", "proud", "quiet",
               "rapid", "rustic", "silent", "silver", "steady", "swift", "tender", "wild")
_NOUNS = ("anchor", "badger", "banner", "castle", "cellar", "comet", "deposit", "falcon",
          "garden", "harbor", "helmet", "island", "lantern", "ledger", "meadow", "mirror",
          "orchard", "parcel", "pebble", "quarry", "river", "saddle", "spindle", "thicket",
          "tower", "valley", "violin", "wagon", "willow", "window", "yacht", "zephyr")


def parse_kinds(text: str | Sequence[str]) -> list[NeedleKind]:
    """``"passkey,uuid"`` → kinds; an unknown name is an error listing the known ones."""
    names = [k.strip() for k in (text.split(",") if isinstance(text, str) else text)]
    kinds = []
    for name in names:
        if not name:
            continue
        try:
            kind = NeedleKind(name)
        except ValueError:
            known = ", ".join(k.value for k in NeedleKind)
            raise EvalError(f"unknown needle kind {name!r}; use one of {known}") from None
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        raise EvalError("no needle kind given; give --kinds passkey, number and/or uuid")
    return kinds


def make_key(kind: NeedleKind, rng: random.Random) -> str:
    """The needle's key ("pass key" for passkeys, an adjective-noun pair otherwise)."""
    if kind is NeedleKind.PASSKEY:
        return "pass key"
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def make_value(kind: NeedleKind, rng: random.Random, digits: int | None = None) -> str:
    """A random value of ``kind``; ``digits`` overrides the number length (tests use 1)."""
    if kind is NeedleKind.UUID:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    n = digits or DEFAULT_DIGITS[kind]
    # No leading zero, so the value reads (and tokenizes) as the number it is.
    return str(rng.randrange(10 ** (n - 1), 10 ** n)) if n > 1 else str(rng.randrange(10))


def needle_text(kind: NeedleKind, key: str, value: str) -> str:
    if kind is NeedleKind.PASSKEY:
        return f"The pass key is {value}. Remember it. {value} is the pass key."
    noun = "numbers" if kind is NeedleKind.NUMBER else "uuids"
    return f"One of the special magic {noun} for {key} is: {value}."


def question_text(kind: NeedleKind, key: str) -> str:
    """The question, ending in an answer prefix that the value completes."""
    if kind is NeedleKind.PASSKEY:
        return "What is the pass key? The pass key is"
    noun = "number" if kind is NeedleKind.NUMBER else "uuid"
    return (f"What is the special magic {noun} for {key} mentioned in the provided text? "
            f"The special magic {noun} for {key} mentioned in the provided text is")


# ------------------------------------------------------------------------------ haystack
@dataclass
class Haystack:
    """A cyclic pool of book tokens and where sentences start in it.

    Attributes:
        tokens: ``[N]`` the documents' tokens (BOS dropped), joined by the tokens of a blank
            line; a haystack longer than the pool wraps around.
        sentence_start: ``[N]`` whether a sentence (or paragraph) starts at each token, i.e.
            the previous token ends in ``. ! ? "`` or a newline.
        source: where the text came from.
        fingerprint: hash of the pool, keying resumable results.
    """

    tokens: np.ndarray
    sentence_start: np.ndarray
    source: str
    fingerprint: str


def build_haystack(corpus: TokenCorpus, tokenizer: Tokenizer) -> Haystack:
    """Turn a tokenized book corpus into a :class:`Haystack` pool."""
    sep = np.asarray(tokenizer.encode("\n\n"), np.int64)
    parts = []
    doc_ends = np.append(corpus.doc_offsets[1:], corpus.num_tokens)
    for start, end in zip(corpus.doc_offsets, doc_ends):
        body = np.asarray(corpus.tokens[start:end], np.int64)
        body = body[1:] if len(body) and body[0] == corpus.bos_id else body
        if len(body):
            parts.extend([body, sep])
    if not parts:
        raise EvalError(f"{corpus.source}: no text to build a haystack from; give a --haystack "
                        "with text in it")
    tokens = np.concatenate(parts)
    ids = np.unique(tokens)
    # One decode per distinct id, not per token: a 128K-token pool has a few thousand ids.
    texts = {int(i): tokenizer.decode([int(i)]) for i in ids}
    ends, blank = np.zeros((2, int(ids.max()) + 1), dtype=bool)
    for i, text in texts.items():
        ends[i], blank[i] = _ends_sentence(text), "\n" in text and not text.strip()
    # A sentence starts after a token that ends one, unless the text goes on with blank
    # lines: the needle then sits after the blank lines, and the haystack never opens on them.
    start = np.roll(ends[tokens], 1) & ~blank[tokens]
    start[0] = True
    digest = hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()[:16]
    return Haystack(tokens=tokens, sentence_start=start, source=corpus.source,
                    fingerprint=digest)


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip(" \t")
    return bool(stripped) and (stripped[-1] in ".!?\n\u201d\"" or "\n" in stripped)


# ------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class NiahSample:
    """One prompt, the answer expected, and the exact token spans of its pieces.

    Attributes:
        kind, length, depth, trial: the grid cell and the sample's index in it.
        key, value: what the needle says; ``value`` is the expected answer.
        input_ids: the prompt, exactly ``length`` ids.
        answer_ids: the tokens of " <value>", the continuation scored by log-probability.
        haystack_start: index in ``input_ids`` of the first haystack token.
        needle_start, needle_end: the needle's span ``[needle_start, needle_end)``.
        question_start: the question's span is ``[question_start, length)``.
        actual_depth: fraction of the haystack before the needle (after snapping to a
            sentence start).
        pool_offset: where the haystack begins in the :class:`Haystack` pool.
    """

    kind: NeedleKind
    length: int
    depth: float
    trial: int
    key: str
    value: str
    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    haystack_start: int
    needle_start: int
    needle_end: int
    question_start: int
    actual_depth: float
    pool_offset: int


def _rng(*parts: Any) -> random.Random:
    """A generator seeded from a tuple, identical across runs and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _pieces(tokenizer: Tokenizer, kind: NeedleKind, length: int, trial: int, seed: int,
            digits: int | None) -> tuple[str, str, list[int], list[int], list[int]]:
    """Key, value and the token ids of the prompt's fixed parts: head, needle, question."""
    rng = _rng("value", seed, kind.value, length, trial)
    key = make_key(kind, rng)
    value = make_value(kind, rng, digits)
    head = [tokenizer.bos_id, *tokenizer.encode(INTRO)]
    # Spaces on both sides: the needle may land before a line that starts without one.
    needle = tokenizer.encode(" " + needle_text(kind, key, value) + " ")
    question = tokenizer.encode("\n\n" + question_text(kind, key))
    room = length - len(head) - len(needle) - len(question)
    if room < 1:
        raise EvalError(f"length {length} is too short for a {kind.value} needle: the prompt "
                        f"without haystack takes {length - room} tokens with this tokenizer; "
                        f"use lengths of at least {length - room + 1}")
    return key, value, head, needle, question


def build_sample(haystack: Haystack, tokenizer: Tokenizer, kind: NeedleKind | str, length: int,
                 depth: float, trial: int = 0, seed: int = 0,
                 digits: int | None = None) -> NiahSample:
    """The prompt of one grid cell and trial, deterministic in ``seed``.

    The haystack text and the key/value depend on (seed, length, trial) and (seed, kind,
    length, trial) only, so the depths of a trial move one needle through one haystack.
    """
    kind = NeedleKind(kind)
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"depth {depth} is outside [0, 1]; give depths between 0 and 1")
    key, value, head, needle, question = _pieces(tokenizer, kind, length, trial, seed, digits)
    size = length - len(head) - len(needle) - len(question)
    pool = len(haystack.tokens)
    # Start the haystack at a sentence start, so it reads as text from the first token.
    starts = np.flatnonzero(haystack.sentence_start)
    offset = int(starts[_rng("haystack", seed, length, trial).randrange(len(starts))])
    index = (offset + np.arange(size)) % pool
    hay = haystack.tokens[index]
    cut = _insertion_point(haystack.sentence_start[index], depth)
    ids = [*head, *hay[:cut].tolist(), *needle, *hay[cut:].tolist(), *question]
    assert len(ids) == length
    needle_start = len(head) + cut
    return NiahSample(kind=kind, length=length, depth=depth, trial=trial, key=key, value=value,
                      input_ids=tuple(ids), answer_ids=tuple(tokenizer.encode(" " + value)),
                      haystack_start=len(head), needle_start=needle_start,
                      needle_end=needle_start + len(needle),
                      question_start=length - len(question), actual_depth=cut / size,
                      pool_offset=offset)


def _insertion_point(sentence_start: np.ndarray, depth: float) -> int:
    """Nearest sentence start to ``depth`` of the haystack, within 2% of it (else exact)."""
    size = len(sentence_start)
    target = round(depth * size)
    if target in (0, size):
        return target
    allowed = np.flatnonzero(sentence_start)
    if len(allowed) == 0:
        return target
    best = int(allowed[np.argmin(np.abs(allowed - target))])
    return best if abs(best - target) <= max(8, size // 50) else target


# ------------------------------------------------------------------------------- scoring
_STRIP = ".,;:!?\"'()[]{}<>`*\u201c\u201d\u2018\u2019"


def extract_answer(text: str) -> str:
    """The answer a continuation gives: its first word without surrounding punctuation."""
    words = text.split()
    return words[0].strip(_STRIP) if words else ""


def score_answer(prediction: str, value: str) -> bool:
    """Exact match of the continuation's first word with the value (case-insensitive: the
    values are digits and lower-case hex, and "ABC-..." for a uuid is still the uuid)."""
    return extract_answer(prediction).casefold() == value.casefold()


def accuracy(predictions: Sequence[str], values: Sequence[str]) -> float:
    """Fraction of predictions that :func:`score_answer` accepts."""
    if len(predictions) != len(values):
        raise ValueError(f"{len(predictions)} predictions for {len(values)} values")
    if not values:
        return float("nan")
    return sum(score_answer(p, v) for p, v in zip(predictions, values)) / len(values)


def aggregate(records: Sequence[dict[str, Any]], kinds: Sequence[NeedleKind | str],
              lengths: Sequence[int], depths: Sequence[float]) -> dict[str, Any]:
    """Grids ``[depth][length]`` of accuracy and mean log-probabilities, per kind.

    ``logprob`` is the mean over samples of the value's total log-probability,
    ``logprob_per_token`` the same per answer token; cells without samples are null.
    """
    cells: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["kind"], r["length"], r["depth"]), []).append(r)
    grids: dict[str, Any] = {}
    for kind in kinds:
        kind = NeedleKind(kind).value
        acc, lp, lpt, n = [], [], [], []
        for depth in depths:
            row_acc, row_lp, row_lpt, row_n = [], [], [], []
            for length in lengths:
                group = cells.get((kind, length, depth), [])
                row_n.append(len(group))
                row_acc.append(sum(r["correct"] for r in group) / len(group) if group else None)
                scored = [r for r in group if r.get("logprob") is not None]
                row_lp.append(float(np.mean([r["logprob"] for r in scored])) if scored else None)
                row_lpt.append(float(np.mean([r["logprob"] / r["answer_tokens"]
                                              for r in scored])) if scored else None)
            acc.append(row_acc)
            lp.append(row_lp)
            lpt.append(row_lpt)
            n.append(row_n)
        flat = [r["correct"] for r in records if r["kind"] == kind]
        grids[kind] = {"depths": list(depths), "lengths": list(lengths), "accuracy": acc,
                       "logprob": lp, "logprob_per_token": lpt, "samples": n,
                       "overall_accuracy": sum(flat) / len(flat) if flat else None,
                       "by_length": [_mean([a[j] for a in acc]) for j in range(len(lengths))]}
    return grids


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# ---------------------------------------------------------------------------- predictors
@dataclass
class Prediction:
    """What a predictor returns: the continuation and, optionally, log p(answer | prompt)."""

    text: str
    logprob: float | None = None


Predictor = Callable[[NiahSample], "str | Prediction"]
"""Maps a sample to the text the prompt is continued with (or a :class:`Prediction`)."""


class BatchPredictor:
    """A :data:`Predictor` that also predicts several samples at once (``batch``), for
    samples of one prompt length: :func:`evaluate_niah` then sends them together."""

    def __init__(self, batch: Callable[[Sequence[NiahSample]], list[Prediction]]) -> None:
        self.batch = batch

    def __call__(self, sample: NiahSample) -> Prediction:
        return self.batch([sample])[0]


def model_predictor(em: EvalModel, tokenizer: Tokenizer, *,
                    logprob: bool = True, extra_tokens: int = 8,
                    cuda_graphs: bool = False) -> BatchPredictor:
    """Greedy generation (a few tokens past the answer's length) plus the answer's
    log-probability, from one prefill of the prompt; a batch of samples shares the prefill
    and every decoding step. ``cuda_graphs``: the engine's (``Engine(cuda_graphs=True)``)."""

    def predict(samples: Sequence[NiahSample]) -> list[Prediction]:
        # bf16 autocast on GPU, as the loss evaluation: the paper's matmul precision.
        device = next(em.model.parameters()).device
        with torch.inference_mode(), autocast(device):
            results = generate_and_score_batch(
                em.model, [s.input_ids for s in samples],
                [len(s.answer_ids) + extra_tokens for s in samples],
                [s.answer_ids if logprob else () for s in samples], ttt=em.ttt,
                eos_id=tokenizer.eos_id, cuda_graphs=cuda_graphs)
        return [Prediction(tokenizer.decode(ids), lp) for ids, lp in results]

    return BatchPredictor(predict)


def recall_predictor(em: EvalModel, tokenizer: Tokenizer, *, logprob: bool = True,
                     extra_tokens: int = 8, budget: int | None = None,
                     index: str | None = None,
                     separator: Sequence[int] | None = None, rag: str = "end",
                     horizon: int | None = None, cuda_graphs: bool = False) -> BatchPredictor:
    """As :func:`model_predictor`, with the retrieval memory (``rag="end"``, see
    :mod:`tttlm.memory.recall`): the question (its exact span) is the query; the passages of
    the haystack that left the window and match it best are quoted back before it. The
    answer's log-probability is scored the same way, in a second session. ``index``: the
    passage index (``fts5``, ``bm25``, ``dense``; default fts5, else bm25); ``separator``:
    the tokens before each quoted passage and the question (default: BOS); ``rag="chunk"``
    also recalls before each chunk of the haystack (:mod:`tttlm.memory.recall`); ``horizon``:
    passages are indexed once that many tokens old (default: once they left the window).

    A batch (``rag="end"``) reads each haystack and recalls as a session would, then
    decodes every sample's answer in one batch while a clone of it scores the answers: what
    the two sessions of one sample give, without reading the haystack twice."""
    from tttlm.eval.adapters import decode_and_score
    from tttlm.inference import Engine
    from tttlm.memory import RecallSession
    from tttlm.memory.recall import RecallPolicy

    if not em.model.config.uses_window:
        raise EvalError(f"{em.label} has full attention: nothing leaves its window, so "
                        "retrieval does not apply; evaluate it without --rag")

    def session(sample: NiahSample) -> RecallSession:
        return RecallSession(Engine(em.model, ttt=em.ttt, cuda_graphs=cuda_graphs), rag,
                             budget=budget,
                             query_len=sample.length - sample.question_start, index=index,
                             separator=separator, horizon=horizon)

    def predict(sample: NiahSample) -> Prediction:
        device = next(em.model.parameters()).device
        stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
        with autocast(device):
            ids = [t for t in session(sample).generate(
                sample.input_ids, len(sample.answer_ids) + extra_tokens, temperature=0.0,
                stop=stop) if t not in stop]
            lp = (-sum(session(sample).score(sample.input_ids, sample.answer_ids))
                  if logprob else None)
        return Prediction(tokenizer.decode(ids), lp)

    def predict_batch(samples: Sequence[NiahSample]) -> list[Prediction]:
        policies = [RecallPolicy.for_engine(engine, budget=budget,
                                            query_len=s.length - s.question_start,
                                            index=index, separator=separator,
                                            horizon=horizon) for s in samples]
        split = [p.split(list(s.input_ids)) for p, s in zip(policies, samples)]
        if rag != "end" or not all(head for head, _ in split):
            return [predict(s) for s in samples]  # recalls while reading: one at a time
        memories = [p.new_memory(engine) for p in policies]
        with autocast(next(em.model.parameters()).device):
            _, state = engine.prefill([head for head, _ in split])
            fed = []
            for policy, memory, (head, query) in zip(policies, memories, split):
                memory.extend(head)
                fed.append(policy.cue(memory, query)[0])
            first, state = engine.prefill(fed, state)
            results = decode_and_score(
                engine, first, state, [len(s.answer_ids) + extra_tokens for s in samples],
                [s.answer_ids if logprob else () for s in samples], eos_id=tokenizer.eos_id)
        return [Prediction(tokenizer.decode(ids), lp) for ids, lp in results]

    engine = Engine(em.model, ttt=em.ttt, cuda_graphs=cuda_graphs)
    return BatchPredictor(predict_batch)


# -------------------------------------------------------------------------------- runner
def score_sample(sample: NiahSample, predictor: Predictor) -> dict[str, Any]:
    """One result record: the prediction, whether it is right, the answer's log-probability."""
    return sample_record(sample, predictor(sample))


def sample_record(sample: NiahSample, result: str | Prediction) -> dict[str, Any]:
    """The result record of ``sample`` predicted as ``result``."""
    prediction = result if isinstance(result, Prediction) else Prediction(str(result))
    return {"kind": sample.kind.value, "length": sample.length, "depth": sample.depth,
            "trial": sample.trial, "key": sample.key, "value": sample.value,
            "prediction": prediction.text, "answer": extract_answer(prediction.text),
            "correct": score_answer(prediction.text, sample.value),
            "logprob": prediction.logprob, "answer_tokens": len(sample.answer_ids),
            "needle_start": sample.needle_start, "actual_depth": sample.actual_depth,
            "pool_offset": sample.pool_offset}


@dataclass
class NiahSettings:
    """The grid an evaluation covers.

    Attributes:
        kinds: needle kinds.
        lengths: prompt lengths in tokens (BOS, question and needle included).
        depths: needle depths as fractions of the haystack (0: first, 1: last).
        samples: trials per cell (each a different haystack, key and value).
        seed: makes haystacks, keys and values reproducible.
        digits: number of digits of passkey/number values (default 5 and 7).
    """

    kinds: list[NeedleKind]
    lengths: list[int]
    depths: list[float]
    samples: int = 4
    seed: int = 0
    digits: int | None = None

    def __post_init__(self) -> None:
        self.kinds = [NeedleKind(k) for k in self.kinds]
        if self.samples < 1:
            raise EvalError(f"samples per cell must be positive, got {self.samples}; give "
                            "--samples 1 or more")
        if self.digits is not None and not 1 <= self.digits <= 18:
            raise EvalError(f"digits {self.digits} is not between 1 and 18; give --digits in "
                            "that range")


def evaluate_niah(label: str, haystack: Haystack, tokenizer: Tokenizer, settings: NiahSettings,
                  predictor: Predictor, *,
                  fingerprint: str = "", out_dir: str | os.PathLike[str] | None = None,
                  progress: bool = False, batch_size: int = 1) -> list[dict[str, Any]]:
    """Score every (kind, length, depth, trial) once; results go to ``partial.jsonl`` as they
    come and are reused on a rerun with the same model, haystack and settings.
    ``batch_size``: with a :class:`BatchPredictor`, samples of one length are predicted up
    to this many at a time (the records are the same; only the batching differs)."""
    if batch_size < 1:
        raise EvalError(f"batch size {batch_size} must be positive; give --batch-size 1 or "
                        "more")
    # Check every prompt fits before the first (possibly long) model call.
    for kind in settings.kinds:
        for length in settings.lengths:
            for trial in range(settings.samples):
                _pieces(tokenizer, kind, length, trial, settings.seed, settings.digits)
    store = PartialResults(out_dir) if out_dir is not None else None
    done = store.load() if store is not None else {}
    cells = [(k, L, d, t) for k in settings.kinds for L in settings.lengths
             for d in settings.depths for t in range(settings.samples)]
    keys = {cell: [TEMPLATE_VERSION, haystack.fingerprint, fingerprint, label, settings.seed,
                   settings.digits, cell[0].value, cell[1], cell[2], cell[3]] for cell in cells}
    found = {cell: done[tuple(keys[cell])] for cell in cells if tuple(keys[cell]) in done}
    batched = isinstance(predictor, BatchPredictor) and batch_size > 1
    with progress_bar(len(cells), f"niah {label}", progress) as bar:
        bar.update(len(found))
        todo = [cell for cell in cells if cell not in found]
        # Cells in order; a batch holds cells of one length (prompts of one length).
        while todo:
            group = [todo[0]]
            if batched:
                group += [c for c in todo[1:] if c[1] == todo[0][1]][:batch_size - 1]
            samples = [build_sample(haystack, tokenizer, kind, length, depth, trial,
                                    settings.seed, settings.digits)
                       for kind, length, depth, trial in group]
            results = (predictor.batch(samples) if batched  # type: ignore[union-attr]
                       else [predictor(samples[0])])
            made = []
            for cell, sample, result in zip(group, samples, results):
                record = sample_record(sample, result)
                record.update(key=keys[cell], model=label)
                found[cell] = record
                made.append(record)
            if store is not None:
                store.append(made)
            bar.update(len(group))
            chosen = set(group)
            todo = [c for c in todo if c not in chosen]
    return [found[cell] for cell in cells]


def niah_report(models: Sequence[dict[str, Any]], haystack: Haystack, settings: NiahSettings,
                records_by_model: dict[str, list[dict[str, Any]]],
                device: torch.device | None = None) -> dict[str, Any]:
    """The report written as ``niah.json``: settings, per-model grids and every sample."""
    return {
        "type": RESULT_TYPE,
        "version": RESULT_VERSION,
        "settings": {**asdict(settings), "kinds": [k.value for k in settings.kinds],
                     "template_version": TEMPLATE_VERSION, "haystack": haystack.source,
                     "haystack_fingerprint": haystack.fingerprint,
                     "haystack_tokens": len(haystack.tokens),
                     "scoring": "exact match of the first word of the greedy continuation "
                                "(surrounding punctuation stripped, case-insensitive); "
                                "logprob = log p(' ' + value | prompt), teacher-forced"},
        "models": list(models),
        "results": {label: aggregate(records, settings.kinds, settings.lengths,
                                     settings.depths)
                    for label, records in records_by_model.items()},
        "samples": {label: list(records) for label, records in records_by_model.items()},
        "environment": {"torch": torch.__version__, "device": str(device),
                        "python": sys.version.split()[0]},
    }


def format_niah_table(report: dict[str, Any]) -> str:
    """Accuracy by length (averaged over depths) for every model and kind."""
    lengths = report["settings"]["lengths"]
    lines = []
    for label, grids in report["results"].items():
        for kind, grid in grids.items():
            head = f"{label} / {kind}"
            lines.append(f"{head:<40}" + "".join(f"{L:>10}" for L in lengths))
            lines.append(f"{'  accuracy':<40}" + "".join(
                f"{'n/a' if v is None else f'{v:.2f}':>10}" for v in grid["by_length"]))
            lp = [_mean([row[j] for row in grid["logprob_per_token"]])
                  for j in range(len(lengths))]
            lines.append(f"{'  logprob/token of the value':<40}" + "".join(
                f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in lp))
    return "\n".join(lines)


def write_niah_outputs(report: dict[str, Any], out_dir: str | os.PathLike[str],
                       plots: bool = True) -> list[Path]:
    """Write ``niah.json`` and, with matplotlib, the heatmaps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "niah.json"]
    write_json(written[0], report)
    if plots:
        from tttlm.eval.plots import plot_niah

        written.extend(plot_niah(report, out))
    return written


def chance_accuracy(kind: NeedleKind | str, digits: int | None = None) -> float:
    """Accuracy of a predictor that ignores the prompt and always gives one valid value."""
    kind = NeedleKind(kind)
    if kind is NeedleKind.UUID:
        return 2.0 ** -122
    n = digits or DEFAULT_DIGITS[kind]
    return 1 / 10 if n == 1 else 1 / (9 * 10 ** (n - 1))


__all__ = ["DEFAULT_DIGITS", "Haystack", "NeedleKind", "NiahSample", "NiahSettings",
           "Prediction", "Predictor", "accuracy", "aggregate", "build_haystack", "build_sample",
           "chance_accuracy", "evaluate_niah", "extract_answer", "format_niah_table",
           "make_key", "make_value", "model_predictor",
           "needle_text", "niah_report", "parse_kinds", "question_text", "score_answer",
           "score_sample", "write_niah_outputs"]
