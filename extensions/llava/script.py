"""text-generation-webui loads this file: it hands the webui the extension's hooks and UI, which live
in ``webui/``, and hands ``webui/`` the webui's own objects (``Webui``): this file is the only one that
imports the webui. The webui imports this file either as
``extensions.llava.script`` or by its path, outside any package; in the second case the folder is
made a package first, so that the rest of the extension is imported like any package."""

import importlib.util
import sys
from pathlib import Path

if not __package__:
    __package__, __spec__ = "llava_extension", None  # relative imports below resolve in that package
    if __package__ not in sys.modules:
        _here = Path(__file__).resolve().parent
        _spec = importlib.util.spec_from_file_location(__package__, _here / "__init__.py",
                                                       submodule_search_locations=[str(_here)])
        sys.modules[__package__] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[__package__])

from .webui.extension import bind_webui, params  # noqa: E402  (the webui writes the llava-* settings into params)
from .webui.hooks import (chat_input_modifier, custom_tokenized_length, history_modifier,  # noqa: E402,F401
                          input_modifier, logits_processor_modifier, setup, state_modifier, tokenizer_modifier)
from .webui.page import custom_css, input_hijack, ui  # noqa: E402,F401


class Webui:
    """The webui's objects the adapter uses. Each is imported when asked for: the webui has loaded its
    modules by then, and an object the running webui lacks (the 2023 one has no OpenAI API) is None."""

    @property
    def shared(self):
        from modules import shared
        return shared

    @staticmethod
    def encode(text: str, **kwargs):
        from modules.text_generation import encode
        return encode(text, **kwargs)

    @staticmethod
    def max_prompt_length(state) -> int:
        from modules.text_generation import get_max_prompt_length
        return get_max_prompt_length(state)

    @property
    def logger(self):
        try:
            from modules.logging_colors import logger
        except ImportError:
            return None
        return logger

    @staticmethod
    def request_error(message: str, param: str):
        """The webui's API error for a bad request (a 400), or None without its OpenAI API."""
        try:
            from modules.api.errors import InvalidRequestError
        except ImportError:
            return None
        return InvalidRequestError(message=message, param=param)

    @property
    def api_script(self):
        try:
            from modules.api import script
        except ImportError:
            return None
        return script

    @staticmethod
    def stream_completions(body: dict, stop_event):
        """The webui's own streamed completion of ``body``; a ValueError if the body is not a valid request."""
        from modules.api import completions
        from modules.api.typing import CompletionRequest, to_dict
        return completions.stream_completions(to_dict(CompletionRequest(**body)), stop_event=stop_event)


bind_webui(Webui())
