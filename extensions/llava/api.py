"""HTTP glue: the seed's ``/api/v1/generate`` contract and an early check of request images.

Both are plain FastAPI/ASGI pieces with the generation function handed in, so they are
tested without the webui. The check runs before a request reaches the host's endpoint:
a streamed response has already sent its 200 status by the time generation starts, so a
bad image must be refused before that.
"""


import json
from typing import Awaitable, Callable

from .errors import LlavaError

GENERATE_PATH = "/api/v1/generate"
# Seed request fields that the OpenAI-style completion request names differently.
_RENAMED = {"max_new_tokens": "max_tokens", "stopping_strings": "stop", "custom_stopping_strings": "stop"}
_DROPPED = {"prompt", "stream"}


def completion_body(seed_request: dict) -> dict:
    """A seed ``/api/v1/generate`` body as the host's completion request body."""
    if not isinstance(seed_request, dict) or not isinstance(seed_request.get("prompt"), str):
        raise LlavaError("the request needs a JSON object with a text field 'prompt'")
    body = {"prompt": seed_request["prompt"], "stream": False}
    for key, value in seed_request.items():
        if key in _DROPPED:
            continue
        body[_RENAMED.get(key, key)] = value
    body.setdefault("max_tokens", 200)
    return body


def seed_response(completion: dict) -> dict:
    """The host's completion response in the seed's shape."""
    choices = completion.get("choices") or [{}]
    return {"results": [{"text": choices[0].get("text", "")}]}


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def add_generate_route(app, complete: Callable[[dict], dict]) -> None:
    """Serve the seed's endpoint on ``app``; ``complete`` runs a completion request body."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def generate(request: Request):
        try:
            seed_request = await request.json()
        except ValueError:
            return JSONResponse(status_code=400, content=error_body("the request body is not JSON"))
        try:
            body = completion_body(seed_request)
            completion = await asyncio.to_thread(complete, body)
        except LlavaError as error:
            return JSONResponse(status_code=400, content=error_body(str(error)))
        except Exception as error:  # the host's own request errors carry a 4xx code
            code = getattr(error, "code", None)
            if isinstance(code, int) and 400 <= code < 500:
                return JSONResponse(status_code=code, content=error_body(getattr(error, "message", str(error))))
            raise
        return seed_response(completion)

    app.add_api_route(GENERATE_PATH, generate, methods=["POST"])


class ImageCheckMiddleware:
    """Refuse a request whose images cannot be used, with a 400 naming the image and the reason.

    ``check(path, body)`` returns None when the request may go on, else the message.
    The body is read once and replayed to the application untouched.
    """

    def __init__(self, app, check: Callable[[str, dict], str | None], paths: tuple[str, ...]):
        self.app = app
        self.check = check
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        problem = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # the host answers malformed JSON itself
        if isinstance(body, dict):
            import asyncio
            problem = await asyncio.to_thread(self.check, scope["path"], body)
        if problem is None:
            return await self.app(scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send)
        payload = json.dumps(error_body(problem)).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list, receive: Callable[[], Awaitable[dict]]):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
