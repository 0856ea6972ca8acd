"""Pictures as the webui's chat carries them, read and written with no webui import: the file picked
in the LLaVA field, the attachment it becomes, and the pictures of a generation's state.

A picture picked in the extension's field waits, in its browser session, until that session's
next message takes it; it then becomes an image attachment of the message, exactly like one from
the webui's own attach button.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from ..media.items import DataUrlItem, DecodedPicture, MediaItem
from ..media.pictures import sniff_header
from .messages import message_items


def read_upload(path: str, name: str | None = None) -> "Upload":
    """Check an uploaded file by its header only (format and size; nothing is decoded)."""
    upload = Upload(path, name or os.path.basename(path))
    sniff_header(upload.data(), upload)
    return upload


@dataclass(frozen=True, eq=False)
class Upload(MediaItem):
    """A picture picked in the extension's field: the uploaded file, read when its message is sent."""

    path: str
    name: str
    origin: str = field(default="picked in the LLaVA field", kw_only=True)

    @property
    def label(self) -> str:
        return f"the picture '{self.name}' {self.origin}"

    def data(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            raise self.error("the uploaded file is gone; pick the picture again") from None


def upload_data_url(upload: Upload, data: bytes | None = None) -> str:
    """The uploaded picture as a data URL; ``data`` is the file's content when already read."""
    data = upload.data() if data is None else data
    media_type, _ = sniff_header(data, upload)
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def attach_to_new_message(history: dict, upload: Upload) -> dict:
    """Add the picture to the message about to be appended to ``history``, as the webui's attach
    button does: the webui then shows it, saves it once with the chat, and puts a ``<__media__>``
    placeholder for it in the prompt."""
    row = len(history.get("internal", []))
    entry = history.setdefault("metadata", {}).setdefault(f"user_{row}", {})
    attachments = entry.setdefault("attachments", [])
    kind = upload.kind.attachment
    attachment = {"name": upload.name, "type": kind, "image_data": upload_data_url(upload),
                  "image_id": sum(1 for a in attachments if a.get("type") == kind) + 1}
    attachments.append(attachment)
    return attachment


def items_from_state(state: dict) -> list:
    """Pictures of the ``<__media__>`` placeholders: chat attachments, or an API request's images.

    An API request's pictures are taken from its messages' data URLs when the state has them (the
    features cache is keyed on that data, so a cached picture is never decoded); the host's decoded
    ``raw_images`` otherwise.
    """
    attachments = state.get("image_attachments") or []
    if attachments:
        sources = []
        for attachment in attachments:
            data = attachment.get("image_data") if isinstance(attachment, dict) else None
            if isinstance(data, str):
                url = data if data[:5].lower() == "data:" else f"data:image/png;base64,{data}"
                sources.append(DataUrlItem.from_url(url, origin="attached to the chat"))
        return sources
    history = state.get("history")
    messages = history.get("messages") if isinstance(history, dict) else None
    messages = messages or state.get("messages")
    if messages:
        return message_items(messages)
    return [DecodedPicture(image) for image in state.get("raw_images") or []]
