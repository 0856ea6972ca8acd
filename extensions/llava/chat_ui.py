"""What the chat UI and the host's state need from the core, with no webui import.

The picture picked in the extension's field waits here until the next message takes it:
the model sees the full picture, the chat shows a thumbnail.
"""

from __future__ import annotations

import base64
import html
import io
import os
import threading

from .images import InlineImage, PilImage, UnreachableImage
from .prompt import UI_IMAGE_MARKER, parse_prompt, place_image

THUMBNAIL_SIDE = 300
# Loaders whose generation goes through the tokenizer hook (the Transformers path).
HOOKED_LOADERS = {"transformers", "exllamav3_hf", "autogptq", "gptq-for-llama", "hqq"}


def picture_data_url(image, fmt: str = "PNG", **save_args) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def thumbnail_tag(image) -> str:
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return f'<img src="{picture_data_url(small, "JPEG", quality=85)}">'


class PendingUpload:
    """The picture for the next message; thread-safe, taken once."""

    def __init__(self):
        self._image = None
        self._lock = threading.Lock()

    def set(self, image) -> None:
        with self._lock:
            self._image = image

    def take(self):
        with self._lock:
            image, self._image = self._image, None
            return image

    def attach(self, text: str, visible_text: str, escaped_visible: bool) -> tuple[str, str]:
        """Put the pending picture into a message: full size for the model, a thumbnail to show.

        It goes where the user wrote ``<image>``, else at the end. The current webui hands
        over ``visible_text`` HTML-escaped, where the marker reads ``&lt;image&gt;``.
        """
        image = self.take()
        if image is None:
            return text, visible_text
        full = f'<img src="{picture_data_url(image)}">'
        text = place_image(text, full)
        marker = html.escape(UI_IMAGE_MARKER) if escaped_visible else UI_IMAGE_MARKER
        visible_text = visible_text or ""
        if marker in visible_text:
            visible_text = visible_text.replace(marker, thumbnail_tag(image), 1)
        else:
            visible_text = f"{visible_text}\n{thumbnail_tag(image)}" if visible_text else thumbnail_tag(image)
        return text, visible_text


def media_from_state(state: dict) -> list:
    """Pictures of the ``<__media__>`` placeholders: chat attachments, or the chat API's images."""
    attachments = state.get("image_attachments") or []
    if attachments:
        sources = []
        for attachment in attachments:
            data = attachment.get("image_data") if isinstance(attachment, dict) else None
            if isinstance(data, str):
                url = data if data[:5].lower() == "data:" else f"data:image/png;base64,{data}"
                sources.append(InlineImage.from_url(url, origin="attached to the chat"))
        return sources
    if state.get("raw_images"):
        return [PilImage(image) for image in state["raw_images"]]
    history = state.get("history")
    messages = history.get("messages") if isinstance(history, dict) else None
    return [source_of_url(url) for url in image_urls(messages or [])]


def image_urls(messages) -> list[str]:
    """The ``image_url`` parts of OpenAI chat messages, in order."""
    urls = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str):
                    urls.append(url)
    return urls


def source_of_url(url: str):
    """A data URL is opened; any other address is refused, never fetched."""
    if url[:5].lower() == "data:":
        return InlineImage.from_url(url, origin="in the request")
    return UnreachableImage(url[:200], origin="in the request")


def model_folder(shared) -> str | None:
    """The loaded model's folder from the host's ``shared`` module, when there is one."""
    name = getattr(shared, "model_name", None)
    model_dir = getattr(getattr(shared, "args", None), "model_dir", None)
    if not name or name == "None" or not model_dir:
        return None
    path = os.path.join(str(model_dir), name)
    return path if os.path.isdir(path) else None


def loader_sees_images(loader: str | None, model) -> bool:
    if model is None:
        return True  # nothing loaded: the host reports that itself
    if loader and loader.lower().replace(" ", "") not in HOOKED_LOADERS:
        return False
    return hasattr(model, "get_input_embeddings")


def warn_if_unsupported(text: str, state: dict, loader: str | None, model, warn) -> bool:
    """Say so when pictures are sent to a loader that never calls the tokenizer hook."""
    if "<" not in text or loader_sees_images(loader, model):
        return False
    count = len(parse_prompt(text).images)
    if count:
        warn(f"llava: the {loader or 'current'} loader does not pass through the extension's tokenizer hook, "
             f"so the {count} picture(s) in this message are not seen by the model; load the model with the "
             "Transformers loader to use the llava extension")
    return bool(count)
