"""Finding pictures in OpenAI-style messages and in the bodies of the webui's completion and chat
requests: the request-side counterpart of ``prompt``, which finds them in a prompt's text.

Nothing is decoded here: a picture is a source (a span of the body's own text) until it is used.
"""

from __future__ import annotations

from .errors import LlavaError
from .images import ImageSource, InlineImage, UnreachableImage
from .prompt import MEDIA_PLACEHOLDER, parse_prompt, reference_pictures


class RequestProblem(LlavaError):
    """A request body that cannot be used, with the reason in plain words."""


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


def body_prompts(body: dict) -> list[str]:
    """The text prompts of a completion body (``prompt`` is a text or a list of them)."""
    prompt = body.get("prompt")
    return [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]


def pictures_in_body(path: str, body: dict) -> list[ImageSource]:
    """Every picture a completion or chat request carries, in order."""
    sources = message_pictures(body.get("messages"))
    if not path.endswith("/chat/completions"):
        prompts = body_prompts(body)
        placeholders = sum(prompt.count(MEDIA_PLACEHOLDER) for prompt in prompts)
        if sources and placeholders != len(sources):
            raise RequestProblem(f"the request's 'messages' carry {len(sources)} picture(s) and its prompt has "
                                 f"{placeholders} '{MEDIA_PLACEHOLDER}' placeholder(s): put one placeholder where "
                                 "each picture goes")
        for prompt in prompts:
            if "<" in prompt:
                sources += [image.source for image in parse_prompt(prompt).images]
    return sources


def reference_prompts(body: dict, references: dict[str, ImageSource]) -> dict:
    """The body with each ``data:`` URL of its prompts replaced by a short reference kept in ``references``."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {**body, "prompt": reference_pictures(prompt, references)}
    if isinstance(prompt, list):
        return {**body, "prompt": [reference_pictures(p, references) if isinstance(p, str) else p for p in prompt]}
    return body
