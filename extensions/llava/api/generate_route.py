"""``POST /api/v1/generate``: the route of the 2023 webui's API extension, which the original llava
extension's README documents, served on today's API port through the webui's own completion logic.
"""


import asyncio
import json
import threading
from typing import Callable

from ..errors import LlavaError
from ..prompt.messages import RequestProblem
from .asgi import declares_json, error_body

GENERATE_PATH = "/api/v1/generate"
_RENAMED = {"max_new_tokens": "max_tokens"}
_STOP_FIELDS = ("stop", "stopping_strings", "custom_stopping_strings")
_DROPPED = {"prompt", "stream", *_STOP_FIELDS}


def completion_body(request: dict) -> dict:
    """A ``/api/v1/generate`` body as the webui's completion request body."""
    if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
        raise RequestProblem("the request needs a JSON object with a text field 'prompt'")
    body = {"prompt": request["prompt"], "stream": False}
    stops = []
    for name in _STOP_FIELDS:  # every stop list counts, none replaces another
        value = request.get(name)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(stop, str) for stop in value)):
            raise RequestProblem(f"'{name}' must be a text or a list of texts")
        for stop in [value] if isinstance(value, str) else value or []:
            if stop not in stops:
                stops.append(stop)
    if stops:
        body["stop"] = stops
    for key, value in request.items():
        if key not in _DROPPED:
            body[_RENAMED.get(key, key)] = value
    body.setdefault("max_tokens", 200)
    return body


def generate_response(completion: dict) -> dict:
    """The webui's completion answer in the 2023 route's shape."""
    choices = completion.get("choices") or [{}]
    return {"results": [{"text": choices[0].get("text", "")}]}


def add_generate_route(app, complete: Callable[[dict, threading.Event], dict], dependencies=()) -> None:
    """Serve the route on ``app``, behind the webui's own ``dependencies`` (its key check).

    ``complete(body, stop_event)`` runs a completion request body; ``stop_event`` is set when the
    client goes away, which stops the generation. The body must be a JSON object sent as JSON: a page on
    another site cannot send that without the browser asking the server first (CORS preflight).
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def generate(request: Request):
        if not declares_json(request.scope):
            return JSONResponse(status_code=415, content=error_body("send the request as JSON "
                                                                    "(Content-Type: application/json)"))
        try:
            generate_request = json.loads(await request.body())
        except (ValueError, RecursionError):  # invalid, undecodable or nested too deep, as the webui's routes
            return JSONResponse(status_code=400, content=error_body("the request body is not valid JSON"))
        stop_event = threading.Event()
        monitor = asyncio.create_task(_set_on_disconnect(request, stop_event))
        try:
            body = completion_body(generate_request)
            completion = await asyncio.to_thread(complete, body, stop_event)
        except LlavaError as error:
            return JSONResponse(status_code=400, content=error_body(str(error)))
        except Exception as error:  # the webui's own request errors carry a 4xx code
            code = getattr(error, "code", None)
            if isinstance(code, int) and 400 <= code < 500:
                return JSONResponse(status_code=code, content=error_body(getattr(error, "message", str(error))))
            raise
        finally:
            stop_event.set()
            monitor.cancel()
        return generate_response(completion)

    app.add_api_route(GENERATE_PATH, generate, methods=["POST"], dependencies=list(dependencies))


async def _set_on_disconnect(request, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stop_event.set()
            return
