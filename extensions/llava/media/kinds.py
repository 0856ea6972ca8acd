"""The kinds of media item a prompt can carry, and everything that differs between them where an item
enters: the data URL types it takes, the tag that holds it in a prompt's text, its part in an OpenAI
message, its type as a webui attachment, and how its header is read and its data decoded.

Parsing, counting and the request check ask an item for its kind; they name no kind themselves.
Adding a kind (video next) is a module like ``pictures`` with its ``Kind``, listed in ``media.KINDS``.
"""

from __future__ import annotations


class Kind:
    """One kind of item; a kind's module makes the one instance of its subclass."""

    name = ""  # the word for one item, in messages ("picture 2 in the prompt")
    media_type = ""  # the start of the data URL types it takes ("image/")
    tag = ""  # the HTML tag that holds it in a prompt's text (``<img src="...">``)
    part = ""  # its content part in an OpenAI message (``{"type": "image_url", ...}``)
    attachment = ""  # its type as a webui chat attachment
    formats = ""  # the formats it opens, in words
    refused_types: dict[str, str] = {}  # data URL types of its prefix it refuses, and why

    def header(self, data: bytes, item, partial: bool = False, data_bytes: int | None = None):
        """(media type, header) from the data's header, without decoding; with ``partial``, None when the
        data (the first bytes of ``data_bytes``) ends before the header does."""
        raise NotImplementedError

    def open(self, data: bytes, item):
        """The decoded item."""
        raise NotImplementedError

    def check_start(self, start: bytes, whole, item) -> None:
        """Refuse what the first bytes show cannot be used (a format not named); ``whole()`` gives all."""

    def __repr__(self) -> str:
        return f"Kind({self.name})"
