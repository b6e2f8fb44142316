"""transformers' generate on the baselines with other per-block state (hybrid: growing caches
of the full-attention blocks; ttt_kvb: the TTT-KVB blocks' fast weights): the engine's tokens
and logits, beams included (each beam carries its own state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

import tttlm.hf  # noqa: E402, F401  (registers model_type "tttlm")
from _helpers import GDN, MAMBA2, tiny_model  # noqa: E402
from tttlm.hf import save_tokenizer  # noqa: E402
from tttlm.inference import Engine  # noqa: E402

BOS, EOS = 256, 257


def ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["hybrid", "ttt_kvb", GDN, MAMBA2])
def test_generate_is_the_engines(variant: str, tmp_path: Path) -> None:
    tiny_model(vocab_size=258, bos_token_id=BOS, eos_token_id=EOS, variant=variant,
               num_ttt_layers=None, global_every=2).save_pretrained(tmp_path)
    save_tokenizer("bytes", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompts = [ids(1, 9), ids(2, 14)]
    x = torch.full((2, 14), EOS)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, 14 - len(p):], mask[r, 14 - len(p):] = p, 1
    out = hf.generate(x, attention_mask=mask, max_new_tokens=21, do_sample=False)
    ref = Engine(hf.tttlm).generate(prompts, 21, temperature=0.0)
    assert out[:, 14:].tolist() == ref.tokens

    prompt = ids(5, 1, 7)
    beams = hf.generate(prompt, max_new_tokens=9, num_beams=3, num_return_sequences=3,
                        length_penalty=0.0, do_sample=False, output_scores=True,
                        return_dict_in_generate=True)
    engine = Engine(hf.tttlm)
    for seq, score in zip(beams.sequences, beams.sequences_scores):
        new = seq[7:]
        logits, state = engine.prefill([prompt[0]])
        total = torch.zeros((), dtype=torch.float64)
        for t in range(len(new)):
            total += torch.log_softmax(logits[0].float(), -1)[new[t]].double()
            logits, state = engine.step(state, new[t:t + 1])
        torch.testing.assert_close(score.double(), total, rtol=0, atol=1e-5)
