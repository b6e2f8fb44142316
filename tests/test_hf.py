"""transformers integration (tttlm.hf): Auto* loading, the HF forward = TTTForCausalLM's, and
generate = tttlm's Engine token for token and logit for logit (float64: exact equality)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TextStreamer,
    pipeline,
)

import tttlm.hf  # noqa: E402, F401  (registers model_type "tttlm")
from _helpers import assert_close, tiny_model  # noqa: E402
from tttlm import TTTForCausalLM  # noqa: E402
from tttlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tttlm.errors import UserError  # noqa: E402
from tttlm.hf import TTTCache, TTTLMConfig, TTTLMForCausalLM, save_tokenizer  # noqa: E402
from tttlm.inference import Engine, State  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "official-tiny"
BOS, EOS = 256, 257


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tttlm model folder (byte vocabulary, window 12, chunk 4) with its tokenizer."""
    path = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=258, bos_token_id=BOS, eos_token_id=EOS).save_pretrained(path)
    save_tokenizer("bytes", path)
    return path


@pytest.fixture(scope="module")
def hf(folder: Path) -> TTTLMForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder)


def ids(seed: int, *shape: int) -> torch.Tensor:
    # Ids below 250: never BOS/EOS, so generation never stops early.
    return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed))


def engine_logits(engine: Engine, prompts: list[torch.Tensor],
                  new: torch.Tensor) -> torch.Tensor:
    """``[B, n, V]`` logits of the engine over prompts then forced new tokens ``[B, n]``."""
    logits, state = engine.prefill(prompts)
    out = [logits]
    for t in range(new.shape[1] - 1):
        logits, state = engine.step(state, new[:, t])
        out.append(logits)
    return torch.stack(out, 1)


def test_auto_classes_load_a_tttlm_folder(folder: Path, hf: TTTLMForCausalLM) -> None:
    assert isinstance(AutoConfig.from_pretrained(folder), TTTLMConfig)
    assert isinstance(hf, TTTLMForCausalLM)
    assert hf.device == torch.device("cpu") and hf.dtype == torch.float64
    plain = TTTForCausalLM.from_pretrained(folder)
    assert hf.config.ttt_config == plain.config
    assert list(hf.state_dict()) == list(plain.state_dict())  # tttlm's names, no prefix
    assert hf.generation_config.eos_token_id == EOS
    tok = AutoTokenizer.from_pretrained(folder)
    text = "héllo, wörld"
    assert tok(text).input_ids == [BOS, *ByteTokenizer().encode(text)]
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)


def test_forward_is_tttlms_with_shifted_labels(hf: TTTLMForCausalLM) -> None:
    x = ids(0, 2, 19)
    x[1, 7] = BOS  # a BOS target is not counted, nor learned from (tttlm's rule)
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    labels[labels == BOS] = -100
    with torch.no_grad():
        ref = hf.tttlm(x, labels=labels, return_logits=True)
        out = hf(x, labels=x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    # Padding: each row runs on its own tokens.
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with torch.no_grad():
        padded = hf(x, attention_mask=mask).logits
        alone = hf(x[:1, 5:]).logits
    assert torch.equal(padded[0, 5:], alone[0]) and not padded[0, :5].any()


def test_greedy_generate_is_the_engines(hf: TTTLMForCausalLM) -> None:
    """Ragged prompts (left padding), 25 new tokens: several chunk boundaries (chunk 4)."""
    prompts = [ids(1, 9), ids(2, 14)]
    x = torch.full((2, 14), EOS)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, 14 - len(p):], mask[r, 14 - len(p):] = p, 1
    out = hf.generate(x, attention_mask=mask, max_new_tokens=25, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)
    ref = Engine(hf.tttlm).generate(prompts, 25, temperature=0.0)
    assert out.sequences[:, 14:].tolist() == ref.tokens
    # generate hands the logits processors float32 copies: the engine's, rounded once.
    logits = torch.stack(out.logits, 1)
    ref_logits = engine_logits(Engine(hf.tttlm), prompts, out.sequences[:, 14:])
    assert torch.equal(logits, ref_logits.float())
    assert isinstance(out.cache, TTTCache) and out.cache.state.lengths == [9 + 24, 14 + 24]


def test_session_resumed_mid_chunk(hf: TTTLMForCausalLM, tmp_path: Path) -> None:
    """Generate, save the session, load it, continue with a new prompt: the engine's tokens."""
    prompt, more = ids(3, 1, 6), ids(4, 1, 3)  # 6 tokens: the session stops mid-chunk
    first = hf.generate(prompt, max_new_tokens=5, do_sample=False,
                        return_dict_in_generate=True)
    # The last new token is not read yet (transformers reads it with the next input).
    assert first.cache.get_seq_length() == 10 and first.cache.state.lengths == [10]
    first.cache.state.save(tmp_path / "session")
    cache = TTTCache(State.load(tmp_path / "session", hf.tttlm))
    x = torch.cat((first.sequences, more), 1)
    second = hf.generate(x, cache=cache, max_new_tokens=7, do_sample=False)

    engine = Engine(hf.tttlm)
    assert first.sequences[0, 6:].tolist() == engine.generate(prompt, 5, temperature=0).tokens[0]
    _, state = engine.prefill(prompt)
    for t in first.sequences[0, 6:-1].tolist():
        _, state = engine.step(state, [t])
    logits, state = engine.prefill(torch.cat((first.sequences[:, -1:], more), 1), state)
    tokens = [int(logits.argmax(-1))]
    for _ in range(6):
        logits, state = engine.step(state, [tokens[-1]])
        tokens.append(int(logits.argmax(-1)))
    assert second[0, x.shape[1]:].tolist() == tokens


