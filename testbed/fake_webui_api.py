"""A stand-in of the webui's API server (``modules.api``), for the fake host's ``api=True``.

It has what the real one (modules/api/script.py) has around the extension: a key check as a route
dependency, CORS for every origin, a host check middleware, its error handler, streamed answers as
server-sent events, and a completion endpoint that tokenizes the whole prompt for its usage count.
``calls`` records what its endpoints saw. The same cases run against the real webui in the
``test_real_*`` tests.
"""

from __future__ import annotations

import asyncio
import json
import types

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


class InvalidRequestError(Exception):
    def __init__(self, message, param=None):
        self.message, self.param, self.code = message, param, 400
        super().__init__(message)


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


class WebuiApi:
    def __init__(self, host):
        self.host = host
        self.calls = types.SimpleNamespace(encoded=[], prompts=[])
        self.app = self._app()
        self.modules = self._modules()

    def client(self):
        from fastapi.testclient import TestClient
        return TestClient(self.app, raise_server_exceptions=False)

    def completions(self, body, stop_event=None):
        host = self.host
        prompt = body["prompt"]
        self.calls.prompts.append(prompt)
        token_count = len(host.encode(prompt)[0])  # the webui's usage count, before the hook
        self.calls.encoded.append(len(prompt))
        state = host.state(max_new_tokens=body.get("max_tokens") or 4, truncation_length=4096,
                           messages=body.get("messages"))
        text = host.generate(prompt, state)
        completion_tokens = len(host.encode(text, add_bos_token=False)[0])
        text = (prompt if body.get("echo") else "") + text  # the webui echoes the prompt it received
        return {"choices": [{"index": 0, "text": text, "finish_reason":
                             "length" if token_count + completion_tokens >= 4096 else "stop"}],
                "usage": {"prompt_tokens": token_count, "completion_tokens": completion_tokens,
                          "total_tokens": token_count + completion_tokens}}

    def chat(self, body):
        parts = body["messages"][-1]["content"]
        count = sum(1 for p in parts if p.get("type") == "image_url")
        text = " ".join(p["text"] for p in parts if p.get("type") == "text")
        state = self.host.state(max_new_tokens=2, history={"internal": [], "visible": [], "messages": body["messages"]})
        state = self.host.script.state_modifier(state)
        return self.host.generate("<__media__>" * count + "\n\n" + text, state, is_chat=True)

    def _app(self) -> FastAPI:
        app = FastAPI()

        def verify_api_key(authorization: str = Header(None)):
            if authorization != f"Bearer {KEY}":
                raise HTTPException(status_code=401, detail="Unauthorized")

        self.verify_api_key, self.check_key = verify_api_key, [Depends(verify_api_key)]
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                           allow_headers=["*"])

        @app.exception_handler(InvalidRequestError)
        async def invalid(request, error):
            return JSONResponse(status_code=400, content=error_body(error.message))

        @app.middleware("http")
        async def validate_host(request, call_next):
            if request.headers.get("host", "").split(":")[0] not in ("localhost", "127.0.0.1", "testserver"):
                return JSONResponse(status_code=400, content={"detail": "Invalid host header"})
            return await call_next(request)

        @app.post("/v1/completions", dependencies=self.check_key)
        async def completions_route(request: Request, body: dict = Body(...)):
            if body.get("stream"):
                def events():
                    yield "data: {}\n\n"
                    yield f"data: {json.dumps(self.completions(body))}\n\n"
                return StreamingResponse(_iterate(events()), media_type="text/event-stream")
            return await asyncio.to_thread(self.completions, body)

        @app.post("/v1/chat/completions", dependencies=self.check_key)
        async def chat_route(body: dict = Body(...)):
            return {"choices": [{"message": {"content": await asyncio.to_thread(self.chat, body)}}]}

        def verify_anthropic_key(x_api_key: str = Header(None, alias="x-api-key")):
            if x_api_key != KEY:
                raise HTTPException(status_code=401, detail="Unauthorized")

        self.verify_anthropic_key = verify_anthropic_key

        @app.post("/v1/messages", dependencies=[Depends(verify_anthropic_key)])
        async def messages_route(body: dict = Body(...)):
            text = await asyncio.to_thread(self.chat, {"messages": anthropic_as_openai(body["messages"])})
            return {"type": "message", "content": [{"type": "text", "text": text}],
                    "usage": {"input_tokens": int(self.host.last_prompt_ids.shape[1]), "output_tokens": 1}}

        return app

    def _modules(self) -> dict:
        script = types.ModuleType("modules.api.script")
        script.app, script.check_key, script.verify_api_key = self.app, self.check_key, self.verify_api_key
        script.verify_anthropic_key = self.verify_anthropic_key
        completions = types.ModuleType("modules.api.completions")
        completions.completions = self.completions

        def stream_completions(body, stop_event=None):
            yield self.completions(body)

        completions.stream_completions = stream_completions
        typing = types.ModuleType("modules.api.typing")
        typing.CompletionRequest, typing.to_dict = (lambda **body: body), (lambda body: body)
        errors = types.ModuleType("modules.api.errors")
        errors.InvalidRequestError = InvalidRequestError
        package = types.ModuleType("modules.api")
        package.script, package.completions, package.typing, package.errors = script, completions, typing, errors
        return {"modules.api": package, "modules.api.script": script, "modules.api.completions": completions,
                "modules.api.typing": typing, "modules.api.errors": errors}


def anthropic_as_openai(messages: list) -> list:
    """The webui's mapping of Anthropic messages: a user's base64 image blocks become image_url parts (its
    other image blocks are dropped)."""
    converted = []
    for message in messages:
        content = message.get("content")
        parts = []
        for block in content if isinstance(content, list) else [{"type": "text", "text": str(content)}]:
            source = block.get("source") or {}
            if block.get("type") == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif block.get("type") == "image" and source.get("type") == "base64":
                url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
        converted.append({"role": message.get("role"), "content": parts})
    return converted


async def _iterate(generator):
    """Run a blocking generator's steps in threads, copying the context as the webui's server does."""
    while True:
        item = await asyncio.to_thread(next, generator, None)
        if item is None:
            return
        yield item
