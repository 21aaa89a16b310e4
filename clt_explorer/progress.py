"""Progress bars that a listener can follow: every long loop of the library uses this ``tqdm``, so that a
process building a bundle can report what it is doing (the app shows it on its first start).

A listener is called with (description, done, total) whenever a bar refreshes (tqdm calls ``update`` at
most every ``mininterval`` while iterating); bars that are disabled report nothing.
"""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm as _tqdm

Listener = Callable[[str, float, float | None], None]
_listeners: list[Listener] = []


def listen(listener: Listener) -> None:
    """Call ``listener(description, done, total)`` on every refresh of every bar of this process."""
    _listeners.append(listener)


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.auto.tqdm
    """tqdm that tells the listeners how far it got."""

    def update(self, n: float | None = 1):
        shown = super().update(n)
        for listener in _listeners:
            listener(self.desc or "", self.n, self.total)
        return shown
