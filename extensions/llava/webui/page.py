"""The LLaVA block under the chat: the picture for the next message and the "embed all" checkbox, each
kept per browser session. On the 2023 webui, which has no attachments and no sessions, a picked
picture goes into the message text through ``input_hijack``.

No ``from __future__ import annotations`` here: gradio reads the handlers' ``gr.Request`` annotation
at run time, and ``gr`` is imported inside ``ui``."""

from ..attachments import read_upload
from ..chat_2023 import inline_in_message
from ..errors import LlavaError
from .extension import embed_all_setting, request_context, sessions, warn

# The 2023 webui takes the next message's picture through input_hijack; the current one calls
# history_modifier then chat_input_modifier. Each host uses one of the two, never both.
input_hijack = {"state": False, "value": ["", ""]}


def ui():
    import gradio as gr
    from modules import shared
    with gr.Accordion("LLaVA", open=True):
        picture = gr.File(label="Picture for the next message", file_types=["image"], type="filepath",
                          elem_id="llava-picture")
        embed_all = gr.Checkbox(value=embed_all_setting(), elem_id="llava-embed-all",
                                label="Embed all images, not only the last one")

    # gradio hands a handler its gr.Request when the parameter is annotated with the type.
    def on_pick(path, request: gr.Request):
        pick(path, _session_of(request))

    def on_clear(request: gr.Request):
        pick(None, _session_of(request))

    def on_embed_all(value, request: gr.Request):
        sessions.browser(_session_of(request)).embed_all = bool(value)

    # upload and clear are the user's own actions; emptying the field after a send fires neither.
    picture.upload(on_pick, picture, None)
    picture.clear(on_clear, None, None)
    embed_all.change(on_embed_all, embed_all, None)
    for name, event in (("Generate", "click"), ("textbox", "submit")):
        listener = getattr(shared.gradio.get(name), event, None)
        if listener is not None:
            listener(lambda: None, None, picture)  # the picture went with the message: empty the field


def _session_of(request) -> str | None:
    """Hooks see the session only where gradio keeps the request per event (not the 2023 webui)."""
    return getattr(request, "session_hash", None) if request_context() is not None else None


def pick(path: str | None, browser_session: str | None = None) -> None:
    """The picture at ``path`` waits for the session's next message (None: no picture)."""
    session = sessions.browser(browser_session)
    if path is None:
        session.picked = None
        return
    try:
        session.picked = read_upload(path)
    except LlavaError as error:
        session.picked = None
        warn(f"llava: {error}")
        return
    if request_context() is None:  # the 2023 webui: the picture goes into the message text
        input_hijack.update(state=True, value=_inline)


def _inline(text, visible_text):
    upload = sessions.browser(None).take("picked")
    if upload is None:
        return text, visible_text
    return inline_in_message(text, visible_text, upload, escaped_visible=False)
