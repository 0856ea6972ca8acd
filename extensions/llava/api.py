"""Everything HTTP: the seed's ``/api/v1/generate`` route, where pictures stand in a request body, and
the middleware that checks them before the webui's endpoints run.

The middleware sits inside the webui's own CORS and host checks, and does nothing for a request that
fails the webui's key check or is not JSON: those reach the webui untouched, which answers them. For the
rest it reads the body once and:

- refuses, with a 400 naming the picture and the reason, a malformed image part or a picture whose
  header is not a usable picture (nothing is decoded past the header here), or more pixels to embed
  than one request may have;
- replaces each ``data:`` URL in a completion prompt with a short reference to the body's own copy,
  so that the webui's tokenizer never reads base64; the pictures live exactly as long as the request;
- corrects the usage of a completion (the webui counts the prompt before the pictures are expanded);
- turns an error raised after a streamed response has started into an error event the client can read.

The ASGI pieces take their webui parts (the key check, the completion function) as arguments, so they
are tested without the webui.
"""


import asyncio
import contextvars
import json
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .errors import LlavaError
from .images import ImageError, ImageSource, InlineImage, UnreachableImage
from .prompt import MEDIA_PLACEHOLDER, parse_prompt, reference_pictures

GENERATE_PATH = "/api/v1/generate"
CHECKED_PATHS = ("/v1/completions", "/v1/chat/completions", GENERATE_PATH)
# The pixels one request may ask to embed (decoded at 3 bytes a pixel: about 300 MB).
MAX_REQUEST_PIXELS = 100_000_000
_RENAMED = {"max_new_tokens": "max_tokens"}
_STOP_FIELDS = ("stop", "stopping_strings", "custom_stopping_strings")
_DROPPED = {"prompt", "stream", *_STOP_FIELDS}


class RequestProblem(LlavaError):
    """A request body that cannot be used, with the reason in plain words."""


# ---------------------------------------------------------------- one request's pictures


@dataclass
class RequestScope:
    """What the extension knows about the HTTP request being served, in this request's context only."""

    references: dict[str, ImageSource] = field(default_factory=dict)
    # per generation: (prompt tokens with the pictures expanded, the context it had)
    generations: list[tuple[int, int]] = field(default_factory=list)
    generation_state: dict | None = None  # the webui's state of the generation being prepared
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_generation(self, prompt_length: int, context_length: int) -> None:
        with self.lock:
            self.generations.append((int(prompt_length), int(context_length)))


current_request: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("llava_request", default=None)


def request_references() -> dict[str, ImageSource] | None:
    """The pictures that references in the current request's prompts stand for."""
    scope = current_request.get()
    return scope.references if scope is not None else None


# ---------------------------------------------------------------- the request body


def message_pictures(messages, where: str = "messages") -> list[ImageSource]:
    """The pictures of OpenAI-style ``messages``, in order; malformed parts are refused."""
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise RequestProblem(f"'{where}' must be a list of messages")
    sources = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RequestProblem(f"message {i} of '{where}' is not an object")
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise RequestProblem(f"message {i} has an image_url part without a text 'url' "
                                     "(expected {\"image_url\": {\"url\": \"data:image/...;base64,...\"}})")
            sources.append(source_of_url(url))
    return [source.at_position(n) for n, source in enumerate(sources, 1)]


def source_of_url(url: str) -> ImageSource:
    """A data URL is opened; any other address is refused, never fetched."""
    if url[:5].lower() == "data:":
        return InlineImage.from_url(url, origin="in the request")
    return UnreachableImage(url[:200], origin="in the request")


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    return [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]


def pictures_in_body(path: str, body: dict) -> list[ImageSource]:
    """Every picture a completion or chat request carries, in order."""
    sources = message_pictures(body.get("messages"))
    if not path.endswith("/chat/completions"):
        placeholders = sum(prompt.count(MEDIA_PLACEHOLDER) for prompt in _prompts(body))
        if sources and placeholders != len(sources):
            raise RequestProblem(f"the request's 'messages' carry {len(sources)} picture(s) and its prompt has "
                                 f"{placeholders} '{MEDIA_PLACEHOLDER}' placeholder(s): put one placeholder where "
                                 "each picture goes")
        for prompt in _prompts(body):
            if "<" in prompt:
                sources += [image.source for image in parse_prompt(prompt).images]
    return sources


