"""OpenAI response bodies: completions and chat completions, whole and streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tttlm.serve.worker import Delta, Done


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


@dataclass
class Reply:
    """Accumulates one request's events into OpenAI's shapes (``kind``: ``"completion"`` or
    ``"chat"``)."""

    kind: str
    model: str
    tokenizer: Decoder
    want_logprobs: bool
    return_token_ids: bool
    session_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def _head(self, obj: str) -> dict[str, Any]:
        prefix = "cmpl" if self.kind == "completion" else "chatcmpl"
        head = {"id": f"{prefix}-{self.id}", "object": obj, "created": self.created,
                "model": self.model}
        if self.session_id is not None:
            head["session_id"] = self.session_id
        return head

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _entry(self, delta: Delta) -> dict[str, Any]:
        """One token's logprobs, in the shape of the endpoint."""
        piece = self._piece(delta.token)
        top = delta.top or []
        if self.kind == "chat":
            return {"token": piece, "logprob": delta.logprob, "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": self._piece(t), "logprob": lp,
                                      "bytes": list(self._piece(t).encode())} for t, lp in top]}
        return {"token": piece, "logprob": delta.logprob,
                "top": {self._piece(t): lp for t, lp in top}, "offset": len(self.text)}

    def _logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.kind == "chat":
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries],
                "text_offset": [e["offset"] for e in entries]}

    def _choice(self, text: str, entries: list[dict[str, Any]], finish: str | None,
                tokens: list[int] | None, stream: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice["text"] = text
        elif stream:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = self._logprobs(entries)
        choice["finish_reason"] = finish
        if self.return_token_ids and tokens is not None:
            choice["token_ids"] = tokens
        return choice

    # -------------------------------------------------------------------------- whole
    def add(self, delta: Delta) -> None:
        if self.want_logprobs:
            self.entries.append(self._entry(delta))
        self.text += delta.text
        self.tokens.append(delta.token)

    def whole(self, done: Done) -> dict[str, Any]:
        self.text += done.text
        return {**self._head(self.object),
                "choices": [self._choice(self.text, self.entries, done.finish_reason,
                                         self.tokens, stream=False)],
                "usage": usage(done)}

    # ------------------------------------------------------------------------- stream
    def chunk_object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion.chunk"

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        if self.kind != "chat":
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}
        return {**self._head(self.chunk_object()), "choices": [choice]}

    def chunk(self, delta: Delta) -> dict[str, Any] | None:
        entries = [self._entry(delta)] if self.want_logprobs else []
        self.text += delta.text
        if not delta.text and not entries and not self.return_token_ids:
            return None
        return {**self._head(self.chunk_object()),
                "choices": [self._choice(delta.text, entries, None, [delta.token],
                                         stream=True)]}

    def last_chunks(self, done: Done, include_usage: bool) -> list[dict[str, Any]]:
        self.text += done.text
        out = [{**self._head(self.chunk_object()),
                "choices": [self._choice(done.text, [], done.finish_reason, None,
                                         stream=True)]}]
        if include_usage:
            out.append({**self._head(self.chunk_object()), "choices": [],
                        "usage": usage(done)})
        return out
