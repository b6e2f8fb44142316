"""``tttlm generate``: streams text, keeps sessions, reports user errors in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    # Byte-level vocabulary (256), so the CLI falls back to the byte tokenizer.
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    return TTTForCausalLM(config).save_pretrained(tmp_path_factory.mktemp("model"))


def test_generate_and_continue_session(model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("A document the model reads before the prompt. " * 2)
    session = tmp_path / "session"
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--seed", "0"]
    assert main([*args, "--document", str(doc), "--prompt", "Hi",
                 "--save-session", str(session)]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "session saved" in err
    assert (session / "session.json").is_file()
    assert main([*args, "--prompt", " more", "--session", str(session),
                 "--temperature", "0"]) == 0
    assert "context now" in capsys.readouterr().err


def test_user_errors(model_dir: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert capsys.readouterr().err.startswith("tttlm generate: error: nothing to read")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a tttlm model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x",
                 "--max-new-tokens", "-1"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x",
                 "--session", str(tmp_path / "none")]) == 2
    assert "not a tttlm session" in capsys.readouterr().err


def test_refuses_a_tokenizer_that_does_not_fit(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = TTTConfig.from_preset("tiny", vocab_size=2048, window=16, chunk_size=8)
    folder = TTTForCausalLM(config).save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_the_model_folders_tokenizer_wins(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.data.tokenizer import train_bpe

    tok = train_bpe(["the model folder keeps its own tokenizer beside the weights"] * 20, 280)
    config = TTTConfig.from_preset("tiny", vocab_size=tok.vocab_size, window=16, chunk_size=8,
                                   hidden_size=32, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id)
    folder = TTTForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save(folder)
    args = ["generate", "--model", str(folder), "--prompt", "the model", "--max-new-tokens",
            "3", "--seed", "0"]
    # Bytes "fit" this vocabulary (258 <= 280), so this used to print garbage with exit 0.
    assert main([*args, "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: --tokenizer bytes (bytes, 258 ids) differs "
                          "from the tokenizer the model folder")
    assert "drop --tokenizer" in err and err.count("\n") == 1
    assert main(args) == 0  # the folder's own
    assert main([*args, "--tokenizer", str(folder / "tokenizer.json")]) == 0  # the same one
    # A folder without a tokenizer takes an explicit one that fits.
    (folder / "tokenizer.json").unlink()
    assert main([*args, "--tokenizer", "bytes"]) == 0


@pytest.mark.parametrize("flags, match", [
    (["--temperature", "nan"], "temperature=nan"),
    (["--temperature", "-0.5"], "temperature=-0.5"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--top-k", "-2"], "top_k=-2"),
])
def test_bad_sampling_flags_are_one_line(model_dir: Path, flags: list[str], match: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: ") and match in err
    assert err.count("\n") == 1
