"""Command line: ``python -m extensions.llava ask ...`` and ``python -m extensions.llava convert ...``."""

import sys

from . import cli_ask
from .converter import convert

COMMANDS = {"ask": cli_ask.main, "convert": convert.main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m extensions.llava {ask,convert} ...\n"
              "  ask      answer a question about pictures with a LLaVA model (the bundled demo by default)\n"
              "  convert  turn an original or llava-hf LLaVA checkpoint into a folder the webui loads",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
