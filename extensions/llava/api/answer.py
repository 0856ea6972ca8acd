"""A completion's answer as its client should see it: the true ``usage``, and its own prompt echoed.

The webui counts a completion's prompt before the pictures are widened to their slots (and, behind
the request check, with each picture as a short reference). The tokenizer hook records the true
prompt length of each generation in the request's session; ``AnswerCorrection`` rewrites ``usage``
and ``finish_reason`` of the answer with them. With ``echo`` the webui puts the prompt it received in
front of the text: the prompt with references, which becomes the client's own prompt again. Both the
JSON answer and the events of a streamed one are corrected.
"""

from __future__ import annotations

import json

from ..prompt.messages import body_prompts
from ..sessions import Session


class AnswerCorrection:
    """An ASGI ``send`` that corrects the answer passing through it; ``body`` is the request as the client
    sent it, ``prompts`` its prompts as the webui received them."""

    def __init__(self, send, session: Session, body: dict, prompts: list[str]):
        self.send = send
        self.session = session
        self.max_tokens = body.get("max_tokens")
        # the prompts the webui echoes, longest first, with the client's own
        echoed = zip(prompts, body_prompts(body)) if body.get("echo") else ()
        self.echoed = sorted(((ours, theirs) for ours, theirs in echoed if ours != theirs), key=lambda p: -len(p[0]))
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
        elif message["type"] == "http.response.body" and self.streamed and (
                self.echoed or b'"usage"' in message.get("body", b"")):
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
        return self._correct_echo(answer) | self._correct_usage(answer)

    def _correct_echo(self, answer) -> bool:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        changed = False
        for choice in choices if isinstance(choices, list) and self.echoed else ():
            text = choice.get("text") if isinstance(choice, dict) else None
            ours, theirs = next(((o, t) for o, t in self.echoed if isinstance(text, str) and text.startswith(o)),
                                (None, None))
            if ours is not None:
                choice["text"] = theirs + text[len(ours):]
                changed = True
        return changed

    def _correct_usage(self, answer) -> bool:
        generations = list(self.session.prompt_lengths)
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
