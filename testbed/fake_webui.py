"""A stand-in for text-generation-webui that drives ``extensions/llava/script.py`` as the host does, for
fast tests in-process. The real webui runs in the ``test_real_*`` tests (``testbed.real_host``).

It follows the current webui (2026-05):

- ``llava-*`` settings are written into ``params`` before ``setup()``; with ``api`` a stand-in of its
  API server (``modules.api``) is there for ``setup()`` to extend; ``ui()`` builds the LLaVA block
  with a stand-in of gradio that records each event's handler, and the user's actions call those
  handlers with a ``gr.Request`` of the browser session, as gradio does;
- a chat turn runs, as ``chatbot_wrapper`` does: ``history_modifier``, ``state_modifier``,
  ``chat_input_modifier``, ``input_modifier``; lists the history's image attachments in
  ``state['image_attachments']`` with a ``<__media__>`` placeholder at the start of their message;
  renders the prompt, dropping the oldest turns until ``custom_tokenized_length`` says it fits;
- a generation runs as ``generate_reply_HF``: the Default and Notebook tabs' ``state_modifier`` and
  ``input_modifier``; encode with the host's BOS and left truncation; ``auto_max_new_tokens`` sized on
  those ids; ``tokenizer_modifier``; ``logits_processor_modifier``; ``model.generate(inputs=...,
  inputs_embeds=...)``; the reply decoded from after the returned ids.

In instruct mode a chat is rendered with the model's chat template, which writes BOS itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import html
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import types
import typing

import torch
from transformers import LogitsProcessorList

from extensions.llava.media.items import data_url

SCRIPT = "extensions.llava.script"
ADAPTER = "extensions.llava.webui"


class Host:
    def __init__(self, model=None, tokenizer=None, settings: dict | None = None, loader: str = "Transformers",
                 api: bool = False, model_dir: str = "", model_name: str = "None", gradio_sessions: bool = True):
        self.logger = logging.getLogger(f"fake-webui-{id(self)}")  # its own: hosts may live side by side
        self.logger.setLevel(logging.INFO)
        self.warned: list[str] = []  # what the extension told the user (log warnings and browser toasts)
        self.logged: list[str] = []  # every line of the extension's log
        self._captures = [_Capture(self.warned, logging.WARNING), _Capture(self.logged, logging.INFO)]
        for capture in self._captures:
            self.logger.addHandler(capture)
        self.shared = types.SimpleNamespace(
            args=types.SimpleNamespace(loader=loader, api=api, public_api=False, model_dir=model_dir, cpu=True),
            model=model, tokenizer=tokenizer, model_name=model_name, settings=dict(settings or {}),
            default_settings={}, gradio={"Generate": _Component(), "textbox": _Component()})
        # gradio keeps each UI event's request (with its browser session) in a context variable
        self.request_context = contextvars.ContextVar("request", default=None)
        self.gradio = _fake_gradio(self.request_context if gradio_sessions else None, self.logger)
        self.api = None
        if api:
            from testbed.fake_webui_api import WebuiApi
            self.api = WebuiApi(self)
        self._install_modules()
        self.script = importlib.import_module(SCRIPT)
        self.extension = importlib.import_module(f"{ADAPTER}.extension")
        self.apply_settings()
        self.script.setup()
        with self.gradio.Blocks():
            self.script.ui()
        self.history = {"internal": [], "visible": [], "metadata": {}}
        self.upload_dir = tempfile.mkdtemp(prefix="llava-uploads-")
        self.last_prompt: str | None = None  # the prompt of the last generation, as the webui rendered it
        self.last_prompt_ids = None
        self.last_generate_params: dict = {}

    def _install_modules(self) -> None:
        modules = types.ModuleType("modules")
        text_generation = types.ModuleType("modules.text_generation")
        text_generation.encode = self.encode
        text_generation.get_max_prompt_length = lambda state: state["truncation_length"] - state["max_new_tokens"]
        logging_colors = types.ModuleType("modules.logging_colors")
        logging_colors.logger = self.logger
        modules.shared, modules.text_generation, modules.logging_colors = self.shared, text_generation, logging_colors
        installed = {"modules": modules, "modules.shared": self.shared, "modules.text_generation": text_generation,
                     "modules.logging_colors": logging_colors, "gradio": self.gradio}
        installed["gradio.context"] = self.gradio.context  # None: the 2023 webui's gradio has none
        installed.update(self.api.modules if self.api is not None else {})
        self._saved = {name: sys.modules.get(name) for name in installed}
        self._installed = installed
        sys.modules.update(installed)
        # each host loads the extension anew, as each start of the webui does
        for name in [n for n in sys.modules if n == SCRIPT or n.startswith(ADAPTER)]:
            del sys.modules[name]

    def activate(self) -> None:
        """This host's webui modules in ``sys.modules`` again (another host made in the meantime replaced
        them): the extension imports them lazily, at each call, as it would in its own webui."""
        sys.modules.update(self._installed)

    def close(self) -> None:
        for capture in self._captures:
            self.logger.removeHandler(capture)
        shutil.rmtree(self.upload_dir, ignore_errors=True)
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

    # ------------------------------------------------------------ the host's pieces

    def apply_settings(self) -> None:
        for key in self.script.params:
            setting = f"llava-{key}"
            self.shared.default_settings[setting] = self.script.params[key]
            if setting in self.shared.settings:
                self.script.params[key] = self.shared.settings[setting]

    def engine(self):
        """The extension's engine (its counters and cache are what tests look at)."""
        return self.extension.engine()

    def encode(self, prompt, add_special_tokens=True, add_bos_token=True, truncation_length=None):
        tokenizer = self.shared.tokenizer
        ids = tokenizer.encode(str(prompt), return_tensors="pt", add_special_tokens=add_special_tokens)
        bos = tokenizer.bos_token_id
        if bos is not None:
            if add_bos_token and (ids.numel() == 0 or ids[0][0] != bos):
                ids = torch.cat((torch.tensor([[bos]]), ids), 1)
            while ids.shape[1] > 1 and ids[0][0] == bos and ids[0][1] == bos:  # never two BOS
                ids = ids[:, 1:]
        if truncation_length is not None:
            ids = ids[:, -truncation_length:]
        return ids

    def get_encoded_length(self, prompt: str) -> int:
        length = self.script.custom_tokenized_length(prompt)
        return length if length is not None else len(self.encode(prompt)[0])

    def state(self, **overrides) -> dict:
        """A generation's state with the webui's fields this stand-in reads (not yet through any hook)."""
        state = {"truncation_length": 2048, "max_new_tokens": 8, "add_bos_token": True, "mode": "chat",
                 "skip_special_tokens": True, "auto_max_new_tokens": False}
        state.update(overrides)
        return state

    def generate(self, prompt: str, state: dict | None = None, is_chat: bool = False) -> str:
        """_generate_reply, then generate_reply_HF (its static cache, negative prompt, guidance and streaming
        in a thread of its own included). ``last_scores`` keeps the logits of each step, ``last_prefill``
        the positions the model computed in its first step."""
        self.activate()
        self.last_prompt = prompt
        state = state or self.state()
        if not is_chat:
            state = self.script.state_modifier(state)
            prompt = self.script.input_modifier(prompt, state, is_chat=False)
        params = self._generate_params(state)
        max_length = state["truncation_length"] - state["max_new_tokens"]
        input_ids = self.encode(prompt, add_bos_token=state["add_bos_token"], truncation_length=max_length)
        if state["auto_max_new_tokens"]:
            params["max_new_tokens"] = state["truncation_length"] - input_ids.shape[-1]
        prompt, input_ids, inputs_embeds = self.script.tokenizer_modifier(state, prompt, input_ids, None)
        params["inputs"] = input_ids
        if inputs_embeds is not None:
            params["inputs_embeds"] = inputs_embeds
        self.last_scores = []
        processors = LogitsProcessorList([_Recorder(self.last_scores)])
        self.script.logits_processor_modifier(processors, input_ids)
        params["logits_processor"] = processors
        self.last_prompt_ids, self.last_generate_params = input_ids, params
        output = self._run_generate(params, state.get("stream", False))
        self.last_reply_ids = output[len(input_ids[0]):]
        return self.shared.tokenizer.decode(self.last_reply_ids, skip_special_tokens=state["skip_special_tokens"])

    def _generate_params(self, state: dict) -> dict:
        from transformers import StoppingCriteriaList
        params = {"max_new_tokens": state["max_new_tokens"], "do_sample": False, "use_cache": True,
                  "pad_token_id": self.shared.tokenizer.eos_token_id, "stopping_criteria": StoppingCriteriaList()}
        if state.get("guidance_scale", 1) != 1:
            params["guidance_scale"] = state["guidance_scale"]
        if state.get("negative_prompt"):
            params["negative_prompt_ids"] = self.encode(state["negative_prompt"])
        if state.get("static_cache"):
            params["cache_implementation"] = "static"
        return params

    def _run_generate(self, params: dict, stream: bool):
        """``model.generate``, in this thread or (streaming) in one of its own, as the webui's Iteratorize
        runs it; the first forward's length recorded."""
        model, first = self.shared.model, []

        def record(module, args, kwargs):
            if not first:
                inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
                first.append(inputs.shape[1])

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                if not stream:
                    return model.generate(**params)[0]
                result = []
                thread = threading.Thread(target=lambda: result.append(model.generate(**params)[0]))
                thread.start()
                thread.join()
                return result[0]
        finally:
            hook.remove()
            self.last_prefill = first[0] if first else None

    # ------------------------------------------------------------ the user in the browser

    def pick(self, image, session=None) -> None:
        """The user picks ``image`` (a PIL picture, or None to clear) in the extension's field."""
        if image is None:
            self.clear_field(session)
            return
        path = os.path.join(self.upload_dir, f"upload-{len(os.listdir(self.upload_dir))}.png")
        image.save(path)
        self.pick_file(path, session)

    def pick_file(self, path: str, session=None):
        """The user picks the file at ``path`` in the extension's field; what the preview then shows."""
        return self.gradio.fire("llava-picture", "upload", path, session=session)[0]

    def clear_field(self, session=None):
        """The user empties the extension's field; what the preview then shows."""
        return self.gradio.fire("llava-picture", "clear", session=session)[0]

    def choose_embed_all(self, value: bool, session=None) -> None:
        """The user ticks or unticks "Embed all images"."""
        self.gradio.fire("llava-embed-all", "change", value, session=session)

    def chat(self, text: str, state: dict | None = None, attachments: list | None = None, session=None) -> str:
        """One chat turn as the current webui's chatbot_wrapper runs it. ``attachments`` are pictures
        given to the webui's own attach button; ``session`` the browser session of the UI event."""
        self.activate()
        state = state or self.state()
        with self.browser_session(session):
            history = self.script.history_modifier(copy.deepcopy(self.history))
            row = len(history["internal"])
            for image in attachments or []:
                entry = history.setdefault("metadata", {}).setdefault(f"user_{row}", {})
                entry.setdefault("attachments", []).append({"name": "image.png", "type": "image",
                                                            "image_data": data_url(image)})
            state = self.script.state_modifier(state)
            visible_text = html.escape(text)
            text, visible_text = self.script.chat_input_modifier(text, visible_text, state)
            text = self.script.input_modifier(text, state, is_chat=True)
            history["internal"].append([text, ""])
            history["visible"].append([visible_text, ""])
            self.history = history
            images = self.image_attachments()
            if images:
                state["image_attachments"] = images
            if state["mode"] == "instruct":
                state["add_bos_token"] = False  # the instruction template writes BOS itself
            prompt = self.chat_prompt(state)
            reply = self.generate(prompt, state, is_chat=True).lstrip(" ")
        history["internal"][-1][1] = reply
        history["visible"][-1][1] = html.escape(reply)
        return reply

    @property
    def internal(self) -> list[list[str]]:
        return self.history["internal"]

    @property
    def visible(self) -> list[list[str]]:
        return self.history["visible"]

    def image_attachments(self) -> list[dict]:
        """Every image attachment of the history, oldest first, as the webui lists them in the state."""
        return [a for i in range(len(self.internal)) for a in self.attachments_of(i) if a.get("type") == "image"]

    def attachments_of(self, row: int) -> list[dict]:
        return self.history.get("metadata", {}).get(f"user_{row}", {}).get("attachments", [])

    @contextlib.contextmanager
    def browser_session(self, session):
        """gradio's per-event request, as the webui's UI events carry it."""
        token = self.request_context.set(types.SimpleNamespace(session_hash=session) if session else None)
        try:
            yield
        finally:
            self.request_context.reset(token)

    def chat_prompt(self, state: dict) -> str:
        """Oldest turns are dropped until the prompt fits, counting tokens as the host does."""
        budget = state["truncation_length"] - state["max_new_tokens"]
        turns = [[self.with_placeholders(i, user), bot] for i, (user, bot) in enumerate(self.internal)]
        while True:
            prompt = self.render(turns, state)
            if len(turns) <= 1 or self.get_encoded_length(prompt) <= budget:
                return prompt
            turns = turns[1:]

    def with_placeholders(self, row: int, text: str) -> str:
        count = sum(1 for a in self.attachments_of(row) if a.get("type") == "image")
        return "<__media__>" * count + "\n\n" + text if count else text

    def render(self, turns: list[list[str]], state: dict) -> str:
        """Instruct mode renders the model's chat template (with BOS); otherwise a plain transcript."""
        template = getattr(self.shared.tokenizer, "chat_template", None)
        if state["mode"] != "instruct" or not template:
            return "".join(f"USER: {user}\nASSISTANT: {bot}" + ("\n" if bot else "") for user, bot in turns)
        messages = []
        for user, bot in turns:
            messages.append({"role": "user", "content": user.strip()})
            if bot:
                messages.append({"role": "assistant", "content": bot.strip()})
        return self.shared.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _Recorder:
    """A logits processor that keeps each step's scores (the logits, where nothing warps them)."""

    def __init__(self, into: list):
        self.into = into

    def __call__(self, input_ids, scores):
        self.into.append(scores.detach().clone())
        return scores


