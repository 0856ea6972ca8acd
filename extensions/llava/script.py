"""text-generation-webui adapter for the llava extension: hooks and UI only.

Every hook is a few lines that call the core (the other modules of this folder, which
never import the webui). ``modules.*`` is imported lazily, inside the hooks.
"""

import importlib
import importlib.util
import sys
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
engine_module = _core("engine")
chat_ui = _core("chat_ui")
LlavaError = _core("errors").LlavaError

params = {"display_name": "LLaVA", "is_tab": False, **settings_module.DEFAULTS}

# The seed-era webui takes the next message's picture through input_hijack; the current
# one calls chat_input_modifier. Each host uses one of the two, never both.
input_hijack = {"state": False, "value": ["", ""]}
uploads = chat_ui.PendingUpload()
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
    global _engine
    if _engine is None:
        _engine = engine_module.LlavaEngine(log=_log)  # configured from params before each use
    return _engine


def setup():
    """Validate the settings and serve the seed's API route; nothing heavy loads here."""
    try:
        engine().configure(settings_module.Settings.from_params(params))
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
        return  # the seed-era webui serves /api/v1/generate from its own api extension
    api = _core("api")
    api.add_generate_route(api_script.app, _complete)
    api_script.app.add_middleware(api.ImageCheckMiddleware, check=_request_problem,
                                  paths=("/v1/completions", "/v1/chat/completions", api.GENERATE_PATH))


def _complete(body: dict) -> dict:
    """Run a seed-style request through the host's own completion endpoint logic."""
    from modules.api import completions
    from modules.api.typing import CompletionRequest, to_dict
    try:
        request = CompletionRequest(**body)
    except ValueError as error:
        raise LlavaError(f"the request is not valid: {error}") from None
    return completions.completions(to_dict(request))


def _request_problem(path: str, body: dict):
    try:
        engine().configure(settings_module.Settings.from_params(params))
    except LlavaError:
        pass  # the generation reports bad settings itself
    return engine().request_problem(path, body)


def state_modifier(state):
    state["llava_embed_all"] = bool(params["add_all_images_to_prompt"])
    return state


def chat_input_modifier(text, visible_text, state):
    input_hijack["state"] = False
    return uploads.attach(text, visible_text, escaped_visible=True)


def input_modifier(string, state=None, is_chat=False):  # the 2023 webui passes only the text
    from modules import shared
    chat_ui.warn_if_unsupported(string, state, getattr(shared.args, "loader", None), shared.model, _warn)
    return string


def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    from modules import shared
    from modules.text_generation import encode, get_max_prompt_length
    media = chat_ui.media_from_state(state)
    if not engine_module.holds_images(prompt, media):
        return prompt, input_ids, input_embeds
    try:
        engine().configure(settings_module.Settings.from_params(params))
        prepared = engine().prepare(
            prompt, model=shared.model, tokenizer=shared.tokenizer,
            encode=lambda text: encode(text, add_bos_token=state["add_bos_token"]),
            max_length=get_max_prompt_length(state), media=media,
            embed_all=state.get("llava_embed_all"), model_path=chat_ui.model_folder(shared))
    except LlavaError as error:
        raise _refusal(error) from None
    if prepared is None:
        return prompt, input_ids, input_embeds
    for note in prepared.notes:
        _warn(f"llava: {note}")
    return prepared.prompt, prepared.input_ids, prepared.inputs_embeds


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
                                    model_path=chat_ui.model_folder(shared))
    except LlavaError:
        return None


def ui():
    import gradio as gr
    from modules import shared
    with gr.Accordion("LLaVA", open=True):
        picture = gr.Image(label="Picture for the next message", type="pil")
        embed_all = gr.Checkbox(value=bool(params["add_all_images_to_prompt"]),
                                label="Embed all images, not only the last one")
    picture.change(lambda image: _pick(image), picture, None)
    embed_all.change(lambda value: params.update(add_all_images_to_prompt=bool(value)), embed_all, None)
    for name in ("Generate", "textbox"):
        component = shared.gradio.get(name)
        event = getattr(component, "click" if name == "Generate" else "submit", None)
        if event is not None:
            event(lambda: None, None, picture)  # the picture went with the message: clear the field


def _pick(image) -> None:
    uploads.set(image)
    input_hijack.update(state=image is not None,
                        value=lambda text, visible: uploads.attach(text, visible, escaped_visible=False))
