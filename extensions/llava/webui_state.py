"""The webui's state, read and written with no webui import: the pictures a generation's state
carries, the loaded model's folder, which loaders see pictures, and the LLaVA field.

A picture picked in the extension's field waits, per browser session, until that session's
next message takes it; it then becomes an image attachment of the message, exactly like
one from the webui's own attach button.
"""

from __future__ import annotations

import base64
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .api import message_pictures
from .images import ImageSource, InlineImage, PilImage, sniff_header
from .prompt import parse_prompt

# Loaders whose generation passes the tokenizer hook's embeddings to the model. The webui's ExLlamav3_HF
# calls the hook, but its forward reads only input_ids; the 2023 webui names no loader (None).
HOOKED_LOADERS = {"transformers"}
# Loaders that read the webui's image attachments themselves (a vision model in their own format).
NATIVE_IMAGE_LOADERS = {"llama.cpp", "exllamav3"}


def read_upload(path: str, name: str | None = None) -> "Upload":
    """Check an uploaded file by its header only (format and size; nothing is decoded)."""
    upload = Upload(path, name or os.path.basename(path))
    sniff_header(upload.data(), upload)
    return upload


@dataclass(frozen=True, eq=False)
class Upload(ImageSource):
    """A picture picked in the extension's field: the uploaded file, read when its message is sent."""

    path: str
    name: str
    position: int = 0
    origin: str = "picked in the LLaVA field"

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
    attachment = {"name": upload.name, "type": "image", "image_data": upload_data_url(upload),
                  "image_id": sum(1 for a in attachments if a.get("type") == "image") + 1}
    attachments.append(attachment)
    return attachment


class BrowserSessions:
    """Per browser session: the picture waiting for its next message, the "embed all" choice, and the
    state of the generation being prepared (its pictures count in the prompt's length).

    Hosts without sessions (the 2023 webui) use the key None. The least recently used sessions
    are forgotten beyond ``limit``; nothing decoded is held, only file paths.
    """

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._pictures: OrderedDict = OrderedDict()
        self._embed_all: OrderedDict = OrderedDict()
        self._states: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _put(self, table: OrderedDict, session, value) -> None:
        table[session] = value
        table.move_to_end(session)
        while len(table) > self.limit:
            table.popitem(last=False)

    def _set(self, table: OrderedDict, session, value) -> None:
        """``value`` for ``session``; None forgets it."""
        with self._lock:
            if value is None:
                table.pop(session, None)
            else:
                self._put(table, session, value)

    def pick(self, session, upload: Upload | None) -> None:
        self._set(self._pictures, session, upload)

    def take(self, session) -> Upload | None:
        with self._lock:
            return self._pictures.pop(session, None)

    def set_embed_all(self, session, value: bool) -> None:
        with self._lock:
            self._put(self._embed_all, session, bool(value))

    def embed_all(self, session, default: bool) -> bool:
        with self._lock:
            return self._embed_all.get(session, default)

    def hold_state(self, session, state: dict | None) -> None:
        self._set(self._states, session, state)

    def held_state(self, session) -> dict | None:
        with self._lock:
            return self._states.get(session)


def media_from_state(state: dict) -> list:
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
                sources.append(InlineImage.from_url(url, origin="attached to the chat"))
        return sources
    history = state.get("history")
    messages = history.get("messages") if isinstance(history, dict) else None
    messages = messages or state.get("messages")
    if messages:
        return message_pictures(messages)
    return [PilImage(image) for image in state.get("raw_images") or []]


def model_folder(shared) -> str | None:
    """The loaded model's folder from the host's ``shared`` module, when there is one."""
    name = getattr(shared, "model_name", None)
    model_dir = getattr(getattr(shared, "args", None), "model_dir", None)
    if not name or name == "None" or not model_dir:
        return None
    path = os.path.join(str(model_dir), name)
    return path if os.path.isdir(path) else None


def _loader_key(loader: str | None) -> str:
    return (loader or "").lower().replace(" ", "")


def loader_sees_images(loader: str | None, model) -> bool:
    if model is None:
        return True  # nothing loaded: the host reports that itself
    if loader and _loader_key(loader) not in HOOKED_LOADERS:
        return False
    return hasattr(model, "get_input_embeddings")


def warn_if_unsupported(text: str, loader: str | None, model, warn, attached: int = 0) -> bool:
    """Say so when pictures are sent to a loader whose model will not see them.

    ``attached`` counts the field's pictures that went into this message as attachments; the
    webui's llama.cpp and ExLlamaV3 loaders read attachments themselves, others drop them.
    """
    if loader_sees_images(loader, model):
        return False
    count = len(parse_prompt(text).images) if "<" in text else 0
    if _loader_key(loader) not in NATIVE_IMAGE_LOADERS:
        count += attached
    if count:
        warn(f"llava: the {loader or 'current'} loader does not give the extension's image features to the "
             f"model, so the {count} picture(s) in this message are not seen by it; load the model with the "
             "Transformers loader to use the llava extension")
    return bool(count)
