"""`tttlm convert hf`: transformers Llama / Qwen2 / Qwen3 models import exactly (issue 15).

Each case builds a small random model with transformers itself (its own config class, GQA,
RoPE scaling, tied and untied heads, biases, a head width other than hidden/heads), saves it
with save_pretrained, converts it with the command line, and compares tttlm's logits with
transformers' (eager attention, float32) on random tokens: to fp32 rounding, and bit for bit
through tttlm's naive attention reference. The weights are
redrawn larger than transformers' 0.02 init (norms and biases too) so that logits are O(1) and
a misplaced option moves them by far more than the tolerance.

TTT-ify: with a window ≥ the sequence and zero-initialised prime output projections, the
`e2e` and `swa` models compute the imported model's logits (float64, to rounding); with TTT
on, the first chunk equals too, and the inner steps then change later chunks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tttlm import TTTForCausalLM
from tttlm.cli import main
from tttlm.convert.ttt_ify import ttt_ify
from tttlm.ops.attention import attention_backend

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32 rounding of logits of size ~5 through two blocks
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-mha-untied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-llama3-bias-headdim": ("LlamaConfig", dict(
        rope_parameters=LLAMA3, attention_bias=True, mlp_bias=True, head_dim=12,
        tie_word_embeddings=False)),
    "llama-linear": ("LlamaConfig", dict(rope_parameters=LINEAR, tie_word_embeddings=True,
                                         rms_norm_eps=1e-5)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen3-headdim": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3-untied-llama3": ("Qwen3Config", dict(tie_word_embeddings=False,
                                                rope_parameters=LLAMA3)),
}


def hf_model(config_class: str, options: dict[str, Any], seed: int = 0) -> Any:
    config = getattr(transformers, config_class)(**{**SMALL, **options})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.25)
    return model


def convert(src: Path, dst: Path, *extra: str) -> None:
    assert main(["convert", "hf", str(src), str(dst), *extra]) == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case: str, tmp_path: Path) -> None:
    reference = hf_model(*CASES[case])
    reference.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "tttlm")
    model = TTTForCausalLM.from_pretrained(tmp_path / "tttlm").eval()
    assert model.config.variant.value == "full"
    x = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).logits
        got = model(x).logits
    assert got is not None
    assert expected.std() > 1.0  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    # The naive attention reference does transformers' eager attention's operations in the
    # same order: then the logits are bit-identical (the default backend, SDPA, rounds
    # differently; ~4e-6 at this size).
    with attention_backend("naive"), torch.no_grad():
        naive = model(x).logits
    torch.testing.assert_close(naive, expected, rtol=0, atol=0)


def test_options_reach_the_config(tmp_path: Path) -> None:
    """The options map to tttlm's fields (a test of the mapping, beside the logits)."""
    hf_model(*CASES["llama-llama3-bias-headdim"]).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "tttlm")
    config = json.loads((tmp_path / "tttlm" / "config.json").read_text())
    assert config["num_kv_heads"] == 2 and config["head_dim"] == 12
    assert config["rope_layout"] == "half" and config["rope_freq_scaling"]["rope_type"] == "llama3"
    assert config["qkv_bias"] and config["attn_out_bias"] and config["mlp_bias"]
    assert not config["tie_embeddings"] and not config["post_norms"] and not config["qk_norm"]


def test_tokenizer_is_written(tmp_path: Path) -> None:
    """A source with a tokenizer gives a folder AutoTokenizer reads, with the same ids."""
    from tttlm.hf.tokenizer import byte_level_spec

    tokenizers = pytest.importorskip("tokenizers")
    # A vocabulary holding the byte tokenizer's 258 ids; the config's BOS (Llama's 1) is not
    # the tokenizer's document separator (256).
    reference = hf_model("LlamaConfig", dict(vocab_size=260))
    reference.save_pretrained(tmp_path / "hf")
    rust = tokenizers.Tokenizer.from_str(json.dumps(byte_level_spec()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|bos|>",
                                                eos_token="<|eos|>")
    fast.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "tttlm")
    assert (tmp_path / "tttlm" / "tokenizer.json").is_file()
    assert (tmp_path / "tttlm" / "tokenizer_config.json").is_file()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "tttlm")
    assert again("hello").input_ids == fast("hello").input_ids
    # BOS is the one tttlm's data pipeline reads from that tokenizer (trainer and data agree).
    assert TTTForCausalLM.from_pretrained(tmp_path / "tttlm").config.bos_token_id == 256
    convert(tmp_path / "hf", tmp_path / "chosen", "--bos-id", "7")
    assert TTTForCausalLM.from_pretrained(tmp_path / "chosen").config.bos_token_id == 7


