"""RULER through lm-eval, offline: `niah_single_1` at 1K on a tiny tttlm model (CI smoke run).

The run checks the pipeline (lm-eval builds RULER's haystacks with the model folder's own
tokenizer, the tttlm model type answers, scores come back), not the scores' level: a random
model finds no needle. Nothing may reach the network: the Hub and datasets are offline, and
NLTK, which lm-eval's RULER module asks for punkt_tab on import, is refused too. It runs in
a fresh process, because the Hub and datasets read the offline settings when imported.
Only lm-eval's RULER folder is indexed (indexing all of lm-eval's tasks takes seconds; the
command line's full path is tested in test_lm_eval_cli.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import tiny_model

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")

LIMIT = 1
SCRIPT = """
import json, sys
from pathlib import Path
import lm_eval
from tttlm.hf.harness import evaluate
from tttlm.hf.results import format_results, write_results

model, out = sys.argv[1:]
ruler = Path(lm_eval.__file__).parent / "tasks" / "ruler"
results = evaluate(model, ["niah_single_1"], limit={limit}, model_args={{"device": "cpu"}},
                   metadata={{"max_seq_lengths": [1024]}}, include_path=ruler,
                   include_defaults=False, log_samples=False)
write_results(results, out)
print(format_results(results))
"""


@pytest.mark.slow
def test_niah_single_1_at_1k_offline(tmp_path: Path) -> None:
    from tttlm.hf import save_tokenizer

    model = tmp_path / "model"
    # Chunks of 64: a 1K prompt is 16 inner steps (the test's time is in prefill).
    tiny_model(vocab_size=258, bos_token_id=256, eos_token_id=257, window=64,
               chunk_size=64).save_pretrained(model)
    save_tokenizer("bytes", model)  # RULER sizes its haystacks with AutoTokenizer(model)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: nothing to fall back on
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(limit=LIMIT), str(model), str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # NLTK prints "[nltk_data] Error loading punkt_tab" when it tries the network.
    assert "[nltk_data]" not in result.stderr
    task = json.loads((out / "harness.json").read_text())["results"]["niah_single_1"]
    assert task["sample_len"] == LIMIT
    score = task["1024,none"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    # RULER's convention: -1 for a length with no sample (4096 is its default length).
    assert task["4096,none"] == -1
    with open(out / "harness.csv", newline="") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f) if r["task"] == "niah_single_1"}
    assert float(rows["1024"]["value"]) == score
    assert any(line.startswith("|niah_single_1|") for line in result.stdout.splitlines())
