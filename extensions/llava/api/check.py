"""The request check: middleware that looks at the pictures of completion and chat requests before the
webui's endpoints run, and keeps them for the request's own use.

It sits inside the webui's own CORS and host checks, and does nothing for a request that fails the
webui's key check (``/v1/messages`` has its own) or whose body the webui does not parse as JSON
(FastAPI parses a body without a Content-Type as JSON: so does the check): those reach the webui
untouched, which answers them. For the rest it reads the body once and:

- refuses, with a 400 naming the picture and the reason, a malformed image part or a picture whose
  header is not a usable picture (nothing is decoded past the header here), or more pixels to embed
  than one request may have;
- replaces each ``data:`` URL in a completion prompt with a short reference to the body's own copy,
  so that the webui's tokenizer never reads base64; the pictures live exactly as long as the request;
- corrects the usage of a completion, and its echoed prompt (``answer``);
- turns an error raised after a streamed response has started into an error event the client can read.

Its webui parts (the key check, the "embed all" setting) come as arguments, so it is tested without
the webui.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Callable

from ..media.items import ItemError, MediaItem
from ..prompt.messages import RequestProblem, body_prompts, item_groups, reference_messages, reference_prompts
from ..sessions import Sessions
from ..settings import DEFAULTS, SETTING_PREFIX
from .answer import AnswerCorrection
from .asgi import NullAsRefusal, body_message, error_body, errors_as_events, read_as_json, read_body, replay, send_json
from .generate_route import GENERATE_PATH

MESSAGES_PATH = "/v1/messages"  # the Anthropic-style route: its own key header and error shape
LOGITS_PATH = "/v1/internal/logits"  # the webui answers a failure of its generation with 200 null there
CHECKED_PATHS = ("/v1/completions", "/v1/chat/completions", MESSAGES_PATH, GENERATE_PATH, LOGITS_PATH)
# The pixels one request may ask to embed (decoded at 3 bytes a pixel: about 300 MB).
MAX_REQUEST_PIXELS = 100_000_000


def check_item_count(sources: list[MediaItem], max_items: int) -> None:
    if len(sources) > max_items:
        raise RequestProblem(f"the request holds {len(sources):,} pictures; one request may hold {max_items:,} "
                             f"(the setting {SETTING_PREFIX}max_items)")


def check_pictures(sources: list[MediaItem], embed_all: bool, group_sizes: list[int] | None = None) -> None:
    """Refuse what cannot be used, from the pictures' headers alone. As in generation, only the
    pictures' headers to embed are read (all with "embed all" on, else the last); of the others only
    the first bytes: a web address (the webui would fetch it), a broken tag or a format not named is
    refused wherever it stands. ``group_sizes`` are the pictures of each prompt the request makes (one
    prompt by default): each prompt's last picture is embedded, and all count towards the budget."""
    embedded_pixels = 0
    ends = list(itertools.accumulate(group_sizes or [len(sources)]))
    embedded = set(range(len(sources))) if embed_all else {end - 1 for end in ends}
    for i, source in enumerate(sources):
        if i in embedded:
            width, height = source.header()
            embedded_pixels += width * height
        else:  # the webui opens it too: a format not named is refused from its first bytes, nothing decoded
            source.check_start()
    if embedded_pixels > MAX_REQUEST_PIXELS:
        raise RequestProblem(f"the pictures to embed hold {embedded_pixels:,} pixels; one request may hold "
                             f"{MAX_REQUEST_PIXELS:,} (send smaller pictures, fewer of them, or turn "
                             "\"embed all\" off)")


class PictureRequestMiddleware:
    """``authorized(scope)`` is the webui's key check, ``embed_all()`` the current setting, and
    ``sessions`` where the request's record is kept while it is served."""

    def __init__(self, app, authorized: Callable[[dict], bool], embed_all: Callable[[], bool],
                 sessions: Sessions, paths: tuple[str, ...] = CHECKED_PATHS,
                 max_items: Callable[[], int] = lambda: DEFAULTS["max_items"]):
        self.app = app
        self.max_items = max_items
        self.authorized = authorized
        self.embed_all = embed_all
        self.sessions = sessions
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths
                or not read_as_json(scope) or not self.authorized(scope)):
            return await self.app(scope, receive, send)  # the webui answers these itself
        raw, ended = await read_body(receive)
        if ended is not None:
            return await self.app(scope, replay([ended], receive), send)
        body = parsed(raw)
        if not isinstance(body, dict):  # not JSON, or not an object: the webui answers it with its own error
            return await self.app(scope, replay([body_message(raw)], receive), send)
        path = scope["path"]
        try:
            salt = cache_salt(body)
            groups = item_groups(path, body)
            sources = [source for group in groups for source in group]
            check_item_count(sources, self.max_items())
            if sources:
                await asyncio.to_thread(check_pictures, sources, self.embed_all(), [len(group) for group in groups])
        except (RequestProblem, ItemError) as error:
            return await send_json(send, 400, refusal_body(path, str(error)))
        with self.sessions.request() as session:
            session.cache_salt = salt
            rewritten = (reference_prompts if path in TEXT_PROMPT_PATHS else reference_messages)(body, session.references)
            if session.references:  # the body is sent on unchanged when it holds no picture data
                raw = json.dumps(rewritten).encode()
            if path == "/v1/completions":
                send = AnswerCorrection(send, session, body, body_prompts(rewritten))
            elif path == LOGITS_PATH:
                send = NullAsRefusal(send, lambda: session.refusal)
            receive = replay([body_message(raw)], receive)
            if path == MESSAGES_PATH:  # the webui turns errors of its Anthropic stream into events itself
                return await self.app(scope, receive, send)
            await errors_as_events(self.app, scope, receive, send)


# Routes whose prompt is a text the webui tokenizes before the tokenizer hook runs.
TEXT_PROMPT_PATHS = ("/v1/completions", GENERATE_PATH, LOGITS_PATH)


def cache_salt(body: dict) -> str | None:
    """The request's ``cache_salt`` (vLLM's field): requests with the same salt own the earlier prompts
    they leave, reused by no other request."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise RequestProblem("'cache_salt' must be a non-empty text")
    return salt


def parsed(raw: bytes):
    """The body as the webui's server parses it; None where that fails (it then answers the error)."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # invalid, undecodable or nested too deep
        return None


def refusal_body(path: str, message: str) -> dict:
    """A refusal in the shape of the route's own errors."""
    if path == MESSAGES_PATH:
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return error_body(message)
