"""The extension's parts of the webui's API server: the request check, innermost of the webui's
middleware (after its host and CORS checks, and doing nothing for a request its key check refuses),
and the 2023 route ``/api/v1/generate`` behind the webui's own key check."""

from __future__ import annotations

from ..api.asgi import first_header
from ..api.check import MESSAGES_PATH, PictureRequestMiddleware
from ..api.generate_route import add_generate_route
from ..errors import LlavaError
from .extension import embed_all_setting, log, max_items_setting, sessions, webui


def serve_api() -> None:
    args = webui().shared.args
    if not (getattr(args, "api", False) or getattr(args, "public_api", False)):
        return
    api_script = webui().api_script
    if api_script is None:
        return  # the 2023 webui serves /api/v1/generate from its own api extension
    from starlette.middleware import Middleware
    app = api_script.app
    if app.middleware_stack is not None:
        log("llava: the API server was already running when the extension was enabled; restart the webui "
            "with --extensions llava to use pictures over the API", "warning")
        return
    add_generate_route(app, _complete, dependencies=api_script.check_key)
    app.user_middleware.append(Middleware(PictureRequestMiddleware, authorized=_authorized,
                                          embed_all=embed_all_setting, sessions=sessions,
                                          max_items=max_items_setting))


def _authorized(scope) -> bool:
    """The webui's own key check of the route: ``x-api-key`` on its Anthropic-style route, else
    ``Authorization: Bearer``. The header is read as the webui's FastAPI reads it: the first of its name."""
    api_script = webui().api_script
    anthropic = scope.get("path") == MESSAGES_PATH and hasattr(api_script, "verify_anthropic_key")
    value = first_header(scope, b"x-api-key" if anthropic else b"authorization")
    try:
        if anthropic:
            api_script.verify_anthropic_key(x_api_key=value)
        else:
            api_script.verify_api_key(authorization=value)
    except Exception:
        return False
    return True


def _complete(body: dict, stop_event) -> dict:
    """Run a completion request body through the webui's own completion logic. Its streamed form is
    used: only that one checks ``stop_event`` between tokens, so a client that leaves stops the
    generation."""
    try:
        chunks = webui().stream_completions({**body, "stream": True}, stop_event)
    except ValueError as error:
        raise LlavaError(f"the request is not valid: {error}") from None
    texts = []
    try:
        for chunk in chunks:
            texts.append(chunk["choices"][0].get("text") or "")
            if stop_event.is_set():
                break
    finally:
        chunks.close()  # ends the generation thread now, not whenever the generator is collected
    return {"choices": [{"text": "".join(texts)}]}
