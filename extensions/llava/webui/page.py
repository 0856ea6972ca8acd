"""The LLaVA block under the chat: the picture for the next message and the "embed all" checkbox, each
kept per browser session. On the 2023 webui, which has no attachments and no sessions, a picked
picture goes into the message text through ``input_hijack``.

No ``from __future__ import annotations`` here: gradio reads the handlers' ``gr.Request`` annotation
at run time, and ``gr`` is imported inside ``ui``."""

from ..errors import LlavaError
from ..prompt.attachments import read_upload
from ..prompt.chat_2023 import inline_in_message
from .extension import embed_all_setting, log, request_context, sessions, warn, webui

# The 2023 webui takes the next message's picture through input_hijack; the current one calls
# history_modifier then chat_input_modifier. Each host uses one of the two, never both.
input_hijack = {"state": False, "value": ["", ""]}
PREVIEW_HEIGHT = 320  # px: the picked picture scaled into this box whole, at a size a person can read
# gradio's image box draws its picture at the box's full width and cuts what overflows its height:
# the picture is fitted into the box instead, whole and with its own proportions.
PREVIEW_CSS = ("#llava-preview button, #llava-preview .image-container { width: 100%; height: 100%; } "
               "#llava-preview img { width: 100%; height: 100%; object-fit: contain; }")


def custom_css() -> str:
    """Styles the webui adds to its page (the extension contract's ``custom_css``)."""
    return PREVIEW_CSS


def ui():
    import gradio as gr
    shared = webui().shared
    with gr.Accordion("LLaVA", open=True):
        picture = gr.File(label="Picture for the next message", file_types=["image"], type="filepath",
                          elem_id="llava-picture")
        preview = _preview(gr)
        embed_all = gr.Checkbox(value=embed_all_setting(), elem_id="llava-embed-all",
                                label="Embed all images, not only the last one")

    # gradio hands a handler its gr.Request when the parameter is annotated with the type.
    def on_pick(path, request: gr.Request):
        shown = path if pick(path, _session_of(request)) else None
        return shown if preview is not None else None

    def on_clear(request: gr.Request):
        pick(None, _session_of(request))

    def on_embed_all(value, request: gr.Request):
        sessions.browser(_session_of(request)).embed_all = bool(value)

    def on_leave(request: gr.Request):
        count, size = sessions.end(_session_of(request))
        if count:
            log(f"llava: a browser session ended; its {count} earlier prompt(s) ({size / 2**20:.1f} MB) went")

    # upload and clear are the user's own actions; emptying the field after a send fires neither.
    picture.upload(on_pick, picture, preview)
    picture.clear(on_clear, None, preview)
    embed_all.change(on_embed_all, embed_all, None)
    _when_page_closes(on_leave)
    emptied, empty = (picture, lambda: None) if preview is None else ([picture, preview], lambda: (None, None))
    for name, event in (("Generate", "click"), ("textbox", "submit")):
        listener = getattr(shared.gradio.get(name), event, None)
        if listener is not None:  # the picture went with the message: empty the field and its preview
            listener(empty, None, emptied)


def _preview(gr):
    """The picked file itself, drawn by the browser: nothing is decoded or re-encoded for it here. The
    2023 webui's gradio has no such image box; it shows the file's name only."""
    try:
        return gr.Image(interactive=False, show_label=False, show_download_button=False, height=PREVIEW_HEIGHT,
                        elem_id="llava-preview")
    except TypeError:
        return None


def _when_page_closes(handler) -> None:
    """``handler`` runs when a browser tab closes or reloads (its session ends); the 2023 webui's gradio
    has no such event."""
    try:
        from gradio.context import Context
    except ImportError:
        return
    page = getattr(Context, "root_block", None)
    if page is not None and hasattr(page, "unload"):
        page.unload(handler)


def _session_of(request) -> str | None:
    """Hooks see the session only where gradio keeps the request per event (not the 2023 webui)."""
    return getattr(request, "session_hash", None) if request_context() is not None else None


def pick(path: str | None, browser_session: str | None = None) -> bool:
    """The picture at ``path`` waits for the session's next message (None: no picture); False when the
    file is refused (the user is told why)."""
    session = sessions.browser(browser_session)
    if path is None:
        session.picked = None
        return False
    try:
        session.picked = read_upload(path)
    except LlavaError as error:
        session.picked = None
        warn(f"llava: {error}")
        return False
    if request_context() is None:  # the 2023 webui: the picture goes into the message text
        input_hijack.update(state=True, value=_inline)
    return True


def _inline(text, visible_text):
    upload = sessions.browser(None).take("picked")
    if upload is None:
        return text, visible_text
    return inline_in_message(text, visible_text, upload, escaped_visible=False)
