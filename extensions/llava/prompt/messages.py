"""Finding media items in OpenAI-style messages and in the bodies of the webui's completion and chat
requests: the request-side counterpart of ``parse``, which finds them in a prompt's text.

Nothing is decoded here: an item is a span of the body's own text until it is used.
"""

from __future__ import annotations

from ..errors import LlavaError
from ..media.items import DataUrlItem, MediaItem, RefusedItem
from ..media import kind_of_part
from .parse import MEDIA_PLACEHOLDER, parse_prompt, reference_items


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


def text_items(content) -> list[MediaItem]:
    """The items written as tags in a message's text: the webui renders that text into the prompt."""
    return [placed.item for text in _texts(content) if "<" in text for placed in parse_prompt(text).items]


def _numbered(items: list[MediaItem]) -> list[MediaItem]:
    return [item.at_position(n) for n, item in enumerate(items, 1)]


def message_items(messages, where: str = "messages", with_text: bool = False) -> list[MediaItem]:
    """The items of OpenAI-style ``messages``, in the order of the prompt the webui renders from them
    (a message's parts of each kind, ``image_url`` for a picture, first; then with ``with_text`` the items
    written in its text); malformed parts are refused."""
    items = []
    for i, message in _numbered_messages(messages, where):
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            kind = kind_of_part(part.get("type")) if isinstance(part, dict) else None
            if kind is None:
                continue
            holder = part.get(kind.part)
            url = holder.get("url") if isinstance(holder, dict) else None
            if not isinstance(url, str) or not url.strip():
                raise RequestProblem(f"message {i} has an {kind.part} part without a text 'url' (expected "
                                     f'{{"{kind.part}": {{"url": "data:{kind.media_type}...;base64,..."}}}})')
            items.append(item_of_url(url))
        if with_text:
            items += text_items(content)
    return _numbered(items)


def anthropic_items(messages, system=None) -> list[MediaItem]:
    """The items of Anthropic-style ``messages`` (``/v1/messages``), in the order the webui turns them
    into ``image_url`` parts: the image blocks of user messages; and the items written in the system text
    and in each message's text. A picture given by address is refused (the webui would drop it without a
    word); a malformed block too."""
    sources = text_items(system)
    for i, message in _numbered_messages(messages, "messages"):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            sources += [_anthropic_source(i, block.get("source")) for block in content
                        if isinstance(block, dict) and block.get("type") == "image"]
        sources += text_items(content)
    return _numbered(sources)


def _anthropic_source(message: int, source) -> MediaItem:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str):
        return RefusedItem.web_address(source["url"][:200], origin="in the request")
    data, media_type = (source.get("data"), source.get("media_type", "image/png")) if kind == "base64" else (None, None)
    if not isinstance(data, str) or not data.strip() or not isinstance(media_type, str):
        raise RequestProblem(f"message {message} has an image block without base64 data (expected "
                             "{\"source\": {\"type\": \"base64\", \"media_type\": \"image/png\", \"data\": \"...\"}})")
    return DataUrlItem.from_url(f"data:{media_type};base64,{data}", origin="in the request")


def item_of_url(url: str) -> MediaItem:
    """A data URL is opened; any other address is refused, never fetched."""
    if url[:5].lower() == "data:":
        return DataUrlItem.from_url(url, origin="in the request")
    return RefusedItem.web_address(url[:200], origin="in the request")


def body_prompts(body: dict) -> list[str]:
    """The text prompts of a completion body (``prompt`` is a text or a list of them)."""
    prompt = body.get("prompt")
    return [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]


def items_in_body(path: str, body: dict) -> list[MediaItem]:
    """Every item a completion or chat request carries, in order."""
    return [item for group in item_groups(path, body) for item in group]


def item_groups(path: str, body: dict) -> list[list[MediaItem]]:
    """The items of each prompt the request makes, in order: a chat request makes one, a completion one
    per text of its ``prompt`` (a text or a list of them)."""
    if path.endswith("/messages"):
        return [anthropic_items(body.get("messages"), body.get("system"))]
    if path.endswith("/chat/completions"):
        return [message_items(body.get("messages"), with_text=True)]
    items = message_items(body.get("messages"))
    prompts = body_prompts(body)
    placeholders = sum(prompt.count(MEDIA_PLACEHOLDER) for prompt in prompts)
    if items and placeholders != len(items):
        raise RequestProblem(f"the request's 'messages' carry {len(items)} item(s) and its prompt has "
                             f"{placeholders} '{MEDIA_PLACEHOLDER}' placeholder(s): put one placeholder where "
                             "each item goes")
    groups = [items] + [[] for _ in prompts[1:]]
    for group, prompt in zip(groups, prompts):
        if "<" in prompt:
            group += [placed.item for placed in parse_prompt(prompt).items]
    return [group for group in groups if group]


def reference_messages(body: dict, references: dict[str, MediaItem]) -> dict:
    """A chat body with each ``data:`` URL written in its messages' text (and an Anthropic ``system``)
    replaced by a short reference kept in ``references``: the webui renders that text into its prompt."""
    rewritten = dict(body)
    if isinstance(body.get("messages"), list):
        rewritten["messages"] = [{**m, "content": _referenced(m.get("content"), references)} if isinstance(m, dict)
                                 else m for m in body["messages"]]
    if "system" in body:
        rewritten["system"] = _referenced(body["system"], references)
    return rewritten


def _referenced(content, references: dict[str, MediaItem]):
    if isinstance(content, str):
        return reference_items(content, references)
    if isinstance(content, list):
        return [{**part, "text": reference_items(part["text"], references)}
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                else part for part in content]
    return content


def reference_prompts(body: dict, references: dict[str, MediaItem]) -> dict:
    """The body with each ``data:`` URL of its prompts replaced by a short reference kept in ``references``."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {**body, "prompt": reference_items(prompt, references)}
    if isinstance(prompt, list):
        return {**body, "prompt": [reference_items(p, references) if isinstance(p, str) else p for p in prompt]}
    return body
