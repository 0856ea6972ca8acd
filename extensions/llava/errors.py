"""The one base class of every error the extension reports to a user or a client."""


# How a webui user runs the converter (the extension in user_data/extensions/llava, from the webui's root)
CONVERT_COMMAND = "`python user_data/extensions/llava convert SRC DST` from the webui's root"


class LlavaError(ValueError):
    """Something the user can fix: the message says what and how, in plain words."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (third-party messages can run for pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