class _Capture(logging.Handler):
    def __init__(self, into: list, level: int):
        super().__init__(level)
        self.into = into

    def emit(self, record) -> None:
        self.into.append(record.getMessage())


class _Component:
    """A gradio component: its events record their handlers."""

    def __init__(self, *args, elem_id: str | None = None, **kwargs):
        self.elem_id = elem_id
        self.handlers: dict[str, list] = {}

    def __getattr__(self, event):
        if event.startswith("_"):
            raise AttributeError(event)

        def listen(fn, inputs=None, outputs=None, **kwargs):
            self.handlers.setdefault(event, []).append(fn)
        return listen


def _fake_gradio(request_context, logger):
    """The parts of gradio the extension's block uses. Without ``request_context`` it is the 2023
    webui's gradio: no per-event request."""
    gradio = types.ModuleType("gradio")
    components: dict[str, _Component] = {}

    class Request:
        def __init__(self, session_hash=None):
            self.session_hash = session_hash

    def component(*args, elem_id=None, **kwargs):
        made = _Component(*args, elem_id=elem_id, **kwargs)
        if elem_id:
            components[elem_id] = made
        return made

    def fire(elem_id: str, event: str, *values, session=None) -> list:
        sys.modules.update({"gradio": gradio, "gradio.context": gradio.context})
        """A user action on a component: its handlers run with the event's request, as gradio runs them;
        what each returns (the new values of its outputs)."""
        request = Request(session)
        token = request_context.set(request if session else None) if request_context is not None else None
        try:
            returned = []
            for handler in components[elem_id].handlers.get(event, []):
                # as gradio does: a parameter annotated gr.Request gets the event's request (the
                # annotation is resolved at run time, so it must name something the handler can see)
                wants_request = any(hint is Request for hint in typing.get_type_hints(handler).values())
                returned.append(handler(*values, *([request] if wants_request else [])))
            return returned
        finally:
            if token is not None:
                request_context.reset(token)

    page = component(elem_id="page")  # the whole page: its unload event fires when a tab closes
    gradio.Accordion = gradio.Blocks = lambda *args, **kwargs: contextlib.nullcontext()
    gradio.File = gradio.Checkbox = gradio.Image = component
    gradio.Request = Request
    gradio.Warning = lambda message: None  # a toast: the log line is what the tests read
    gradio.fire = fire
    gradio.context = None
    if request_context is not None:
        gradio.context = types.ModuleType("gradio.context")
        gradio.context.LocalContext = types.SimpleNamespace(request=request_context)
        gradio.context.Context = types.SimpleNamespace(root_block=page)
    return gradio
