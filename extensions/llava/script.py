"""text-generation-webui adapter for the llava extension: hooks and UI only.

Every hook is a few lines that call the core (the other modules of this folder, which
never import the webui). ``modules.*`` is imported lazily, inside the hooks.
"""

import importlib
import importlib.util
import sys
import threading
from pathlib import Path


def _core(name: str):
    """A core module, whether the webui imported this file as a package member or by path."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    package = "llava_extension_core"
    if package not in sys.modules:
        here = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location(package, here / "__init__.py",
                                                      submodule_search_locations=[str(here)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


settings_module = _core("settings")
api = _core("api")
prompt_module = _core("prompt")
REFERENCES_KEY = "llava_references"  # the state's pictures behind the prompt's llava-ref: sources
engine_module = _core("engine")
context_limit = _core("context_limit")
webui_state = _core("webui_state")
webui_2023 = _core("webui_2023")
LlavaError = _core("errors").LlavaError

params = {"display_name": "LLaVA", "is_tab": False, **settings_module.DEFAULTS}

# The 2023 webui takes the next message's picture through input_hijack; the current one calls
# history_modifier then chat_input_modifier. Each host uses one of the two, never both.
input_hijack = {"state": False, "value": ["", ""]}
sessions = webui_state.BrowserSessions()
_turn = threading.local()  # the history copy that the message being sent is added to
_engine = None


def _log(message: str, level: str = "info") -> None:
    try:
        from modules.logging_colors import logger
    except ImportError:
        import logging
        logger = logging.getLogger("llava")
    getattr(logger, level)(message)


def _warn(message: str) -> None:
    """A log line, and a toast in the browser when a UI event is running."""
    _log(message, "warning")
    try:
        import gradio as gr
        gr.Warning(message)
    except Exception:
        pass


def engine():
    """The engine, configured from ``params`` as they are now (the UI and settings files change them);
    a bad setting raises its SettingsError here, the one place settings are read."""
    global _engine
    settings = settings_module.Settings.from_params(params)
    if _engine is None:
        _engine = engine_module.LlavaEngine(settings, log=_log)
    _engine.configure(settings)
    return _engine


def setup():
    """Validate the settings and serve the seed's API route; nothing heavy loads here."""
    try:
        engine()
    except LlavaError as error:
        _log(f"llava: {error}", "error")
    _serve_api()


def _serve_api() -> None:
    from modules import shared
    if not (getattr(shared.args, "api", False) or getattr(shared.args, "public_api", False)):
        return
    try:
        from modules.api import script as api_script
    except ImportError:
        return  # the 2023 webui serves /api/v1/generate from its own api extension
    from starlette.middleware import Middleware
    app = api_script.app
    if app.middleware_stack is not None:
        _log("llava: the API server was already running when the extension was enabled; restart the webui "
             "with --extensions llava to use pictures over the API", "warning")
        return
    api.add_generate_route(app, _complete, dependencies=api_script.check_key)
    # Innermost: after the webui's host and CORS checks, with its key check done before any work.
    app.user_middleware.append(Middleware(api.PictureRequestMiddleware, authorized=_authorized,
                                          embed_all=_embed_all_setting))


def _embed_all_setting() -> bool:
    try:
        return engine().settings.add_all_images_to_prompt
    except LlavaError:
        return False  # the generation reports the bad setting itself


def _authorized(scope) -> bool:
    from modules.api import script as api_script
    header = dict(scope.get("headers", [])).get(b"authorization")
    try:
        api_script.verify_api_key(authorization=header.decode("latin-1") if header is not None else None)
    except Exception:
        return False
    return True


