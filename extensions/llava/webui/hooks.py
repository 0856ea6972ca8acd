"""The webui's hooks, in the order the webui calls them for a generation; each hands its data to
the core and keeps what a later hook needs in the generation's session."""

from __future__ import annotations

from ..engine import items_in
from ..errors import LlavaError
from ..loaders import ignored_pictures_warning
from ..prompt.attachments import attach_to_new_message, items_from_state
from ..prompt.parse import reference_items
from ..settings import SettingsError
from ..tokens.context_limit import EndAtContextLength, reply_limit
from .extension import embed_all, engine, loaded_model, log, session, warn, webui
from .page import input_hijack
from .reuse import offer
from .server import serve_api


def setup():
    """Validate the settings and serve the extension's API parts; nothing heavy loads here. The request
    check and the 2023 route are served whatever the settings say: a bad setting never switches a check off."""
    try:
        engine()
    except LlavaError as error:
        log(f"llava: {error}", "error")
    except Exception as error:  # a setting no check foresaw: said, and the API parts still served
        log(f"llava: the settings could not be applied: {type(error).__name__}: {error}", "error")
    serve_api()


def history_modifier(history):
    session().history = history  # the copy that the message being sent is added to
    return history


def state_modifier(state):
    session().state = state  # the webui lists its attachments later; the length hook counts them
    return state


def chat_input_modifier(text, visible_text, state):
    current = session()
    history, upload = current.take("history"), current.take("picked")
    input_hijack["state"] = False
    if upload is not None and history is not None:
        try:
            attach_to_new_message(history, upload)
            current.attached = 1
        except LlavaError as error:
            warn(f"llava: {error}")
    return text, visible_text


def input_modifier(string, state=None, is_chat=False):  # the 2023 webui passes only the text
    """Default and Notebook tabs: the webui tokenizes this text before the tokenizer hook, so each
    picture's data URL becomes a short reference, resolved by that hook."""
    shared = webui().shared
    current = session()
    attached = current.take("attached")
    if not is_chat and isinstance(string, str) and "data:" in string:
        string = reference_items(string, current.references)
    warning = ignored_pictures_warning(string, getattr(shared.args, "loader", None), shared.model,
                                      attached if is_chat else 0)
    if warning:
        warn(warning)
    return string


def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    host = webui()
    shared = host.shared
    current = session()
    media = items_from_state(state)
    try:
        current_engine = engine()
        prepared = current_engine.prepare(
            prompt, loaded_model(current_engine), max_length=host.max_prompt_length(state), media=media, embed_all=embed_all(current),
            references=current.references, encode_options={"add_bos_token": state["add_bos_token"]},
            cache_scope=current.cache_salt)
    except SettingsError as error:
        if items_in(prompt, media, current.references):
            raise _refusal(error, current) from None
        prepared = None  # a bad setting leaves text-only generations alone
    except LlavaError as error:
        raise _refusal(error, current) from None
    if prepared is not None:
        for note in prepared.notes:
            warn(f"llava: {note}")
        grew = prepared.input_ids.shape[-1] > input_ids.shape[-1]
        prompt, input_ids, input_embeds = prepared.prompt, prepared.input_ids, prepared.inputs_embeds
        current.reply_limit = reply_limit(state, grew)
        if input_embeds is not None:
            offer(shared.model, getattr(shared.args, "loader", None), prepared)
    _record_prompt_length(shared.model, current, int(input_ids.shape[-1]), state)
    current.finish_generation()
    return prompt, input_ids, input_embeds


def logits_processor_modifier(processor_list, input_ids):
    """Runs right after the tokenizer hook: ends the reply at the context length."""
    shared = webui().shared
    limit = session().take("reply_limit")
    eos = getattr(shared.tokenizer, "eos_token_id", None)
    if limit is not None and eos is not None:
        processor_list.append(EndAtContextLength(limit, [eos]))
    return processor_list


def custom_tokenized_length(prompt):
    host = webui()
    shared = host.shared
    if shared.model is None or shared.tokenizer is None:
        return None
    current = session()
    media = items_from_state(current.state) if current.state is not None else None
    try:
        current_engine = engine()
        return current_engine.token_count(prompt, loaded_model(current_engine), media=media,
                                          references=current.references)
    except LlavaError:
        return None


def _record_prompt_length(model, current, length: int, state) -> None:
    """The true prompt length, pictures widened: the webui's chat API reads it from the model (as its
    llama.cpp and ExLlamaV3 loaders provide it), a completion's usage from the request's session."""
    try:
        model.last_prompt_token_count = length
    except Exception:
        pass
    current.record_prompt(length, int(state.get("truncation_length") or 0))


def _refusal(error: Exception, current) -> Exception:
    """Show the problem; over the API it becomes the webui's 400 error (the request's record keeps it for
    a route that swallows it)."""
    warn(f"llava: {error}")
    current.refusal = str(error)
    return webui().request_error(str(error), "image") or error
