"""The attention backend registry: one override reaches training, evaluation and inference;
unknown names, registration rules, nesting; built-in backends agree with the reference on the
CPU; nothing imports Triton or flex_attention at import time."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch

from _helpers import assert_close
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.inference import Engine
from tttlm.ops.attention import (
    AttentionBackend,
    NaiveBackend,
    attention_backend,
    attention_backend_names,
    chunk_attention,
    decode_attention,
    get_attention_backend,
    register_attention_backend,
    sequence_attention,
)


class Recording(NaiveBackend):
    """The reference, counting which shapes of attention were asked of it."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def sequence(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls["sequence"] += 1
        return super().sequence(*args, **kwargs)  # type: ignore[arg-type]

    def chunk(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls["chunk"] += 1
        return super().chunk(*args, **kwargs)  # type: ignore[arg-type]

    def decode(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls["decode"] += 1
        return super().decode(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def recording() -> Recording:
    # replace=True: the registry is process-wide and this fixture runs once per test.
    return register_attention_backend(Recording(), replace=True)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def model() -> TTTForCausalLM:
    torch.manual_seed(0)
    return TTTForCausalLM(TTTConfig.from_preset("tiny", "e2e")).double()


def _tokens(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ttt", [True, False], ids=["meta", "pretrain"])
def test_override_reaches_training_and_evaluation(model: TTTForCausalLM, recording: Recording,
                                                  ttt: bool) -> None:
    x = _tokens(81)  # window 64, chunk 32: a windowed sequence, chunks over a wrapped cache
    ins, labels = x[:, :-1], x[:, 1:]
    with attention_backend("recording"):
        train = model(ins, labels, ttt=ttt)
        train.loss.backward()
    model.zero_grad(set_to_none=True)
    trained = recording.calls.copy()
    with attention_backend("recording"), torch.no_grad():
        evaluated = model(ins, labels, ttt=ttt)
    # Counts, not exact numbers: which blocks attend how is the model's business; that both
    # passes asked the override at all, and (below) computed the reference's numbers, is ours.
    assert trained.total() > 0 and (recording.calls - trained).total() > 0
    if ttt:
        assert trained["chunk"] > 0, "TTT blocks attend chunk by chunk"
    else:
        assert recording.calls["chunk"] == 0, "pretrain mode takes no inner steps"
    with attention_backend("naive"), torch.no_grad():
        ref = model(ins, labels, ttt=ttt)
    # The recording backend is the reference: the same numbers, bit for bit.
    assert torch.equal(evaluated.token_nll, ref.token_nll)
    assert torch.equal(train.loss.detach(), ref.loss)


def test_override_reaches_inference(model: TTTForCausalLM, recording: Recording) -> None:
    prompt = _tokens(40)  # past one chunk: prefill takes an inner step
    engine = Engine(model)
    with attention_backend("recording"):
        logits, state = engine.prefill(prompt)
        for _ in range(30):  # crosses the next chunk boundary: the engine's inner step
            logits, state = engine.step(state, logits.argmax(-1))
    assert recording.calls["decode"] > 0
    with attention_backend("naive"):
        ref_logits, ref_state = engine.prefill(prompt)
        for _ in range(30):
            ref_logits, ref_state = engine.step(ref_state, ref_logits.argmax(-1))
    assert torch.equal(logits, ref_logits)


def test_entry_points_call_the_active_backend(recording: Recording) -> None:
    q = torch.randn(1, 6, 2, 4, dtype=torch.float64)
    pos = torch.arange(6)
    with attention_backend("recording") as active:
        assert active is recording is get_attention_backend()
        sequence_attention(q, q, q, 4, 2)
        chunk_attention(q, q, q, pos, pos, 4)
        decode_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2),
                         torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert recording.calls == Counter(sequence=1, chunk=1, decode=1)
    sequence_attention(q, q, q, 4, 2)  # the override is over
    assert recording.calls["sequence"] == 1


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="'nope' is not known") as info, attention_backend("nope"):
        pass
    for name in ("auto", "naive", "triton", "banded"):
        assert repr(name) in str(info.value)
    assert get_attention_backend().name == "auto"


def test_overrides_nest_and_unwind_on_errors() -> None:
    assert get_attention_backend().name == "auto"
    with attention_backend("naive"):
        with attention_backend("banded"):
            assert get_attention_backend().name == "banded"
        assert get_attention_backend().name == "naive"
        with pytest.raises(RuntimeError, match="inside"), attention_backend("triton"):
            raise RuntimeError("inside")
        assert get_attention_backend().name == "naive"
    assert get_attention_backend().name == "auto"


def test_registration_rules() -> None:
    assert attention_backend_names()[:5] == ("auto", "naive", "triton", "banded", "first-order")

    class Twin(NaiveBackend):
        name = "naive"

    class Nameless(NaiveBackend):
        name = ""

    class Partial(AttentionBackend):
        name = "partial"

        def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int | None, block: int) -> torch.Tensor:
            return q

    with pytest.raises(ValueError, match="already registered"):
        register_attention_backend(Twin())
    with pytest.raises(ValueError, match="no name"):
        register_attention_backend(Nameless())
    with pytest.raises(TypeError, match="must be an AttentionBackend"):
        register_attention_backend(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]
    assert type(get_attention_backend()).__name__ == "AutoBackend"


@pytest.mark.parametrize("backend", ["auto", "banded", "triton", "first-order"])
def test_builtin_backends_match_naive_on_cpu(backend: str) -> None:
    """Every shape, fp64: each fast path differs from the reference by summation order only."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(2, 13, 2, 8), rand(2, 13, 2, 8), rand(2, 13, 2, 8)
    c, past = 5, 8
    q_pos, k_pos = torch.arange(past, past + c), torch.arange(0, past + c)
    dq, dk, dv = rand(2, 2, 3, 8), rand(2, 2, 20, 8), rand(2, 2, 20, 8)
    mask = rand(2, 1, 3, 20) > -0.5
    mask[..., 0] = True  # every query sees a key
    one = mask[:, :, :1]

    def run(name: str) -> list[torch.Tensor]:
        with attention_backend(name):
            return [sequence_attention(q, k, v, 6, 4), sequence_attention(q, k, v, None, 4),
                    chunk_attention(q[:, past:], k, v, q_pos, k_pos, 6),
                    decode_attention(dq, dk, dv, mask), decode_attention(dq[:, :, :1], dk, dv, one)]

    names = ["windowed sequence", "causal sequence", "chunk", "decode n=3", "decode n=1"]
    for name, a, e in zip(names, run(backend), run("naive"), strict=True):
        assert_close(a, e, atol=1e-12, name=name)


def test_nothing_fast_is_imported_at_import_time() -> None:
    # Only what importing tttlm adds counts (a torch version may load flex_attention itself).
    code = ("import sys, torch; before = set(sys.modules); "
            "import tttlm, tttlm.ops.attention, tttlm.model, tttlm.inference; "
            "bad = [m for m in ('triton', 'torch.nn.attention.flex_attention', "
            "'tttlm.ops.triton_chunk_attention') if m in set(sys.modules) - before]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
