"""One home for what a generation carries from hook to hook: per browser session, or per API request.

The webui calls the extension's hooks one after another, and what one hook learns a later one
needs: the history copy the message being sent is added to (history hook → chat input hook), the
picture picked in the LLaVA field, the state whose attachments the length hook counts, the short
references that stand for a prompt's pictures, the reply limit for the logits processor, the true
prompt lengths for an API answer's usage. ``Sessions.current`` finds the one record they live in:
the HTTP request being served, else the browser session of the UI event, else the single session
of a host without sessions (the 2023 webui).

A browser session lasts as long as the browser keeps it (the least recently used are forgotten
beyond a limit); a request's record lasts exactly as long as the request.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields


@dataclass(eq=False)
class Session:
    """One browser session's or one API request's record."""

    picked: object | None = None  # the Upload waiting for this session's next message
    embed_all: bool | None = None  # this session's choice; None follows the setting
    state: dict | None = None  # the webui's state of the generation being prepared
    history: dict | None = None  # the history copy that the message being sent is added to
    attached: int = 0  # pictures of the LLaVA field attached to that message
    references: dict = field(default_factory=dict)  # name → picture behind a prompt's llava-ref: source
    reply_limit: int | None = None  # the length the reply's sequence must end at
    prompt_lengths: list = field(default_factory=list)  # per generation of a request: (prompt tokens, context)
    refusal: str | None = None  # why the extension refused the last generation (a route may swallow the error)
    per_request: bool = False  # an HTTP request's record (else a browser session's)
    cache_salt: str | None = None  # an API client's own owner of earlier prompts (else the shared one)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, name: str):
        """The value of ``name``, handed over once: the field is back to its default after."""
        default = next(f for f in fields(self) if f.name == name)
        with self.lock:
            value = getattr(self, name)
            setattr(self, name, default.default_factory() if callable(default.default_factory) else default.default)
        return value

    def record_prompt(self, length: int, context: int) -> None:
        """A generation's true prompt length, for the request's ``usage`` (browser sessions keep none)."""
        if self.per_request:
            with self.lock:
                self.prompt_lengths.append((int(length), int(context)))

    def finish_generation(self) -> None:
        """The tokenizer hook has run: the state is no longer measured, and a browser session's
        references (one prompt's pictures) are no longer needed. A request's references serve all
        its generations and go with the request."""
        with self.lock:
            self.state = None
            if not self.per_request:
                self.references = {}


class Sessions:
    """Every session's record, looked up one way (``current``), and who owns what a generation leaves for
    later prompts (``owner``: its browser session, or the API's). ``on_forget(owner)`` is told when a
    browser session is forgotten, so that what it owns can go too."""

    API = "api"  # the owner of what API requests leave

    def __init__(self, limit: int = 256, on_forget=lambda owner: (0, 0)):
        self.limit = limit
        self._browsers: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._request: contextvars.ContextVar[Session | None] = contextvars.ContextVar("llava_request", default=None)
        self.on_forget = on_forget

    def current(self, browser_session: str | None = None) -> Session:
        """The HTTP request's record while one is served, else the browser session's (None: a host
        without sessions)."""
        request = self._request.get()
        return request if request is not None else self.browser(browser_session)

    def browser(self, key: str | None) -> Session:
        with self._lock:
            session = self._browsers.get(key)
            if session is None:
                session = self._browsers[key] = Session()
            self._browsers.move_to_end(key)
            while len(self._browsers) > self.limit:
                self.on_forget(self._browsers.popitem(last=False)[0])
            return session

    def __contains__(self, browser_session: str | None) -> bool:
        """Whether the browser session has a record (it has not ended)."""
        with self._lock:
            return browser_session in self._browsers

    def owner(self, browser_session: str | None = None):
        """Whose earlier prompts the current generation may reuse: its browser session's; over the API the
        requests' with the same ``cache_salt``, or without one the API's shared owner."""
        request = self._request.get()
        if request is None:
            return browser_session
        return self.API if request.cache_salt is None else (self.API, request.cache_salt)

    def end(self, browser_session: str | None) -> tuple[int, int]:
        """A browser session went (its page was closed): its record goes, and what it owns (``on_forget``'s
        answer: how many entries, their bytes)."""
        with self._lock:
            self._browsers.pop(browser_session, None)
        return self.on_forget(browser_session)

    def serving_request(self) -> bool:
        return self._request.get() is not None

    @contextlib.contextmanager
    def request(self, session: Session | None = None):
        """A record for the HTTP request served inside this block; gone when the block ends."""
        session = session or Session(per_request=True)
        token = self._request.set(session)
        try:
            yield session
        finally:
            self._request.reset(token)

    def __len__(self) -> int:
        return len(self._browsers)