def reference_prompts(body: dict, scope: RequestScope) -> dict:
    """The body with each ``data:`` URL of its prompts replaced by a short reference kept in ``scope``."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {**body, "prompt": reference_pictures(prompt, scope.references)}
    if isinstance(prompt, list):
        return {**body, "prompt": [reference_pictures(p, scope.references) if isinstance(p, str) else p
                                   for p in prompt]}
    return body


def check_pictures(sources: list[ImageSource], embed_all: bool) -> None:
    """Refuse what cannot be used, from the pictures' headers alone. As in generation, only the
    pictures to embed are looked at (all with "embed all" on, else the last); a web address is
    refused wherever it stands, since the webui would otherwise fetch it."""
    embedded_pixels = 0
    embedded = set(range(len(sources))) if embed_all else {len(sources) - 1}
    for i, source in enumerate(sources):
        if isinstance(source, UnreachableImage):
            source.load()  # raises: never fetched
        if i in embedded:
            width, height = source.header()
            embedded_pixels += width * height
    if embedded_pixels > MAX_REQUEST_PIXELS:
        raise RequestProblem(f"the pictures to embed hold {embedded_pixels:,} pixels; one request may hold "
                             f"{MAX_REQUEST_PIXELS:,} (send smaller pictures, fewer of them, or turn "
                             "\"embed all\" off)")


# ---------------------------------------------------------------- the seed's route


def completion_body(seed_request: dict) -> dict:
    """A seed ``/api/v1/generate`` body as the host's completion request body."""
    if not isinstance(seed_request, dict) or not isinstance(seed_request.get("prompt"), str):
        raise RequestProblem("the request needs a JSON object with a text field 'prompt'")
    body = {"prompt": seed_request["prompt"], "stream": False}
    stops = []
    for name in _STOP_FIELDS:  # every stop list counts, none replaces another
        value = seed_request.get(name)
        for stop in [value] if isinstance(value, str) else value or []:
            if isinstance(stop, str) and stop not in stops:
                stops.append(stop)
    if stops:
        body["stop"] = stops
    for key, value in seed_request.items():
        if key not in _DROPPED:
            body[_RENAMED.get(key, key)] = value
    body.setdefault("max_tokens", 200)
    return body


