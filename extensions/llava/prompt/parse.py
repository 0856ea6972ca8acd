"""Finding media items in a prompt, and turning a prompt into the text the tokenizer sees.

Items appear as tags of their kind (``<img src="data:image/...;base64,...">`` for a picture: chat
uploads, the Default/Notebook tabs, the completion APIs) or as the webui's own ``<__media__>``
placeholders, whose items travel beside the prompt. Parsing never decodes base64 and never copies an
item's data: an item is a span of the prompt until it is used.
All scanning goes through ``str.find`` and bounded patterns, so the cost stays linear
in the prompt's length whatever the user types.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..media.items import DataUrlItem, MediaItem, RefusedItem
from ..media import kinds

MEDIA_PLACEHOLDER = "<__media__>"
# ``<img src="llava-ref:N">``: an item of the current HTTP request body, kept beside the prompt
# so that the webui never tokenizes its data (see api/check.py).
REFERENCE_SCHEME = "llava-ref:"
UI_IMAGE_MARKER = "<image>"

# After a tag's name: the attributes up to src=, bounded so that a run of broken tags stays linear.
_SRC_ATTRIBUTE = re.compile(r"""[^<>]{0,2048}?(?<![\w-])src\s*=\s*(["']?)""", re.IGNORECASE)
_TAG_CLOSE = re.compile(r"[^<>]{0,2048}>")
_BARE_VALUE = re.compile(r"[^\s>]*")


@dataclass(frozen=True)
class PlacedItem:
    """One item of a prompt: where it stands and what it is."""

    position: int  # 1-based, in prompt order
    start: int
    end: int
    item: MediaItem


@dataclass
class ParsedPrompt:
    text: str
    items: list[PlacedItem] = field(default_factory=list)

    def pieces(self):
        """Alternating text and items, in prompt order."""
        cursor = 0
        for placed in self.items:
            yield self.text[cursor:placed.start]
            yield placed
            cursor = placed.end
        yield self.text[cursor:]

    def text_only(self) -> str:
        """The prompt with every item removed."""
        return "".join(p for p in self.pieces() if isinstance(p, str))


def _find_tags(prompt: str):
    """Yield (start, end, src_start, src_end) for each tag of a kind of item (``<img ... src=...>``);
    ``src_end`` is None when the value's quote is never closed."""
    cursor = 0
    tags = [kind.tag for kind in kinds()]
    while True:
        lt = prompt.find("<", cursor)
        if lt < 0:
            return
        cursor = lt + 1
        name_end = next((lt + 1 + len(tag) for tag in tags if prompt[lt + 1:lt + 1 + len(tag)].lower() == tag), None)
        if name_end is None or prompt[name_end:name_end + 1] not in (" ", "\t", "\n", "\r", "/"):
            continue
        attr = _SRC_ATTRIBUTE.match(prompt, name_end)
        if attr is None:
            continue
        quote = attr.group(1)
        value_start = attr.end()
        if quote:
            value_end = prompt.find(quote, value_start)
            if value_end < 0:  # unclosed quote: the tag runs to the end of the prompt
                yield lt, len(prompt), value_start, None
                return
            after = value_end + 1
        else:
            value_end = _BARE_VALUE.match(prompt, value_start).end()
            after = value_end
        close = _TAG_CLOSE.match(prompt, after)
        end = close.end() if close else after
        yield lt, end, value_start, value_end
        cursor = end


def _source_for(prompt: str, src_start: int, src_end: int | None, position: int,
                references: dict[str, MediaItem] | None = None) -> MediaItem:
    if src_end is None:
        return RefusedItem("the quote after src= is never closed; end the picture's data with a quote",
                            position=position)
    if prompt[src_start:src_start + 5].lower() == "data:":
        return DataUrlItem(prompt, src_start, src_end, position=position)
    if references and prompt.startswith(REFERENCE_SCHEME, src_start):
        source = references.get(prompt[src_start + len(REFERENCE_SCHEME):src_end])
        if source is not None:
            return source
    return RefusedItem.web_address(prompt[src_start:min(src_end, src_start + 200)], position)


def parse_prompt(prompt: str, media: Sequence[MediaItem] | None = None,
                 references: dict[str, MediaItem] | None = None) -> ParsedPrompt:
    """Find the items of ``prompt``.

    ``media`` are the items of the webui's ``<__media__>`` placeholders, oldest first;
    ``references`` the items that ``llava-ref:`` sources stand for.
    History trimming can drop early messages, so placeholders take the *last* items;
    placeholders with no item left over stay text.
    """
    spans = [(start, end, _source_for(prompt, a, b, 0, references)) for start, end, a, b in _find_tags(prompt)]
    if media:
        placeholders = []
        cursor = prompt.find(MEDIA_PLACEHOLDER)
        while cursor >= 0:
            placeholders.append(cursor)
            cursor = prompt.find(MEDIA_PLACEHOLDER, cursor + len(MEDIA_PLACEHOLDER))
        matched = min(len(placeholders), len(media))
        inside_tags = _inside(spans)
        spans += [(start, start + len(MEDIA_PLACEHOLDER), source)
                  for start, source in zip(placeholders[len(placeholders) - matched:], media[len(media) - matched:])
                  if not inside_tags(start)]
        spans.sort(key=lambda s: s[0])
    items = [PlacedItem(i, start, end, item.at_position(i)) for i, (start, end, item) in enumerate(spans, 1)]
    return ParsedPrompt(prompt, items)


def reference_items(prompt: str, references: dict[str, MediaItem]) -> str:
    """``prompt`` with each ``data:`` URL replaced by a short ``llava-ref:`` source (in a tag of its
    item's kind); the items go into ``references``, which the caller keeps beside the prompt. The item's
    data is not copied."""
    if "<" not in prompt:
        return prompt
    pieces = []
    for piece in parse_prompt(prompt).pieces():
        if isinstance(piece, PlacedItem) and isinstance(piece.item, DataUrlItem):
            name = str(len(references) + 1)
            references[name] = piece.item
            pieces.append(f'<{piece.item.kind.tag} src="{REFERENCE_SCHEME}{name}">')
        else:
            pieces.append(piece if isinstance(piece, str) else prompt[piece.start:piece.end])
    return "".join(pieces)


def _inside(spans):
    """Whether an offset falls inside one of ``spans`` (in prompt order, not overlapping): a binary search."""
    starts = [start for start, _, _ in spans]
    ends = [end for _, end, _ in spans]

    def test(offset: int) -> bool:
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and offset < ends[i]
    return test


def escape_special_tokens(text: str, special_tokens: Sequence[str]) -> str:
    """Keep text a user typed from turning into image tokens.

    Only the extension places image tokens. A user who types ``<im_patch>`` gets the
    characters ``&lt;im_patch>`` in the model's input instead: still legible text, but
    no longer the added token, so it creates no image slot and shifts no splice.
    """
    if not special_tokens or "<" not in text:
        return text
    pattern = _escape_pattern(tuple(special_tokens))
    return pattern.sub(lambda m: "&lt;" + m.group(0)[1:], text)


_ESCAPE_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _escape_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    pattern = _ESCAPE_PATTERNS.get(tokens)
    if pattern is None:
        pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
        _ESCAPE_PATTERNS[tokens] = pattern
    return pattern


def expand_prompt(parsed: ParsedPrompt, item_text: str, special_tokens: Sequence[str]) -> str:
    """The prompt with each item replaced by its token text and user text escaped."""
    return "".join(item_text if isinstance(p, PlacedItem) else escape_special_tokens(p, special_tokens)
                   for p in parsed.pieces())


def place_tag(text: str, tag: str) -> str:
    """Put an uploaded item's tag where the user wrote ``<image>``, else at the end of the message."""
    if UI_IMAGE_MARKER in text:
        return text.replace(UI_IMAGE_MARKER, tag, 1)
    return f"{text}\n{tag}" if text else tag

