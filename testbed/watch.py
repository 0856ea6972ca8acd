"""Watching what the code under test does: which functions it calls, and what it does from many threads."""

from __future__ import annotations

import threading


def record_calls(monkeypatch, owner, name: str, note=lambda *args, **kwargs: args) -> list:
    """Each call of ``owner.name`` from now on (until ``monkeypatch`` undoes it) appends ``note(*args,
    **kwargs)`` to the list returned, then runs the real function."""
    calls, real = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(note(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def refuse_calls(monkeypatch, owner, name: str, why: str) -> None:
    """Any call of ``owner.name`` fails the test with ``why``."""
    def refused(*args, **kwargs):
        raise AssertionError(why)

    monkeypatch.setattr(owner, name, refused)


def run_in_threads(work, count: int) -> list[BaseException]:
    """``work(i)`` for i in range(count), each in its own thread, all at once; the errors they raised."""
    errors = []

    def run(i):
        try:
            work(i)
        except BaseException as error:  # reported to the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
