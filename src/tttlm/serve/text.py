"""Text in and out: incremental decoding with stop strings, and chat templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tttlm.errors import UserError


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class TextTracker:
    """Turns generated ids into text deltas and finds stop strings.

    Text that could still become a stop string (a suffix of the text that is a prefix of one)
    and a character whose bytes are incomplete are held back until the next token decides, so
    a client never sees text that a stop string later takes back.
    """

    def __init__(self, tokenizer: Decoder, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token: int | None) -> tuple[str, bool]:
        """Add a token (None: one that carries no text, such as EOS); return the new text
        that is safe to show and whether a stop string was completed."""
        if token is not None:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops)
                if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        end = len(self.text)
        if self.text.endswith("\ufffd"):
            end -= 1  # the first bytes of a character: wait for the rest
        return self._emit(end - self._held(self.text[:end])), False

    def flush(self) -> str:
        """Everything not yet shown (the end of a generation)."""
        return self._emit(len(self.text))

    def _held(self, text: str) -> int:
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _emit(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


# ------------------------------------------------------------------------ chat templates
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User",
              "assistant": "Assistant", "tool": "Tool"}


class ChatTemplate:
    """The plain default: one ``Role: content`` line per message, then ``Assistant:``.

    A continued session renders only the new messages, after a newline (the previous reply
    ends wherever the model stopped). Generation stops at EOS and at ``\\nUser:``.
    """

    name = "default"
    stops: tuple[str, ...] = ("\nUser:",)

    def render(self, messages: list[dict[str, str]], continuing: bool) -> str:
        lines = [f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}"
                 for m in messages]
        return ("\n" if continuing else "") + "\n".join([*lines, "Assistant:"])


class JinjaChatTemplate(ChatTemplate):
    """A Hugging Face chat template (``chat_template.jinja`` or ``tokenizer_config.json``),
    rendered in Jinja's sandbox as ``transformers`` does. ``bos_token`` renders empty: the
    server puts the BOS id in front of a new sequence itself."""

    name = "tokenizer"
    stops = ()

    def __init__(self, source: str, eos_token: str) -> None:
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("the model folder has a chat template, which needs jinja2; "
                            "pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as err:
            raise UserError(f"the model folder's chat template does not compile ({err}); "
                            "fix or remove it") from None
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, str]], continuing: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token="", eos_token=self.eos_token)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def load_chat_template(folder: Path) -> ChatTemplate:
    """The tokenizer folder's chat template when it has one, else the plain default."""
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{config_file} is not valid JSON ({err}); fix or remove "
                            "it") from None
    source: Any = None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source
                           if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return ChatTemplate()
    return JinjaChatTemplate(source, _token_text(config.get("eos_token")))