def _complete(body: dict, stop_event) -> dict:
    """Run a seed-style request through the host's own completion logic. Its streamed form is used:
    only that one checks ``stop_event`` between tokens, so a client that leaves stops the generation."""
    from modules.api import completions
    from modules.api.typing import CompletionRequest, to_dict
    try:
        request = CompletionRequest(**{**body, "stream": True})
    except ValueError as error:
        raise LlavaError(f"the request is not valid: {error}") from None
    chunks = completions.stream_completions(to_dict(request), stop_event=stop_event)
    texts = []
    try:
        for chunk in chunks:
            texts.append(chunk["choices"][0].get("text") or "")
            if stop_event.is_set():
                break
    finally:
        chunks.close()  # ends the generation thread now, not whenever the generator is collected
    return {"choices": [{"text": "".join(texts)}]}


def _request_context():
    """gradio's per-event request holder; absent from the 2023 webui's gradio."""
    try:
        from gradio.context import LocalContext
    except ImportError:
        return None
    return getattr(LocalContext, "request", None)


def _browser_session():
    """The browser session of the UI event being handled; None over the API or on the 2023 webui."""
    context = _request_context()
    return getattr(context.get() if context is not None else None, "session_hash", None)


def state_modifier(state):
    state["llava_embed_all"] = sessions.embed_all(_browser_session(), _embed_all_setting())
    _hold_generation_state(state)
    return state


def _hold_generation_state(state) -> None:
    """Keep the generation's state for measuring its prompt, in the HTTP request being served or
    else for the browser session, until the tokenizer hook has run."""
    scope = api.current_request.get()
    if scope is not None:
        scope.generation_state = state
    else:
        sessions.hold_state(_browser_session(), state)


def _generation_media():
    """The pictures of the ``<__media__>`` placeholders of the generation whose prompt the webui is
    measuring (its state is read as the webui fills it: the attachments are listed after this hook)."""
    scope = api.current_request.get()
    state = scope.generation_state if scope is not None else sessions.held_state(_browser_session())
    return webui_state.media_from_state(state) if state is not None else None


def history_modifier(history):
    _turn.history = history
    return history


def chat_input_modifier(text, visible_text, state):
    history, _turn.history = getattr(_turn, "history", None), None
    input_hijack["state"] = False
    upload = sessions.take(_browser_session())
    _turn.attached = 0
    if upload is not None and history is not None:
        try:
            webui_state.attach_to_new_message(history, upload)
            _turn.attached = 1
        except LlavaError as error:
            _warn(f"llava: {error}")
    return text, visible_text


def input_modifier(string, state=None, is_chat=False):  # the 2023 webui passes only the text
    """Default and Notebook tabs: the webui tokenizes this text before the tokenizer hook, so each
    picture's data URL becomes a short reference, resolved from the state by the hook."""
    from modules import shared
    if not is_chat and isinstance(state, dict) and isinstance(string, str) and "data:" in string:
        string = prompt_module.reference_pictures(string, state.setdefault(REFERENCES_KEY, {}))
    attached, _turn.attached = getattr(_turn, "attached", 0) if is_chat else 0, 0
    webui_state.warn_if_unsupported(string, getattr(shared.args, "loader", None), shared.model, _warn, attached)
    return string


def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    from modules import shared
    from modules.text_generation import encode, get_max_prompt_length
    media = webui_state.media_from_state(state)
    references = api.request_references() or state.get(REFERENCES_KEY)
    prepared = None
    if engine_module.has_work(prompt, media, references):
        try:
            prepared = engine().prepare(
                prompt, model=shared.model, tokenizer=shared.tokenizer,
                encode=lambda text: encode(text, add_bos_token=state["add_bos_token"]),
                max_length=get_max_prompt_length(state), media=media, embed_all=state.get("llava_embed_all"),
                model_path=webui_state.model_folder(shared), references=references)
        except LlavaError as error:
            raise _refusal(error) from None
    grew = prepared is not None and prepared.input_ids.shape[-1] > input_ids.shape[-1]
    if prepared is not None:
        for note in prepared.notes:
            _warn(f"llava: {note}")
        prompt, input_ids, input_embeds = prepared.prompt, prepared.input_ids, prepared.inputs_embeds
    _turn.reply_limit = context_limit.reply_limit(state, grew)
    _record_prompt_length(shared.model, int(input_ids.shape[-1]), state)
    if api.current_request.get() is None:
        sessions.hold_state(_browser_session(), None)
    return prompt, input_ids, input_embeds


