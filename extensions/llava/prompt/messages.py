"""Finding pictures in OpenAI-style messages and in the bodies of the webui's completion and chat
requests: the request-side counterpart of ``prompt``, which finds them in a prompt's text.

Nothing is decoded here: a picture is a source (a span of the body's own text) until it is used.
"""

from __future__ import annotations

from ..errors import LlavaError
from ..media.sources import ImageSource, InlineImage, RefusedImage
from .parse import MEDIA_PLACEHOLDER, parse_prompt, reference_pictures


class RequestProblem(LlavaError):
    """A request body that cannot be used, with the reason in plain words."""


def _listed_contents(messages, where: str):
    """(number, message, content) of each message whose content is a list of parts; a ``messages`` that
    is not a list of objects is refused."""
    if messages is None:
        return
    if not isinstance(messages, list):
        raise RequestProblem(f"'{where}' must be a list of messages")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RequestProblem(f"message {i} of '{where}' is not an object")
        if isinstance(message.get("content"), list):
            yield i, message, message["content"]


def _numbered(sources: list[ImageSource]) -> list[ImageSource]:
    return [source.at_position(n) for n, source in enumerate(sources, 1)]


def message_pictures(messages, where: str = "messages") -> list[ImageSource]:
    """The pictures of OpenAI-style ``messages``, in order; malformed parts are refused."""
    sources = []
    for i, _, content in _listed_contents(messages, where):
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise RequestProblem(f"message {i} has an image_url part without a text 'url' "
                                     "(expected {\"image_url\": {\"url\": \"data:image/...;base64,...\"}})")
            sources.append(source_of_url(url))
    return _numbered(sources)


def anthropic_pictures(messages) -> list[ImageSource]:
    """The pictures of Anthropic-style ``messages`` (``/v1/messages``), in the order the webui turns
    them into ``image_url`` parts: the image blocks of user messages. A picture given by address is
    refused (the webui would drop it without a word); a malformed block too."""
    sources = []
    for i, message, content in _listed_contents(messages, "messages"):
        if message.get("role") == "user":
            sources += [_anthropic_source(i, block.get("source")) for block in content
                        if isinstance(block, dict) and block.get("type") == "image"]
    return _numbered(sources)


def _anthropic_source(message: int, source) -> ImageSource:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str):
        return RefusedImage.web_address(source["url"][:200], origin="in the request")
    data, media_type = (source.get("data"), source.get("media_type", "image/png")) if kind == "base64" else (None, None)
    if not isinstance(data, str) or not data.strip() or not isinstance(media_type, str):
        raise RequestProblem(f"message {message} has an image block without base64 data (expected "
                             "{\"source\": {\"type\": \"base64\", \"media_type\": \"image/png\", \"data\": \"...\"}})")
    return InlineImage.from_url(f"data:{media_type};base64,{data}", origin="in the request")


def source_of_url(url: str) -> ImageSource:
    """A data URL is opened; any other address is refused, never fetched."""
    if url[:5].lower() == "data:":
        return InlineImage.from_url(url, origin="in the request")
    return RefusedImage.web_address(url[:200], origin="in the request")


def body_prompts(body: dict) -> list[str]:
    """The text prompts of a completion body (``prompt`` is a text or a list of them)."""
    prompt = body.get("prompt")
    return [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]


def pictures_in_body(path: str, body: dict) -> list[ImageSource]:
    """Every picture a completion or chat request carries, in order."""
    if path.endswith("/messages"):
        return anthropic_pictures(body.get("messages"))
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
