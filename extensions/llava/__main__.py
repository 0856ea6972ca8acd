"""Command line: ``python -m extensions.llava ask ...`` and ``python -m extensions.llava convert ...``."""

import importlib
import sys

COMMANDS = {"ask": "cli_ask", "convert": "convert"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m extensions.llava {ask,convert} ...\n"
              "  ask      answer a question about pictures with a LLaVA model (the bundled demo by default)\n"
              "  convert  turn an original or llava-hf LLaVA checkpoint into a folder the webui loads",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{COMMANDS[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
