"""What the tools print around their figures. In quick mode (what CI runs) a first line says that the
figures check the script, not the speed or the accuracy; and the libraries print nothing between the rows
(transformers' load reports and progress bars, torch's deprecation warnings)."""

import warnings

QUICK_NOTE = ("quick mode: tiny sizes and few runs check that the script works; its figures say nothing "
              "about speed or accuracy (run it without --quick for those)")


def start(quick: bool) -> None:
    """Call first in a tool's main."""
    quiet_libraries()
    if quick:
        print(QUICK_NOTE, flush=True)


def quiet_libraries() -> None:
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*deprecat.*")
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def target(bar: str, quick: bool) -> str:
    """`` (target BAR)`` after a figure; nothing in quick mode, where the sizes make the figure meaningless."""
    return "" if quick else f" (target {bar})"
