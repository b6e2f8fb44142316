"""Generation, sampling and input validation."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, tiny_model, tokens
from tttlm.inference import Engine, generate, sample


def test_greedy_generate_equals_argmax_loop() -> None:
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 2, 6)
    out = engine.generate(x, 12, temperature=0.0, stop=())
    logits, state = engine.prefill(x)
    expected: list[list[int]] = [[], []]
    for _ in range(12):
        tok = logits.argmax(-1)
        for r in range(2):
            expected[r].append(int(tok[r]))
        logits, state = engine.step(state, tok)
    assert out.tokens == expected
    assert out.finish_reasons == ["length", "length"]
    # The returned state has read the prompt and every new token.
    assert out.state.lengths == [18, 18]
    assert_close(engine.step(out.state, [3, 3])[0], engine.step(state, [3, 3])[0], atol=1e-12,
                 name="continued logits")


def test_stop_token_ends_only_its_sequence() -> None:
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 2, 6)
    free = engine.generate(x, 8, temperature=0.0, stop=())
    stop = free.tokens[0][2]  # the third token of row 0
    out = engine.generate(x, 8, temperature=0.0, stop=stop)
    first = free.tokens[0].index(stop)
    assert out.tokens[0] == free.tokens[0][:first + 1]
    assert out.finish_reasons[0] == "stop"
    assert out.state.lengths[0] == 6 + first + 1  # the stop token was read too
    if stop not in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1]


def test_seeded_sampling_is_reproducible_and_stream_matches() -> None:
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 2, 5)
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9, stop=(), seed=7)
    a = engine.generate(x, 10, **kwargs)
    b = engine.generate(x, 10, **kwargs)
    assert a.tokens == b.tokens
    streamed = [step for step in engine.stream(x, 10, **kwargs)]
    assert [[s[r] for s in streamed] for r in range(2)] == a.tokens
    c = engine.generate(x, 10, **{**kwargs, "seed": 8})
    assert c.tokens != a.tokens


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0).tolist() == [1]
    assert all(sample(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample(logits, 1.0, top_p=0.1, generator=g).item() == 1 for _ in range(20))
    picked = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picked == {1, 3}


def test_hf_style_generate_with_left_padding() -> None:
    model = tiny_model()
    x, _ = tokens(model, 2, 7)
    ids = x.clone()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is a 4-token prompt, left-padded
    ids[1, :3] = 0
    out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :7], ids)
    alone = generate(model, x[1:, 3:], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out[1, 7:], alone[0, 4:])


def test_bad_inputs_give_clear_errors() -> None:
    model = tiny_model()
    engine = Engine(model)
    V = model.config.vocab_size
    with pytest.raises(ValueError, match="empty"):
        engine.prefill([[]])
    with pytest.raises(ValueError, match=f"token id {V} outside"):
        engine.prefill([[1, V]])
    with pytest.raises(ValueError, match="token id -1 outside"):
        engine.prefill(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], -1)
    _, state = engine.prefill([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="one per sequence"):
        engine.step(state, [5])
    with pytest.raises(ValueError, match="outside"):
        engine.step(state, [5, V + 3])
    with pytest.raises(ValueError, match="2 sequences"):
        engine.prefill([[1]], state)
    with pytest.raises(ValueError, match="ttt=True needs an e2e model"):
        Engine(tiny_model(variant="full", num_ttt_layers=None), ttt=True)


def test_zero_new_tokens_and_graph_flag_off_cuda() -> None:
    """max_new_tokens=0 only reads the prompt; cuda_graphs is a no-op off CUDA."""
    model = tiny_model()
    x, _ = tokens(model, 1, 9)
    out = Engine(model).generate(x, 0)
    assert out.tokens == [[]] and out.state.lengths == [9]
    a = Engine(model).generate(x, 6, temperature=0.0, stop=())
    b = Engine(model, cuda_graphs=True).generate(x, 6, temperature=0.0, stop=())
    assert a.tokens == b.tokens
