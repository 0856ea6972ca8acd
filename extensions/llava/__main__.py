"""Command line: ``ask`` and ``convert``, run either way:

    python -m extensions.llava ask ...                 (from this repository's root)
    python user_data/extensions/llava ask ...          (from the webui's root, where a user installs it)

Run as a folder, this file is not in a package: the folder is made one first, as ``script.py`` does
when the webui loads it by its path, and taken off ``sys.path`` so that its modules (``settings``,
``stores``, ...) never stand in for other packages' imports of the same names."""

import importlib.util
import os
import sys
from pathlib import Path

if not __package__:
    _here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _here]
    __package__, __spec__ = "llava_extension", None
    if __package__ not in sys.modules:
        _spec = importlib.util.spec_from_file_location(__package__, _here / "__init__.py",
                                                       submodule_search_locations=[str(_here)])
        sys.modules[__package__] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[__package__])
    PROG = f"python {sys.argv[0].rstrip(os.sep)}"
else:
    PROG = "python -m extensions.llava"

from . import cli_ask  # noqa: E402
from .converter import convert  # noqa: E402

COMMANDS = {"ask": cli_ask.main, "convert": convert.main}
USAGE = (f"usage: {PROG} {{ask,convert}} ...\n"
         "  ask      answer a question about pictures with a LLaVA model (the bundled demo by default)\n"
         "  convert  turn an original or llava-hf LLaVA checkpoint into a folder the webui loads\n"
         f"Each command's own help: {PROG} ask --help, {PROG} convert --help")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:], prog=f"{PROG} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
