"""Request bodies of the OpenAI endpoints (the fields tttlm understands) and of sessions.

Unknown fields are ignored, as OpenAI-compatible servers do; fields tttlm cannot honour with
their non-default values (``n > 1``, ``echo``, penalties, ...) are refused by the app with a
400 that names them, rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both completion endpoints share. ``session_id``, ``top_k``, ``ignore_eos``,
    ``return_token_ids`` and ``rag`` (this request's recall: ``off``, ``end`` or ``chunk``;
    default the server's ``--rag``) are extensions (``extra_body`` in the openai client)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    session_id: str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    rag: Literal["off", "end", "chunk"] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None


class SessionCreate(BaseModel):
    """``POST /v1/sessions``: a new session, optionally after reading a document (text, or
    token ids) once."""

    model_config = ConfigDict(extra="ignore")
    session_id: str | None = None
    document: str | list[int] | None = None


class SessionFork(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str | None = None
