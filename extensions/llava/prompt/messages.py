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


def _numbered_messages(messages, where: str):
    """(number, message) of each message; a ``messages`` that is not a list of objects is refused."""
    if messages is None:
        return
    if not isinstance(messages, list):
        raise RequestProblem(f"'{where}' must be a list of messages")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RequestProblem(f"message {i} of '{where}' is not an object")
        yield i, message


def _listed_contents(messages, where: str):
    """(number, message, content) of each message whose content is a list of parts."""
    for i, message in _numbered_messages(messages, where):
        if isinstance(message.get("content"), list):
            yield i, message, message["content"]


def _texts(content) -> list[str]:
    """The texts of a message's content: the content itself, or its text parts (blocks)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]


def text_pictures(content) -> list[ImageSource]:
    """The ``<img>`` pictures written in a message's text: the webui renders that text into the prompt."""
    return [image.source for text in _texts(content) if "<" in text for image in parse_prompt(text).images]


def _numbered(sources: list[ImageSource]) -> list[ImageSource]:
    return [source.at_position(n) for n, source in enumerate(sources, 1)]


def message_pictures(messages, where: str = "messages", with_text: bool = False) -> list[ImageSource]:
    """The pictures of OpenAI-style ``messages``, in the order of the prompt the webui renders from them
    (a message's image parts first, then with ``with_text`` the pictures written in its text);
    malformed parts are refused."""
    sources = []
    for i, message in _numbered_messages(messages, where):
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise RequestProblem(f"message {i} has an image_url part without a text 'url' "
                                     "(expected {\"image_url\": {\"url\": \"data:image/...;base64,...\"}})")
            sources.append(source_of_url(url))
        if with_text:
            sources += text_pictures(content)
    return _numbered(sources)


def anthropic_pictures(messages, system=None) -> list[ImageSource]:
    """The pictures of Anthropic-style ``messages`` (``/v1/messages``), in the order the webui turns
    them into ``image_url`` parts: the image blocks of user messages; and the pictures written in the
    system text and in each message's text. A picture given by address is refused (the webui would drop
    it without a word); a malformed block too."""
    sources = text_pictures(system)
    for i, message in _numbered_messages(messages, "messages"):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            sources += [_anthropic_source(i, block.get("source")) for block in content
                        if isinstance(block, dict) and block.get("type") == "image"]
        sources += text_pictures(content)
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
    return [source for group in picture_groups(path, body) for source in group]


def picture_groups(path: str, body: dict) -> list[list[ImageSource]]:
    """The pictures of each prompt the request makes, in order: a chat request makes one, a completion
    one per text of its ``prompt`` (a text or a list of them)."""
    if path.endswith("/messages"):
        return [anthropic_pictures(body.get("messages"), body.get("system"))]
    if path.endswith("/chat/completions"):
        return [message_pictures(body.get("messages"), with_text=True)]
    sources = message_pictures(body.get("messages"))
    prompts = body_prompts(body)
    placeholders = sum(prompt.count(MEDIA_PLACEHOLDER) for prompt in prompts)
    if sources and placeholders != len(sources):
        raise RequestProblem(f"the request's 'messages' carry {len(sources)} picture(s) and its prompt has "
                             f"{placeholders} '{MEDIA_PLACEHOLDER}' placeholder(s): put one placeholder where "
                             "each picture goes")
    groups = [sources] + [[] for _ in prompts[1:]]
    for group, prompt in zip(groups, prompts):
        if "<" in prompt:
            group += [image.source for image in parse_prompt(prompt).images]
    return [group for group in groups if group]


def reference_messages(body: dict, references: dict[str, ImageSource]) -> dict:
    """A chat body with each ``data:`` URL written in its messages' text (and an Anthropic ``system``)
    replaced by a short reference kept in ``references``: the webui renders that text into its prompt."""
    rewritten = dict(body)
    if isinstance(body.get("messages"), list):
        rewritten["messages"] = [{**m, "content": _referenced(m.get("content"), references)} if isinstance(m, dict)
                                 else m for m in body["messages"]]
    if "system" in body:
        rewritten["system"] = _referenced(body["system"], references)
    return rewritten


def _referenced(content, references: dict[str, ImageSource]):
    if isinstance(content, str):
        return reference_pictures(content, references)
    if isinstance(content, list):
        return [{**part, "text": reference_pictures(part["text"], references)}
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                else part for part in content]
    return content


def reference_prompts(body: dict, references: dict[str, ImageSource]) -> dict:
    """The body with each ``data:`` URL of its prompts replaced by a short reference kept in ``references``."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {**body, "prompt": reference_pictures(prompt, references)}
    if isinstance(prompt, list):
        return {**body, "prompt": [reference_pictures(p, references) if isinstance(p, str) else p for p in prompt]}
    return body