@pytest.mark.parametrize("src, message", [
    ("missing", "does not exist"),
    ("gpt2", "architecture GPT2LMHeadModel is not supported"),
    ("no-weights", "no *.safetensors weights"),
    ("empty", "neither a config.json"),
])
def test_errors_are_one_line(src: str, message: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / src
    if src == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    elif src == "no-weights":
        transformers.LlamaConfig(**SMALL).save_pretrained(folder)
    elif src == "empty":
        folder.mkdir()
    capsys.readouterr()  # what building the source printed
    assert main(["convert", "hf", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tttlm convert hf: error: ")
    assert message in err[0] and "; " in err[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ TTT-ify
@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> TTTForCausalLM:
    """A Qwen2-shaped model (GQA, biases) imported and turned to float64."""
    tmp = tmp_path_factory.mktemp("ttt-ify")
    hf_model("Qwen2Config", dict(tie_word_embeddings=False, num_hidden_layers=4)).save_pretrained(
        tmp / "hf")
    convert(tmp / "hf", tmp / "tttlm")
    return TTTForCausalLM.from_pretrained(tmp / "tttlm", dtype=torch.float64).eval()


def logits(model: TTTForCausalLM, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        if kwargs.get("ttt", model.config.variant.value == "e2e"):
            # The inner steps learn from the next tokens.
            kwargs.update(labels=x.roll(-1, 1), return_logits=True)
        out = model(x, **kwargs).logits
    assert out is not None
    return out


def test_ttt_ify_keeps_the_function(imported: TTTForCausalLM) -> None:
    x = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    original = logits(imported, x)
    e2e = ttt_ify(imported, "e2e", window=48, chunk_size=8)
    assert e2e.config.num_ttt_layers == 1 and e2e.config.variant.value == "e2e"
    assert all(layer.prime.w2.weight.abs().max() == 0 for layer in e2e.ttt_layers)
    assert all(layer.prime.w1.weight.abs().max() > 0 for layer in e2e.ttt_layers)
    # Pretrain mode (no inner steps): the imported model's logits.
    torch.testing.assert_close(logits(e2e, x, ttt=False), original, rtol=0, atol=1e-12)
    # TTT on: the first chunk is predicted before any update; later chunks see the updates.
    with_ttt = logits(e2e, x)
    torch.testing.assert_close(with_ttt[:, :8], original[:, :8], rtol=0, atol=1e-12)
    # (small at first: w1, w3 ~ N(0, 0.02) make the prime's hidden activations small, but far
    # above float64 rounding)
    assert (with_ttt[:, 8:] - original[:, 8:]).abs().max() > 1e-6
    # η = 0: every chunk equals (the TTT blocks' chunked attention is the same function).
    torch.testing.assert_close(logits(e2e, x, inner_lr=0.0), original, rtol=0, atol=1e-12)
    swa = ttt_ify(imported, "swa", window=40)
    torch.testing.assert_close(logits(swa, x), original, rtol=0, atol=1e-12)
    # The window takes effect once it is shorter than the sequence.
    assert (logits(ttt_ify(imported, "swa", window=16), x) - original).abs().max() > 1e-4


def test_ttt_ify_on_the_command_line(tmp_path: Path, imported: TTTForCausalLM) -> None:
    hf_model("LlamaConfig", dict(num_hidden_layers=4)).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "e2e", "--to", "e2e", "--window", "32", "--chunk",
            "8", "--ttt-layers", "2", "--prime-width", "16")
    config = TTTForCausalLM.from_pretrained(tmp_path / "e2e").config
    assert (config.variant.value, config.window, config.chunk_size, config.num_ttt_layers,
            config.prime_intermediate_size) == ("e2e", 32, 8, 2, 16)
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "x"), "--to",
                 "swa"]) == 2  # --window is required
