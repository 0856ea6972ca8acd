"""Media items: what a prompt carries, whatever its entry point (``<img>`` tags, ``image_url`` parts,
attachments, the LLaVA field, ``/v1/messages`` blocks). An item has a kind (``kinds``: a picture now),
a source (a ``data:`` URL in a text, a picture the host decoded, an uploaded file, an address that is
never fetched), a digest of its data, and what its header says (a picture's size), read from the start
of its base64 without decoding it.

Every refusal is an ``ItemError`` naming the item's position in the prompt and the reason in plain
words. Nothing here reaches the network or the file system: only ``data:`` URLs and items handed over
by the host are ever opened, by their kind's module (``pictures``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field, replace
from functools import cached_property

from PIL import Image

from ..errors import LlavaError
from . import kind_of_media_type, kinds
from .kinds import Kind
from .pictures import PICTURE, Picture, PictureHeader, normalise, upright_size

MAX_ENCODED_CHARS = 64 * 1024 * 1024
# base64 characters of a data URL read for its header before all of it: a photo's header with its
# EXIF fits in the first; large ICC profiles or previews may need the second
HEADER_PREFIX_CHARS = (64 * 1024, 1024 * 1024)
FIRST_BYTES_CHARS = 64  # base64 characters read to know an item's format
_URL_SAFE = str.maketrans("-_", "+/")


class ItemError(LlavaError):
    """An item that cannot be used, with the reason in plain words."""

    def __init__(self, label: str, reason: str, position: int = 0):
        self.label = label
        self.reason = reason
        self.position = position
        super().__init__(f"{label}: {reason}")


@dataclass(frozen=True, eq=False)
class MediaItem:
    """One item of a prompt. ``position`` is 1-based in prompt order; ``origin`` says where it was found,
    for messages."""

    position: int = field(default=0, kw_only=True)
    origin: str = field(default="in the prompt", kw_only=True)

    def at_position(self, position: int) -> "MediaItem":
        return replace(self, position=position)

    def digest(self) -> str:
        raise NotImplementedError

    @property
    def kind(self) -> Kind:
        return PICTURE

    def load(self) -> Picture:
        raise NotImplementedError

    def header(self) -> PictureHeader:
        """What the item's header says (a picture's size); refuses what ``load`` would refuse before decoding."""
        raise NotImplementedError

    def check_start(self) -> None:
        """Refuse, without reading its header, what no header read would accept: an item that is not
        there or a format not named (from its first bytes)."""

    @property
    def label(self) -> str:
        return f"{self.kind.name} {self.position} {self.origin}" if self.position else f"a {self.kind.name} {self.origin}"

    def error(self, reason: str) -> ItemError:
        return ItemError(self.label, reason, self.position)


@dataclass(frozen=True, eq=False)
class DataUrlItem(MediaItem):
    """A ``data:`` URL held as a span of a larger text (no copy until it is opened)."""

    text: str
    start: int
    end: int

    @classmethod
    def from_url(cls, url: str, position: int = 0, origin: str = "in the prompt") -> "DataUrlItem":
        return cls(url, 0, len(url), position=position, origin=origin)

    def digest(self) -> str:
        return hashlib.sha256(self.text[self.start:self.end].encode("utf-8", "surrogatepass")).hexdigest()

    @cached_property
    def kind(self) -> Kind:
        """The kind its data URL's type names (a picture where the type names none: it is refused when read)."""
        comma = self.text.find(",", self.start, min(self.end, self.start + 256))
        media_type = self.text[self.start + 5:comma if comma >= 0 else self.start].split(";")[0].strip().lower()
        return kind_of_media_type(media_type) or PICTURE

    def load(self) -> Picture:
        payload = self._payload_start()
        return self.kind.open(self._data(payload), self)

    def header(self) -> PictureHeader:
        """What the header says, from the first part of the data when that part holds the whole header (a
        photo's size is known from its first kilobytes), else from all of it."""
        payload = self._payload_start()
        data_bytes = (self.end - payload) * 3 // 4
        for chars in HEADER_PREFIX_CHARS:
            if payload + chars >= self.end:
                break
            prefix = decode_base64_prefix(self.text[payload:payload + chars])
            found = self.kind.header(prefix, self, partial=True, data_bytes=data_bytes) if prefix else None
            if found is not None:
                return found[1]
        return self.kind.header(self._data(payload), self)[1]

    def check_start(self) -> None:
        """The data URL's header and what its kind checks of the data's first bytes (its format). Nothing
        is decoded."""
        payload = self._payload_start()
        whole = payload + FIRST_BYTES_CHARS >= self.end
        start = self._data(payload) if whole else decode_base64_prefix(self.text[payload:payload + FIRST_BYTES_CHARS])
        if start is None:
            raise self.error("the data after 'base64,' is not valid base64")
        self.kind.check_start(start, (lambda: start) if whole else (lambda: self._data(payload)), self)

    def _data(self, payload: int) -> bytes:
        return decode_base64(self.text[payload:self.end], self)

    def _payload_start(self) -> int:
        """Where the base64 starts, after checking the URL's header."""
        if self.end - self.start > MAX_ENCODED_CHARS:
            raise self.error(f"the data URL is longer than {MAX_ENCODED_CHARS // 2**20} MB")
        comma = self.text.find(",", self.start, self.end)
        if comma < 0:
            raise self.error("the data URL has no ',' between its header and its data")
        header = self.text[self.start + 5:comma].strip().lower()
        media_type, *parameters = [part.strip() for part in header.split(";")]
        kind = kind_of_media_type(media_type)
        if kind is None:
            taken = " or ".join(f"{k.media_type}... ({k.name})" for k in kinds())
            raise self.error(f"the data URL is of type '{media_type or 'none'}', not one the extension takes: {taken}")
        if media_type in kind.refused_types:
            raise self.error(kind.refused_types[media_type])
        if "base64" not in parameters:
            raise self.error(f"the data URL is not base64-encoded (expected 'data:{kind.media_type}...;base64,')")
        return comma + 1