def logits_processor_modifier(processor_list, input_ids):
    """Runs right after the tokenizer hook, in the same thread: ends the reply at the context length."""
    from modules import shared
    limit, _turn.reply_limit = getattr(_turn, "reply_limit", None), None
    eos = getattr(shared.tokenizer, "eos_token_id", None)
    if limit is not None and eos is not None:
        processor_list.append(context_limit.EndAtContextLength(limit, [eos]))
    return processor_list


def _record_prompt_length(model, length: int, state) -> None:
    """The true prompt length, pictures expanded: the webui's chat API reads it from the model (as its
    llama.cpp and ExLlamaV3 loaders provide it), the completion API's usage from the request."""
    try:
        model.last_prompt_token_count = length
    except Exception:
        pass
    request = api.current_request.get()
    if request is not None:
        request.record_generation(length, int(state.get("truncation_length") or 0))


def _refusal(error: Exception) -> Exception:
    """Show the problem; over the API it becomes the host's 400 error."""
    _warn(f"llava: {error}")
    try:
        from modules.api.errors import InvalidRequestError
    except ImportError:
        return error
    return InvalidRequestError(message=str(error), param="image")


def custom_tokenized_length(prompt):
    from modules import shared
    from modules.text_generation import encode
    if shared.model is None or shared.tokenizer is None:
        return None
    try:
        return engine().token_count(prompt, shared.model, shared.tokenizer, lambda text: encode(text),
                                    media=_generation_media(), model_path=webui_state.model_folder(shared),
                                    references=api.request_references())
    except LlavaError:
        return None


def ui():
    import gradio as gr
    from modules import shared
    with gr.Accordion("LLaVA", open=True):
        picture = gr.File(label="Picture for the next message", file_types=["image"], type="filepath",
                          elem_id="llava-picture")
        embed_all = gr.Checkbox(value=_embed_all_setting(), elem_id="llava-embed-all",
                                label="Embed all images, not only the last one")

    # gradio hands a handler its gr.Request when the parameter is annotated with the type.
    def pick(path, request: gr.Request):
        _pick(path, _session_of(request))

    def cancel(request: gr.Request):
        _pick(None, _session_of(request))

    def choose_embed_all(value, request: gr.Request):
        sessions.set_embed_all(_session_of(request), value)

    # upload and clear are the user's own actions; emptying the field after a send fires neither.
    picture.upload(pick, picture, None)
    picture.clear(cancel, None, None)
    embed_all.change(choose_embed_all, embed_all, None)
    for name, event in (("Generate", "click"), ("textbox", "submit")):
        listener = getattr(shared.gradio.get(name), event, None)
        if listener is not None:
            listener(lambda: None, None, picture)  # the picture went with the message: empty the field


def _session_of(request):
    """Hooks see the session only where gradio keeps the request per event (not the 2023 webui)."""
    return getattr(request, "session_hash", None) if _request_context() is not None else None


def _pick(path, session=None) -> None:
    if path is None:
        sessions.pick(session, None)
        return
    try:
        upload = webui_state.read_upload(path)
    except LlavaError as error:
        sessions.pick(session, None)
        _warn(f"llava: {error}")
        return
    sessions.pick(session, upload)
    if _request_context() is None:  # the 2023 webui: the picture goes into the message text
        input_hijack.update(state=True, value=_inline)


def _inline(text, visible_text):
    upload = sessions.take(None)
    if upload is None:
        return text, visible_text
    return webui_2023.inline_in_message(text, visible_text, upload, escaped_visible=False)
