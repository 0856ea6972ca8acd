"""A stand-in for text-generation-webui that drives ``extensions/llava/script.py`` as the host does.

It follows the current webui (2026-05): ``llava-*`` settings are written into ``params``
before ``setup()``; a Transformers generation encodes the prompt with the host's BOS and
left truncation (``truncation_length - max_new_tokens``), passes it through
``tokenizer_modifier`` and calls ``model.generate(inputs=..., inputs_embeds=...)``, then
decodes the tokens after the returned ids; token counting goes through
``custom_tokenized_length``; a chat turn runs ``chat_input_modifier`` then
``input_modifier`` on the user's text, and keeps internal and visible histories. In
instruct mode a chat is rendered with the model's chat template, which writes BOS itself;
pictures from the webui's attach button become ``<__media__>`` placeholders.
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
import types

import torch

from extensions.llava.images import data_url

SCRIPT = "extensions.llava.script"


class Host:
    def __init__(self, model=None, tokenizer=None, settings: dict | None = None, loader: str = "Transformers",
                 api: bool = False, model_dir: str = "", model_name: str = "None", gradio_sessions: bool = True,
                 extra_modules: dict | None = None):
        self.logger = logging.getLogger("fake-webui")
        self.warned: list[str] = []  # what the extension told the user (log warnings and browser toasts)
        self._capture = _Capture(self.warned)
        self.logger.addHandler(self._capture)
        shared = types.SimpleNamespace(
            args=types.SimpleNamespace(loader=loader, api=api, public_api=False, model_dir=model_dir, cpu=True),
            model=model, tokenizer=tokenizer, model_name=model_name, settings=dict(settings or {}),
            default_settings={}, gradio={})
        self.shared = shared
        modules = types.ModuleType("modules")
        text_generation = types.ModuleType("modules.text_generation")
        text_generation.encode = self.encode
        text_generation.get_max_prompt_length = lambda state: state["truncation_length"] - state["max_new_tokens"]
        logging_colors = types.ModuleType("modules.logging_colors")
        logging_colors.logger = self.logger
        modules.shared = shared
        modules.text_generation = text_generation
        modules.logging_colors = logging_colors
        # gradio keeps each UI event's request (with its browser session) in a context variable
        self.request_context = contextvars.ContextVar("request", default=None)
        gradio = types.ModuleType("gradio")
        gradio.context = types.ModuleType("gradio.context")
        gradio.context.LocalContext = types.SimpleNamespace(request=self.request_context)
        self._modules = {"modules": modules, "modules.shared": shared, "modules.text_generation": text_generation,
                         "modules.logging_colors": logging_colors}
        if gradio_sessions:  # the 2023 webui's gradio has no per-event request
            self._modules.update({"gradio": gradio, "gradio.context": gradio.context})
        self._modules.update(extra_modules or {})  # e.g. a stand-in for the webui's API server
        self._saved = {name: sys.modules.get(name) for name in self._modules}
        sys.modules.update(self._modules)
        for name in [n for n in sys.modules if n.startswith("extensions.llava.script")]:
            del sys.modules[name]
        self.script = importlib.import_module(SCRIPT)
        self.apply_settings()
        self.script.setup()
        self.history = {"internal": [], "visible": [], "metadata": {}}
        self.upload_dir = tempfile.mkdtemp(prefix="llava-uploads-")
        self.last_prompt_ids = None

    def close(self) -> None:
        self.logger.removeHandler(self._capture)
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
        state = {"truncation_length": 2048, "max_new_tokens": 8, "add_bos_token": True, "mode": "chat",
                 "skip_special_tokens": True}
        state.update(overrides)
        return self.script.state_modifier(state)

    def generate(self, prompt: str, state: dict | None = None, is_chat: bool = False) -> str:
        """generate_reply_HF: encode → tokenizer hook → model.generate → decode the new tokens."""
        state = state or self.state()
        if not is_chat:
            prompt = self.script.input_modifier(prompt, state, is_chat=False)
        max_length = state["truncation_length"] - state["max_new_tokens"]
        input_ids = self.encode(prompt, add_bos_token=state["add_bos_token"], truncation_length=max_length)
        prompt, input_ids, inputs_embeds = self.script.tokenizer_modifier(state, prompt, input_ids, None)
        self.last_prompt_ids = input_ids
        params = {"inputs": input_ids, "max_new_tokens": state["max_new_tokens"], "do_sample": False,
                  "pad_token_id": self.shared.tokenizer.eos_token_id}
        if inputs_embeds is not None:
            params["inputs_embeds"] = inputs_embeds
        with torch.no_grad():
            output = self.shared.model.generate(**params)[0]
        self.last_reply_ids = output[len(input_ids[0]):]
        return self.shared.tokenizer.decode(self.last_reply_ids, skip_special_tokens=state["skip_special_tokens"])

    def pick(self, image, session=None) -> None:
        """The user picks ``image`` (a PIL picture, or None to clear) in the extension's field."""
        if image is None:
            self.script._pick(None, session)
            return
        path = os.path.join(self.upload_dir, f"upload-{len(os.listdir(self.upload_dir))}.png")
        image.save(path)
        self.script._pick(path, session)

    def pick_file(self, path: str, session=None) -> None:
        """The user picks the file at ``path`` in the extension's field."""
        self.script._pick(path, session)

    def chat(self, text: str, state: dict | None = None, attachments: list | None = None, session=None) -> str:
        """One chat turn as the current webui's chatbot_wrapper runs it.

        The history is copied and handed to ``history_modifier``; ``attachments`` (pictures given to
        the webui's own attach button) go into the new message's metadata; then ``state_modifier``,
        ``chat_input_modifier`` and ``input_modifier`` run on the text; every image attachment of the
        history is listed in ``state['image_attachments']`` and stands as a ``<__media__>`` placeholder
        at the start of its message. ``session`` is the browser session the UI event belongs to.
        """
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
        images = [a for i in range(len(history["internal"]))
                  for a in history.get("metadata", {}).get(f"user_{i}", {}).get("attachments", [])
                  if a.get("type") == "image"]
        if images:
            state["image_attachments"] = images
        if state["mode"] == "instruct":
            state["add_bos_token"] = False  # the instruction template writes BOS itself
        self.history = history
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


class _Capture(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record) -> None:
        self.into.append(record.getMessage())