@dataclass(frozen=True, eq=False)
class DecodedPicture(MediaItem):
    """A picture the host already decoded (the OpenAI chat endpoint's ``raw_images``)."""

    image: Image.Image
    origin: str = field(default="in the request", kw_only=True)

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.image.mode}:{self.image.size}:".encode())
        h.update(self.image.tobytes())
        return h.hexdigest()

    def load(self) -> Picture:
        return normalise(self.image, self)

    def header(self) -> PictureHeader:
        return PictureHeader(*upright_size(self.image))


@dataclass(frozen=True, eq=False)
class RefusedItem(MediaItem):
    """An ``<img>`` or a request's picture that is refused wherever it stands, even where it would not be
    embedded: a web address or a file (never fetched: the webui would fetch it otherwise) or a tag
    that cannot hold a picture."""

    reason: str

    @classmethod
    def web_address(cls, src: str, position: int = 0, origin: str = "in the prompt") -> "RefusedItem":
        shown = src if len(src) <= 60 else src[:57] + "..."
        return cls(f"its source '{shown}' is not a data URL; the extension never fetches web addresses or reads "
                   "local files; embed the picture as data:image/...;base64,...", position=position, origin=origin)

    def digest(self) -> str:
        return hashlib.sha256(self.reason.encode("utf-8", "surrogatepass")).hexdigest()

    def header(self) -> PictureHeader:
        self.load()

    def check_start(self) -> None:
        self.load()

    def load(self) -> Picture:
        raise self.error(self.reason)


@dataclass(frozen=True, eq=False)
class UnknownItem(MediaItem):
    """An item that is only counted, never opened: a ``<__media__>`` placeholder whose item is not known."""

    def digest(self) -> str:
        return ""


def data_url(image: Image.Image, fmt: str = "PNG", **save_args) -> str:
    """``image`` encoded as a ``data:`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def decode_base64(payload: str, source: MediaItem) -> bytes:
    compact = "".join(payload.split())
    if not compact:
        raise source.error("the data URL holds no data")
    if "-" in compact or "_" in compact:
        compact = compact.translate(_URL_SAFE)
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise source.error("the data after 'base64,' is not valid base64") from None


def decode_base64_prefix(chars: str) -> bytes | None:
    """The bytes of the first whole base64 quartets of ``chars``; None if they are not base64."""
    compact = "".join(chars.split()).translate(_URL_SAFE)
    try:
        return base64.b64decode(compact[:len(compact) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return None
