"""The lm-evaluation-harness model type ``tttlm`` (the ``eval`` extra).

``import tttlm.hf.harness`` registers it; then ``lm_eval.simple_evaluate(model="tttlm",
model_args="pretrained=DIR")`` (or :func:`evaluate`) runs any task on a tttlm model folder:

* ``loglikelihood``: the context is prefilled, the continuation read token by token through
  tttlm's :class:`~tttlm.inference.Engine` — exactly the engine's log-probabilities;
* ``loglikelihood_rolling``: the whole document in one TTT forward (every chunk learned from
  before the next is predicted), the quantity ``tttlm eval loss`` reports; documents of equal
  length are scored as one batch;
* ``generate_until``: the engine's greedy (or sampled) decoding, stopped at the ``until``
  strings.

Every request starts with BOS, as every document of tttlm's data pipeline does. Nothing is
truncated: with ``max_length`` a longer request is refused (``UserError``), without it every
request is read whole (a TTT model's state does not grow with the context).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tttlm.devices import resolve_device
from tttlm.errors import UserError
from tttlm.eval.adapters import resolve_tokenizer
from tttlm.inference import Engine
from tttlm.model.model import IGNORE_INDEX, TTTForCausalLM

MODEL_NAME = "tttlm"


@register_model(MODEL_NAME)
class TTTLMHarness(LM):
    """A tttlm model folder as an lm-eval ``LM``.

    Args (``--model_args``): ``pretrained`` the model folder; ``tokenizer`` a tokenizer spec
    (default: the folder's own); ``device``, ``dtype``; ``batch_size``; ``max_length`` refuse
    longer requests (default: none refused); ``ttt`` / ``inner_lr`` as the engine takes them;
    ``max_gen_toks`` the default generation length; ``rag`` ``off`` (default) or ``end``:
    the retrieval memory (:mod:`tttlm.memory.recall`) recalls, before the last ``rag_query``
    tokens of each context (default 32), passages that left the window (``rag_budget``
    tokens, default a quarter of the window) for ``loglikelihood`` and ``generate_until``
    (one request at a time); ``loglikelihood_rolling`` scores documents without it.
    ``rag_index`` its passage index: ``fts5`` (default; bm25 where SQLite lacks FTS5),
    ``bm25`` or ``dense`` (the model's own mean hidden states, through faiss);
    ``rag_separator`` plain text read before each passage and the query, as
    ``--rag-separator`` (default: BOS); ``rag_horizon`` indexes passages once that many
    tokens old (default: once they left the window), as ``--rag-horizon``.
    """

    def __init__(self, pretrained: str, tokenizer: str | None = None,
                 device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None,
                 ttt: bool | None = None, inner_lr: float | None = None,
                 max_gen_toks: int = 256, rag: str = "off", rag_budget: int | None = None,
                 rag_query: int = 32, rag_index: str | None = None,
                 rag_horizon: int | None = None,
                 rag_separator: str | None = None, **unused: Any) -> None:
        super().__init__()
        # A device lm-eval's command line names by default (cuda:0) that is not there is an
        # error that says what to pass, not a crash inside the weight loader.
        where = resolve_device(device, option="device")
        torch_dtype = getattr(torch, dtype) if dtype else None
        if dtype and not isinstance(torch_dtype, torch.dtype):
            raise UserError(f"dtype={dtype!r} is not a torch dtype; use float32 or bfloat16")
        self.model = TTTForCausalLM.from_pretrained(pretrained, device=where,
                                                    dtype=torch_dtype).eval()
        self.tokenizer = resolve_tokenizer(tokenizer or pretrained)
        config = self.model.config
        if self.tokenizer.vocab_size > config.vocab_size or \
                self.tokenizer.bos_id != config.bos_token_id:
            raise UserError(f"the tokenizer ({self.tokenizer.vocab_size} ids, BOS "
                            f"{self.tokenizer.bos_id}) does not fit the model ({config.vocab_size} "
                            f"ids, BOS {config.bos_token_id}); pass the model's tokenizer=")
        self.engine = Engine(self.model, ttt=ttt, inner_lr=inner_lr)
        self.ttt = self.engine.ttt
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length) if max_length is not None else None
        self.max_gen_toks = int(max_gen_toks)
        self.pretrained = str(pretrained)
        self.unused = unused
        self.rag = str(rag)
        self.rag_options = {"budget": int(rag_budget) if rag_budget is not None else None,
                            "query_len": int(rag_query),
                            "index": str(rag_index) if rag_index is not None else None,
                            "horizon": int(rag_horizon) if rag_horizon is not None else None}
        from tttlm.memory import RAG_MODES

        if self.rag not in RAG_MODES:
            raise UserError(f"rag={self.rag!r} is not one of {', '.join(RAG_MODES)}")
        if rag_horizon is not None and self.rag == "off":
            raise UserError(f"rag_horizon={rag_horizon} sets when rag=end indexes passages; "
                            "add rag=end or drop rag_horizon")
        if rag_index is not None and self.rag == "off":
            raise UserError(f"rag_index={rag_index} chooses the index of rag=end; add rag=end "
                            "or drop rag_index")
        if rag_separator is not None:
            if self.rag == "off":
                raise UserError("rag_separator marks the passages of rag=end; add rag=end or "
                                "drop rag_separator")
            from tttlm.memory.recall import separator_tokens

            self.rag_options["separator"] = separator_tokens(str(rag_separator),
                                                             self.tokenizer.encode)
        if self.rag != "off":
            # A full-attention model or no passage index: one line now, not at the first request
            # (the session checks the index it is asked for).
            self._recall_session()

    def _recall_session(self) -> Any:
        from tttlm.memory import RecallSession

        return RecallSession(self.engine, self.rag, **self.rag_options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> TTTLMHarness:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> TTTLMHarness:
        # lm-eval's command line passes its --batch_size/--device (with defaults) beside the
        # model args: an explicit model arg wins, and nothing else of it applies here.
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k in ("batch_size", "device") and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    # ------------------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def check_length(self, n: int, what: str) -> None:
        if self.max_length is not None and n > self.max_length:
            raise UserError(f"a {what} request of {n} tokens exceeds max_length="
                            f"{self.max_length}; nothing is truncated: raise max_length or "
                            "leave it unset (a TTT model reads any length)")

    # ---------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests: Sequence[Any],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            # As lm-eval's HF model: trailing spaces of the context belong to the continuation.
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = [self.tokenizer.bos_id, *self.encode(context)]
            cont = self.encode(continuation)
            self.check_length(len(ctx) + len(cont), "loglikelihood")
            pairs.append((ctx, cont))
        return self.score_pairs(pairs)

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]
                    ) -> list[tuple[float, bool]]:
        """(log-probability, greedy?) of each continuation after its context, through the
        engine: context prefilled, continuation read one token per step."""
        if self.rag != "off":
            scored = []
            for ctx, cont in pairs:
                session = self._recall_session()
                nll = session.score(ctx, cont) if cont else []
                scored.append((-sum(nll), session.last_greedy))
            return scored
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted((i for i in range(len(pairs)) if pairs[i][1]),
                       key=lambda i: -len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            logits, state = self.engine.prefill([pairs[i][0] for i in rows])
            conts = [pairs[i][1] for i in rows]
            total = [0.0] * len(rows)
            greedy = [True] * len(rows)
            for t in range(max(len(c) for c in conts)):
                logp = torch.log_softmax(logits.double(), -1)
                active = [r for r, c in enumerate(conts) if t < len(c)]
                for r in active:
                    token = conts[r][t]
                    total[r] += float(logp[r, token])
                    greedy[r] = greedy[r] and int(logp[r].argmax()) == token
                nxt = [c[t] if t < len(c) else 0 for c in conts]
                still = [r for r in active if t + 1 < len(conts[r])]
                if still:
                    logits, state = self.engine.step(state, nxt, active=still)
            for r, i in enumerate(rows):
                results[i] = (total[r], greedy[r])
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any],
                              disable_tqdm: bool = False) -> list[float]:
        docs = []
        for req in requests:
            ids = [self.tokenizer.bos_id, *self.encode(req.args[0])]
            self.check_length(len(ids), "loglikelihood_rolling")
            docs.append(ids)
        return self.rolling(docs)

    def rolling(self, docs: Sequence[list[int]]) -> list[float]:
        """Sum of log-probabilities of every token after the first of each document, from one
        TTT forward over the whole document (BOS targets not counted, as everywhere in tttlm);
        documents of one length form a batch."""
        out = [0.0] * len(docs)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(docs):
            by_length[len(ids)].append(i)
        device = self.model.embed.weight.device
        for length, idx in by_length.items():
            if length < 2:
                continue
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start:start + self.batch_size]
                x = torch.tensor([docs[i] for i in rows], device=device)
                labels = x[:, 1:].masked_fill(x[:, 1:] == self.model.config.bos_token_id,
                                              IGNORE_INDEX)
                with torch.inference_mode():
                    nll = self.model(x[:, :-1], labels=labels, ttt=self.ttt).token_nll
                nll = nll.double().masked_fill(labels == IGNORE_INDEX, 0.0).sum(-1)
                for r, i in enumerate(rows):
                    out[i] = -float(nll[r])
        return out

    # -------------------------------------------------------------------- generation
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            ids = [self.tokenizer.bos_id, *self.encode(context)]
            self.check_length(len(ids) + max_new, "generate_until")
            if self.rag != "off":
                new = self._recall_session().generate(ids, max_new, temperature=temperature,
                                                      seed=kwargs.pop("seed", 0))
                eos = self.model.config.eos_token_id
                text = self.tokenizer.decode([t for t in new if t != eos])
                for u in until:
                    if u in text:
                        text = text[:text.index(u)]
                out.append(text)
                continue
            stream = self.engine.stream([ids], max_new, temperature=temperature,
                                        seed=kwargs.pop("seed", 0))
            tokens: list[int] = []
            text = ""
            for step in stream:
                if step[0] < 0:
                    break
                tokens.append(step[0])
                text = self.tokenizer.decode(tokens)
                if any(u in text for u in until):
                    break
            for u in until:
                if u in text:
                    text = text[:text.index(u)]
            out.append(text)
        return out


def _batch_size(value: int | str) -> int:
    if str(value).startswith("auto"):
        return 8  # no memory probe: eight sequences at a time
    size = int(value)
    if size < 1:
        raise UserError(f"batch_size={value} must be a positive integer")
    return size


def evaluate(model: str | os.PathLike[str], tasks: Sequence[str], *,
             model_args: dict[str, Any] | None = None, limit: int | float | None = None,
             metadata: dict[str, Any] | None = None,
             include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
             | None = None, include_defaults: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a tttlm model folder; returns lm-eval's results dict.

    ``metadata`` reaches the tasks (RULER: ``max_seq_lengths``; its tokenizer defaults to the
    model folder's, which ``AutoTokenizer`` reads when the folder has tokenizer files).
    ``include_path``: folders of extra task YAML files; ``include_defaults=False`` leaves
    lm-eval's own tasks out of the index (faster). An unknown task name is a
    :class:`UserError` before the model is loaded. Offline (``HF_HUB_OFFLINE=1``), NLTK
    downloads are refused too (:func:`tttlm.hf.tasks.offline_nltk`). ``kwargs`` go to
    ``lm_eval.simple_evaluate``."""
    import lm_eval

    from tttlm.hf.tasks import check_tasks, offline_nltk, task_manager

    args = {"pretrained": str(model), **(model_args or {})}
    # Not the other model args: the harness's `tokenizer` is a tttlm spec (`bytes`, a file),
    # which RULER, reading `tokenizer` before `pretrained`, would hand to AutoTokenizer.
    meta = {"pretrained": str(model), **(metadata or {})}
    manager = task_manager(include_path, meta, include_defaults)
    check_tasks(manager, tasks)
    lm = TTTLMHarness(**args)
    with offline_nltk():  # RULER's module is imported when its task is built, in here
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                       metadata=meta, task_manager=manager, **kwargs)
