"""The 2023 webui's chat: it has no attachments, so a picture from the extension's field goes into the
message text as an ``<img>`` tag (where the user wrote ``<image>``, else at the end), and the chat
shows a thumbnail. The adapter hands it over through ``input_hijack``."""

from __future__ import annotations

import html

from ..media.items import data_url
from ..media.pictures import open_picture
from .attachments import Upload, upload_data_url
from .parse import UI_IMAGE_MARKER, place_tag

THUMBNAIL_SIDE = 300


def thumbnail_tag(image) -> str:
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return f'<img src="{data_url(small, "JPEG", quality=85)}">'


def inline_in_message(text: str, visible_text: str, upload: Upload, escaped_visible: bool) -> tuple[str, str]:
    """``text`` with the picture, ``visible_text`` with its thumbnail."""
    data = upload.data()
    text = place_tag(text, f'<img src="{upload_data_url(upload, data)}">')
    marker = html.escape(UI_IMAGE_MARKER) if escaped_visible else UI_IMAGE_MARKER
    thumbnail = thumbnail_tag(open_picture(data, upload).image)
    visible_text = visible_text or ""
    if marker in visible_text:
        visible_text = visible_text.replace(marker, thumbnail, 1)
    else:
        visible_text = f"{visible_text}\n{thumbnail}" if visible_text else thumbnail
    return text, visible_text
