"""ASGI plumbing the request check needs: reading a body once and handing it on, answering with JSON,
and turning an error raised inside a started event stream into an event the client can read."""

from __future__ import annotations

import email.message
import json
from typing import Awaitable, Callable


def first_header(scope, name: bytes) -> str | None:
    """The first header called ``name`` (lower case), as starlette's ``Headers.get`` reads it; None when
    there is none."""
    return next((value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name), None)


def content_type(scope) -> str:
    """The request's first Content-Type header, as the webui's server reads it; "" when there is none."""
    return first_header(scope, b"content-type") or ""


def is_json_type(value: str) -> bool:
    """``application/json`` or ``application/*+json``, parameters aside, as FastAPI tells JSON."""
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def read_as_json(scope) -> bool:
    """Whether the webui's server parses the body as JSON: it does when the type says JSON, and also
    when there is no Content-Type at all."""
    value = content_type(scope)
    return not value or is_json_type(value)


def declares_json(scope) -> bool:
    """Whether the request says its body is JSON (a page on another site cannot say so without the
    browser asking the server first)."""
    value = content_type(scope)
    return bool(value) and is_json_type(value)


def error_body(message: str) -> dict:
    """An error answer in the shape of the webui's (OpenAI's) errors."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


async def read_body(receive) -> tuple[bytes, dict | None]:
    """The whole request body, or (b"", the message that ended it early: a disconnect)."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return b"", message
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks), None


def body_message(raw: bytes) -> dict:
    return {"type": "http.request", "body": raw, "more_body": False}


def replay(messages: list, receive: Callable[[], Awaitable[dict]]):
    """A ``receive`` that gives ``messages`` first, then whatever the client sends next."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def send_json(send, status: int, content: dict) -> None:
    payload = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class NullAsRefusal:
    """A ``send`` for the webui's logits route, which answers a generation that failed with 200 ``null``:
    when ``refusal()`` says why the extension refused it, the answer is that refusal as a 400."""

    def __init__(self, send, refusal: Callable[[], str | None]):
        self.send = send
        self.refusal = refusal
        self.start = None

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message.get("status") == 200:
            self.start = message  # held until the body shows whether it is null
            return
        if self.start is not None and message["type"] == "http.response.body":
            start, self.start = self.start, None
            reason = self.refusal()
            if reason and message.get("body", b"").strip() == b"null" and not message.get("more_body", False):
                return await send_json(self.send, 400, error_body(reason))
            await self.send(start)
        await self.send(message)


async def errors_as_events(app, scope, receive, send) -> None:
    """Run ``app``; an error raised once a streamed (server-sent events) response has started becomes
    an ``error`` event and the end of the stream, instead of a cut connection."""
    started = {"stream": False, "open": False}

    async def watched(message):
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            started["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            started["open"] = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            started["open"] = False
        await send(message)

    try:
        await app(scope, receive, watched)
    except Exception as error:
        if not (started["stream"] and started["open"]):
            raise
        problem = first_error(error)
        message = getattr(problem, "message", None) or str(problem) or type(problem).__name__
        event = {"error": {"message": message, "type": "invalid_request_error" if getattr(problem, "code", 500) < 500
                           else "server_error", "param": getattr(problem, "param", None), "code": None}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