def test_sampling_and_beam_search_score_with_the_engines_logits(hf: TTTLMForCausalLM) -> None:
    """Sampled tokens (transformers' RNG) and beams: their log-probabilities are the engine's
    on the same tokens, each beam carrying its own fast weights."""
    prompt = ids(5, 1, 7)
    torch.manual_seed(0)
    out = hf.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20,
                      output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, 7:]
    ref = engine_logits(Engine(hf.tttlm), [prompt[0]], new)
    assert torch.equal(torch.stack(out.logits, 1), ref.float())

    beams = hf.generate(prompt, max_new_tokens=9, num_beams=3, num_return_sequences=3,
                        length_penalty=0.0, do_sample=False, output_scores=True,
                        return_dict_in_generate=True)
    for seq, score in zip(beams.sequences, beams.sequences_scores):
        new = seq[None, 7:]
        logp = torch.log_softmax(engine_logits(Engine(hf.tttlm), [prompt[0]], new).float(), -1)
        total = logp[0].gather(-1, new[0, :, None]).sum()
        assert_close(score, total, atol=1e-5, name="beam score")  # float32 sums


def test_pipeline_streamer_stop_strings_repetition_penalty(folder: Path,
                                                           hf: TTTLMForCausalLM) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    text = pipeline("text-generation", model=hf, tokenizer=tok)(
        "Once upon", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon")
    x = tok("Once upon", return_tensors="pt").input_ids
    ref = Engine(hf.tttlm).generate(x, 12, temperature=0.0).tokens[0]
    assert text == "Once upon" + tok.decode(ref, skip_special_tokens=True)

    streamed = io.StringIO()
    with redirect_stdout(streamed):
        out = hf.generate(x, max_new_tokens=12, do_sample=False,
                          streamer=TextStreamer(tok, skip_prompt=True))
    assert out[0, x.shape[1]:].tolist() == ref
    assert streamed.getvalue().strip() == tok.decode(ref, skip_special_tokens=True).strip()

    stop = tok.decode(ref[:3], skip_special_tokens=True)
    cut = hf.generate(x, max_new_tokens=12, do_sample=False, stop_strings=[stop],
                      tokenizer=tok)
    assert cut.shape[1] - x.shape[1] < 12
    assert tok.decode(cut[0, x.shape[1]:]).endswith(stop)

    penalised = hf.generate(x, max_new_tokens=12, do_sample=False, repetition_penalty=5.0)
    assert len(set(penalised[0, x.shape[1]:].tolist())) > len(set(ref))


def test_save_pretrained_round_trips_with_tttlm(hf: TTTLMForCausalLM, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "tttlm"
    back = TTTForCausalLM.from_pretrained(tmp_path / "hf")  # checks the recorded config
    assert back.config == hf.tttlm.config
    for (k, a), (j, b) in zip(back.state_dict().items(), hf.state_dict().items()):
        assert k == j and torch.equal(a, b)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_bf16_generate_is_the_bf16_engines_and_near_float64(folder: Path,
                                                            hf: TTTLMForCausalLM) -> None:
    """bf16 weights: generate equals the bf16 engine exactly; its logits stay within bf16
    rounding of the float64 model's: rel-L2 1e-1 (bf16 keeps 8 bits, ~4e-3 per rounding,
    compounded through 4 blocks and inner steps of a random model with weights of std 0.3;
    measured 5e-2)."""
    low = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    prompt = ids(6, 1, 10)
    out = low.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    new = out.sequences[:, 10:]
    assert new[0].tolist() == Engine(low.tttlm).generate(prompt, 6, temperature=0).tokens[0]
    logits = torch.stack(out.logits, 1)
    assert torch.equal(logits, engine_logits(Engine(low.tttlm), [prompt[0]], new).float())
    assert_close(logits, engine_logits(Engine(hf.tttlm), [prompt[0]], new), rel_l2=1e-1,
                 name="bf16 vs float64")


def test_official_tiny_after_conversion(tmp_path: Path) -> None:
    """The official-tiny checkpoint, converted as `tttlm convert` writes it, loads through
    AutoModelForCausalLM and scores the fixture with the official per-token NLL."""
    from tttlm.convert.official import from_official, infer_config, load_official_arrays
    from tttlm.model.model import save_model_folder

    arrays = load_official_arrays(FIXTURE / "parity.npz")
    config = infer_config(arrays, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)
    save_model_folder(tmp_path, from_official(arrays, config), config)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    with np.load(FIXTURE / "parity.npz") as data:
        x = torch.from_numpy(data["input/input_ids"]).long()[None]
        y = torch.from_numpy(data["input/target_tokens"]).long()[None]
        ref = torch.from_numpy(data["officialmask/meta/token_nll"]).double()
    with torch.no_grad():
        logits = model(x).logits  # targets: the inputs, shifted inside
    nll = -torch.log_softmax(logits, -1)[0, :-1].gather(-1, y[0, :-1, None])[:, 0]
    assert_close(nll, ref[:-1], atol=1e-4, name="official NLL")  # the fixture's fp32 tolerance


def test_refusals_are_one_line(hf: TTTLMForCausalLM) -> None:
    from transformers import DynamicCache

    x = ids(7, 1, 5)
    for call in (lambda: hf(x, cache=DynamicCache()),
                 lambda: hf(x, output_hidden_states=True),
                 lambda: hf.generate(x, cache_implementation="static", max_new_tokens=2)):
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value)
