"""The extension's one instance inside the webui: its ``params`` (which the webui fills from its
settings before ``setup``), the settings they validate to, the engine, the sessions, and the ways
the adapter speaks to the user (the webui's log, a toast in the browser)."""

from __future__ import annotations

import os

from ..engine import LlavaEngine
from ..errors import LlavaError
from ..reuse import PrefixReuse
from ..sessions import Session, Sessions
from ..settings import DEFAULTS, Settings, SettingsWatch

params = {"display_name": "LLaVA", "is_tab": False, **DEFAULTS}
settings = SettingsWatch(params)
prefix_reuse = PrefixReuse()
sessions = Sessions(on_forget=prefix_reuse.forget)
_engine: LlavaEngine | None = None
_webui = None


def bind_webui(objects) -> None:
    """The webui's own objects (``script.Webui``), handed over by the only file that imports the webui."""
    global _webui
    _webui = objects


def webui():
    return _webui


def engine() -> LlavaEngine:
    """The engine under the settings as they are now; a bad setting raises its SettingsError."""
    global _engine
    current = settings.current()
    if _engine is None:
        _engine = LlavaEngine(current, log=log)
    _engine.configure(current)
    return _engine


def setting_or_default(name: str):
    """The setting ``name`` as it is now; its default while the settings are bad (the generation reports a
    bad setting itself, and a bound such as max_items is never switched off)."""
    try:
        return getattr(settings.current(), name)
    except LlavaError:
        return getattr(Settings.from_params({}), name)


def embed_all_setting() -> bool:
    return setting_or_default("embed_all")


def max_items_setting() -> int:
    return setting_or_default("max_items")


def embed_all(session: Session) -> bool:
    """The session's own choice (the checkbox of its page), else the setting."""
    return embed_all_setting() if session.embed_all is None else session.embed_all


def log(message: str, level: str = "info") -> None:
    logger = _webui.logger if _webui is not None else None
    if logger is None:
        import logging
        logger = logging.getLogger("llava")
    getattr(logger, level)(message)


def warn(message: str) -> None:
    """A log line, and a toast in the browser when a UI event is running."""
    log(message, "warning")
    try:
        import gradio as gr
        gr.Warning(message)
    except Exception:
        pass


def request_context():
    """gradio's per-event request holder; absent from the 2023 webui's gradio."""
    try:
        from gradio.context import LocalContext
    except ImportError:
        return None
    return getattr(LocalContext, "request", None)


def browser_session() -> str | None:
    """The browser session of the UI event being handled; None over the API or on the 2023 webui."""
    context = request_context()
    return getattr(context.get() if context is not None else None, "session_hash", None)


def session() -> Session:
    """The record of the generation being served: its HTTP request's, else its browser session's."""
    return sessions.current(browser_session())


def loaded_model(current_engine):
    """The webui's loaded model, bound in ``current_engine``."""
    shared = _webui.shared
    return current_engine.bind(shared.model, shared.tokenizer, model_folder(shared), _webui.encode)


def model_folder(shared) -> str | None:
    """The loaded model's folder, from the webui's ``shared`` module."""
    name = getattr(shared, "model_name", None)
    model_dir = getattr(getattr(shared, "args", None), "model_dir", None)
    if not name or name == "None" or not model_dir:
        return None
    path = os.path.join(str(model_dir), name)
    return path if os.path.isdir(path) else None
