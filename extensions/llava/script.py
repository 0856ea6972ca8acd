"""text-generation-webui loads this file: it hands the webui the extension's hooks and UI, which live
in ``webui/`` (the only code here that imports the webui). The webui imports this file either as
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

from .webui.extension import params  # noqa: E402  (the webui writes the llava-* settings into it)
from .webui.hooks import (chat_input_modifier, custom_tokenized_length, history_modifier,  # noqa: E402,F401
                          input_modifier, logits_processor_modifier, setup, state_modifier, tokenizer_modifier)
from .webui.page import input_hijack, ui  # noqa: E402,F401
