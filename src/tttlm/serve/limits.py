"""Request limits and access: the body size cap and the optional bearer token."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from tttlm.serve.api_errors import NO_RETRY, APIError, error_body


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 2048  # tokens generated per request
    max_prompt_tokens: int = 1 << 20  # new tokens read per request (a document)
    max_request_bytes: int = 16 << 20  # size of a request body
    timeout: float = 600.0  # seconds from arrival to the end of generation
    max_stops: int = 16

    def check(self) -> None:
        from tttlm.errors import UserError

        for name in ("max_tokens", "max_prompt_tokens", "max_request_bytes", "timeout"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be > 0")


def check_bearer(header: str | None, api_key: str | None) -> None:
    """Accept a request when no key is set, or when it sends ``Authorization: Bearer KEY``."""
    if api_key is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             api_key.encode()):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' with "
                            "the key the server was started with (--api-key or TTTLM_API_KEY)",
                       code="invalid_api_key")


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413 before anything
    parses it (a declared ``Content-Length`` is refused unread; a chunked body is read up to
    the limit)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.limit
        except ValueError:
            await _send_error(send, 400, "the Content-Length header is not a number")
            return
        if too_big:
            await _send_error(send, 413, self._message(int(declared)))
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay(message), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _send_error(send, 413, self._message(len(body)))
                return
        await self.app(scope, _replay({"type": "http.request", "body": body,
                                       "more_body": False}, receive), send)

    def _message(self, size: int) -> str:
        return (f"the request body ({size} bytes or more) is over the server's limit of "
                f"{self.limit} bytes; send less (a long document in several requests to one "
                "session) or raise --max-request-bytes")


def _replay(first: dict[str, Any], then: Any = None) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return first
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.encode(), v.encode()) for k, v in NO_RETRY.items())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