def seed_response(completion: dict) -> dict:
    """The host's completion response in the seed's shape."""
    choices = completion.get("choices") or [{}]
    return {"results": [{"text": choices[0].get("text", "")}]}


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def add_generate_route(app, complete: Callable[[dict, threading.Event], dict], dependencies=()) -> None:
    """Serve the seed's endpoint on ``app``, behind the webui's own ``dependencies`` (its key check).

    ``complete(body, stop_event)`` runs a completion request body; ``stop_event`` is set when the
    client goes away, which stops the generation. The body must be a JSON object sent as JSON: a page on
    another site cannot send that without the browser asking the server first (CORS preflight).
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def generate(request: Request):
        if not _is_json(request.scope):
            return JSONResponse(status_code=415, content=error_body("send the request as JSON "
                                                                    "(Content-Type: application/json)"))
        try:
            seed_request = json.loads(await request.body())
        except ValueError:
            return JSONResponse(status_code=400, content=error_body("the request body is not valid JSON"))
        stop_event = threading.Event()
        monitor = asyncio.create_task(_set_on_disconnect(request, stop_event))
        try:
            body = completion_body(seed_request)
            completion = await asyncio.to_thread(complete, body, stop_event)
        except LlavaError as error:
            return JSONResponse(status_code=400, content=error_body(str(error)))
        except Exception as error:  # the host's own request errors carry a 4xx code
            code = getattr(error, "code", None)
            if isinstance(code, int) and 400 <= code < 500:
                return JSONResponse(status_code=code, content=error_body(getattr(error, "message", str(error))))
            raise
        finally:
            stop_event.set()
            monitor.cancel()
        return seed_response(completion)

    app.add_api_route(GENERATE_PATH, generate, methods=["POST"], dependencies=list(dependencies))


async def _set_on_disconnect(request, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stop_event.set()
            return


# ---------------------------------------------------------------- the middleware


def _is_json(scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media_type = value.split(b";")[0].strip().lower()
            return media_type == b"application/json" or media_type.endswith(b"+json")
    return False


class PictureRequestMiddleware:
    """Checks the pictures of completion and chat requests, and keeps them for the request's own use.

    ``authorized(scope)`` is the webui's key check; ``embed_all()`` the current setting.
    """

    def __init__(self, app, authorized: Callable[[dict], bool], embed_all: Callable[[], bool],
                 paths: tuple[str, ...] = CHECKED_PATHS):
        self.app = app
        self.authorized = authorized
        self.embed_all = embed_all
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths
                or not _is_json(scope) or not self.authorized(scope)):
            return await self.app(scope, receive, send)  # the webui answers these itself
        raw, ended = await _read_body(receive)
        if ended is not None:
            return await self.app(scope, _replay([ended], receive), send)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await self.app(scope, _replay([_body_message(raw)], receive), send)

        request = RequestScope()
        try:
            sources = pictures_in_body(scope["path"], body)
            if sources:
                await asyncio.to_thread(check_pictures, sources, self.embed_all())
        except (RequestProblem, ImageError) as error:
            return await _send_json(send, 400, error_body(str(error)))
        if scope["path"] != "/v1/chat/completions":
            rewritten = reference_prompts(body, request)
            if request.references:  # the body is sent on unchanged when it holds no picture data
                raw = json.dumps(rewritten).encode()
        token = current_request.set(request)
        try:
            patched_send = _UsageCorrection(send, request, body) if scope["path"] == "/v1/completions" else send
            await _errors_as_events(self.app, scope, _replay([_body_message(raw)], receive), patched_send)
        finally:
            current_request.reset(token)


async def _read_body(receive) -> tuple[bytes, dict | None]:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return b"", message
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks), None


def _body_message(raw: bytes) -> dict:
    return {"type": "http.request", "body": raw, "more_body": False}


def _replay(messages: list, receive: Callable[[], Awaitable[dict]]):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _send_json(send, status: int, content: dict) -> None:
    payload = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def _errors_as_events(app, scope, receive, send) -> None:
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
        problem = _first_error(error)
        message = getattr(problem, "message", None) or str(problem) or type(problem).__name__
        event = {"error": {"message": message, "type": "invalid_request_error" if getattr(problem, "code", 500) < 500
                           else "server_error", "param": getattr(problem, "param", None), "code": None}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class _UsageCorrection:
    """The webui counts a completion's prompt before the pictures are expanded (and, here, with each
    picture as a short reference). The tokenizer hook records the true prompt length of each
    generation; this rewrites ``usage`` and ``finish_reason`` of the answer with them: the JSON
    answer, or the events of a streamed one that carry usage."""

    def __init__(self, send, request: RequestScope, body: dict):
        self.send = send
        self.request = request
        self.max_tokens = body.get("max_tokens")
        self.start: dict | None = None
        self.streamed = False
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message.get("status") == 200:
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streamed = content_type.startswith(b"text/event-stream")
            if content_type.startswith(b"application/json"):
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.streamed and b'"usage"' in message.get("body", b""):
            message = {**message, "body": self._corrected_events(message["body"])}
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            payload = self._corrected_json(b"".join(self.chunks))
            headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": payload})
            return
        await self.send(message)

    def _corrected_json(self, raw: bytes) -> bytes:
        try:
            answer = json.loads(raw)
        except ValueError:
            return raw
        return json.dumps(answer).encode() if self._correct(answer) else raw

    def _corrected_events(self, raw: bytes) -> bytes:
        lines = raw.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data: {"):
                try:
                    event = json.loads(line[6:])
                except ValueError:
                    continue
                if self._correct(event):
                    lines[i] = b"data: " + json.dumps(event).encode()
        return b"\n".join(lines)

    def _correct(self, answer) -> bool:
        generations = list(self.request.generations)
        usage = answer.get("usage") if isinstance(answer, dict) else None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not generations or not isinstance(usage, dict) or not isinstance(choices, list):
            return False
        usage["prompt_tokens"] = sum(length for length, _ in generations)
        completion = usage.get("completion_tokens") or 0
        usage["total_tokens"] = usage["prompt_tokens"] + completion
        if len(choices) == len(generations) == 1 and choices[0].get("finish_reason") in ("stop", "length"):
            # the webui's rule, with the true prompt length (per choice it knows only the total)
            (length, context), = generations
            run_out = isinstance(self.max_tokens, int) and completion >= self.max_tokens
            choices[0]["finish_reason"] = "length" if run_out or length + completion >= context else "stop"
        return True
