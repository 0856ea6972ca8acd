"""The one base class of every error the extension reports to a user or a client."""


class LlavaError(ValueError):
    """Something the user can fix: the message says what and how, in plain words."""
