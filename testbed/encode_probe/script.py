"""A webui extension for the real-host tests: records how many characters each call of the webui's
``encode`` receives, one line per call, in the file named by LLAVA_ENCODE_PROBE_LOG.

The webui modules import ``encode`` by name, so each module's reference is wrapped.
"""

import functools
import importlib
import os

params = {"display_name": "encode probe", "is_tab": False}
MODULES = ("modules.text_generation", "modules.chat", "modules.api.completions", "modules.api.script")


def setup():
    path = os.environ.get("LLAVA_ENCODE_PROBE_LOG")
    if not path:
        return
    from modules import text_generation
    original = text_generation.encode

    @functools.wraps(original)
    def recorded(prompt, *args, **kwargs):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{len(str(prompt))}\n")
        return original(prompt, *args, **kwargs)

    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        if getattr(module, "encode", None) is original:
            module.encode = recorded
