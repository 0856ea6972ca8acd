"""Stand-ins for the webui files that a copy of the host may lack.

The webui keeps its style sheets and ``user_data`` (default character, presets) in folders that
its own ``.gitignore`` names, and a copy made by honouring that file lacks them; the server then
cannot even import ``modules.html_generator``. This writes what the server reads at start-up:
empty style sheets (the page works unstyled), an empty ``extensions`` package, a default
character, the default ``Top-P`` preset with the value the webui ships, and the Alpaca
instruction template it falls back on. Files that exist are never touched.

    python -m testbed.webui_standins WEBUI_DIR
"""

import os
import sys

STYLE_SHEETS = ["main.css", "html_readable_style.css", "html_instruct_style.css", "chat_style-cai-chat.css",
                "NotoSans/stylesheet.css", "katex/katex.min.css", "highlightjs/highlightjs-copy.min.css"]
USER_DATA = {
    "characters/Assistant.yaml": "name: AI\ngreeting: How can I help you today?\n"
                                 "context: A chat between a user and a helpful AI assistant.\n",
    "presets/Top-P.yaml": "top_p: 0.95\n",
    # The webui's fallback when a model has no chat template: the Alpaca layout.
    "instruction-templates/Alpaca.yaml": (
        "instruction_template: |-\n"
        "  {%- for m in messages -%}\n"
        "  {%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}\n"
        "  {%- elif m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}\n"
        "  {%- else -%}{{ '### Response:\\n' + m['content'] + '\\n\\n' }}{%- endif -%}\n"
        "  {%- endfor -%}\n"
        "  {%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}\n"),
}
USER_DATA_FOLDERS = ["extensions", "models", "loras", "instruction-templates", "logs", "cache", "grammars",
                     "mmproj", "image_models", "tools", "training/datasets", "training/formats", "users"]


def fill_in(webui: str) -> list[str]:
    """Write the missing files; returns the paths written, relative to ``webui``."""
    written = []

    def write(relative: str, text: str) -> None:
        path = os.path.join(webui, relative)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(relative)

    if not os.path.isdir(os.path.join(webui, "css")):
        for name in STYLE_SHEETS:
            write(os.path.join("css", name), "")
    for relative, text in USER_DATA.items():
        write(os.path.join("user_data", relative), text)
    os.makedirs(os.path.join(webui, "extensions"), exist_ok=True)  # server.py imports the package
    for folder in USER_DATA_FOLDERS:
        os.makedirs(os.path.join(webui, "user_data", folder), exist_ok=True)
    return written


if __name__ == "__main__":
    for path in fill_in(sys.argv[1]):
        print(f"stand-in written: {path}")
