"""The request check: middleware that looks at the pictures of completion and chat requests before the
webui's endpoints run, and keeps them for the request's own use.

It sits inside the webui's own CORS and host checks, and does nothing for a request that fails the
webui's key check or is not JSON: those reach the webui untouched, which answers them. For the rest
it reads the body once and:

- refuses, with a 400 naming the picture and the reason, a malformed image part or a picture whose
  header is not a usable picture (nothing is decoded past the header here), or more pixels to embed
  than one request may have;
- replaces each ``data:`` URL in a completion prompt with a short reference to the body's own copy,
  so that the webui's tokenizer never reads base64; the pictures live exactly as long as the request;
- corrects the usage of a completion (``usage``);
- turns an error raised after a streamed response has started into an error event the client can read.

Its webui parts (the key check, the "embed all" setting) come as arguments, so it is tested without
the webui.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from ..images import ImageError, ImageSource, UnreachableImage
from ..messages import RequestProblem, pictures_in_body, reference_prompts
from ..sessions import Sessions
from .asgi import body_message, error_body, errors_as_events, is_json, read_body, replay, send_json
from .generate_route import GENERATE_PATH
from .usage import UsageCorrection

CHECKED_PATHS = ("/v1/completions", "/v1/chat/completions", GENERATE_PATH)
# The pixels one request may ask to embed (decoded at 3 bytes a pixel: about 300 MB).
MAX_REQUEST_PIXELS = 100_000_000


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


class PictureRequestMiddleware:
    """``authorized(scope)`` is the webui's key check, ``embed_all()`` the current setting, and
    ``sessions`` where the request's record is kept while it is served."""

    def __init__(self, app, authorized: Callable[[dict], bool], embed_all: Callable[[], bool],
                 sessions: Sessions, paths: tuple[str, ...] = CHECKED_PATHS):
        self.app = app
        self.authorized = authorized
        self.embed_all = embed_all
        self.sessions = sessions
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths
                or not is_json(scope) or not self.authorized(scope)):
            return await self.app(scope, receive, send)  # the webui answers these itself
        raw, ended = await read_body(receive)
        if ended is not None:
            return await self.app(scope, replay([ended], receive), send)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await self.app(scope, replay([body_message(raw)], receive), send)
        try:
            sources = pictures_in_body(scope["path"], body)
            if sources:
                await asyncio.to_thread(check_pictures, sources, self.embed_all())
        except (RequestProblem, ImageError) as error:
            return await send_json(send, 400, error_body(str(error)))
        with self.sessions.request() as session:
            if scope["path"] != "/v1/chat/completions":
                rewritten = reference_prompts(body, session.references)
                if session.references:  # the body is sent on unchanged when it holds no picture data
                    raw = json.dumps(rewritten).encode()
            corrected = UsageCorrection(send, session, body) if scope["path"] == "/v1/completions" else send
            await errors_as_events(self.app, scope, replay([body_message(raw)], receive), corrected)
