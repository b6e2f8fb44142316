"""Stop strings, held-back text and chat templates of ``tttlm serve`` (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from tttlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tttlm.errors import UserError  # noqa: E402
from tttlm.serve.text import ChatTemplate, TextTracker, load_chat_template  # noqa: E402


def feed(tracker: TextTracker, text: bytes) -> tuple[str, bool]:
    shown = ""
    for byte in text:
        piece, stopped = tracker.push(byte)
        shown += piece
        if stopped:
            return shown, True
    return shown + tracker.flush(), False


def test_stop_strings_cut_the_text_and_nothing_after_them_is_shown() -> None:
    assert feed(TextTracker(ByteTokenizer(), ["\nUser:"]), b"Hi there\nUser: more") == \
        ("Hi there", True)
    assert feed(TextTracker(ByteTokenizer(), ["END", "xy"]), b"abcxEN yEND") == ("abcxEN y", True)
    assert feed(TextTracker(ByteTokenizer(), ["zz"]), b"no stop here") == ("no stop here", False)


def test_a_possible_stop_prefix_and_a_partial_character_are_held_back() -> None:
    tracker = TextTracker(ByteTokenizer(), ["STOP"])
    assert tracker.push(ord("a")) == ("a", False)
    assert tracker.push(ord("S")) == ("", False)  # might begin STOP
    assert tracker.push(ord("T")) == ("", False)
    assert tracker.push(ord("x")) == ("STx", False)  # it did not
    euro = "€".encode()
    assert tracker.push(euro[0]) == ("", False)  # the first byte of a character
    assert tracker.push(euro[1]) == ("", False)
    assert tracker.push(euro[2]) == ("€", False)
    assert tracker.push(None) == ("", False)  # a token without text (EOS)


def test_default_chat_template() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    template = ChatTemplate()
    assert template.render(messages, False) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert template.render(messages[1:], True) == "\nUser: Hi\nAssistant:"


def test_the_tokenizer_folders_chat_template_wins(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    assert load_chat_template(tmp_path).name == "default"
    (tmp_path / "tokenizer_config.json").write_text(
        '{"eos_token": "</s>", "chat_template": "{% for m in messages %}<{{ m.role }}>'
        '{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>'
        '{% endif %}"}')
    template = load_chat_template(tmp_path)
    assert template.name == "tokenizer"
    assert template.render([{"role": "user", "content": "Hi"}], False) == \
        "<user>Hi</s><assistant>"
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(UserError, match="chat template does not compile"):
        load_chat_template(tmp_path)
