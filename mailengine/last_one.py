"""LastOne: a function of one key that remembers its last answer.

For texts made from the current second (log and event times, the Received field's date):
thousands of messages a second share one, and making it (strftime, format_datetime) cost a
tenth or more of the line. The key and its answer are one tuple, read and replaced whole, so
threads calling it at once each get the answer of their own key.
"""
from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_NONE = object()


class LastOne(Generic[K, V]):
    def __init__(self, make: Callable[[K], V]) -> None:
        self.make = make
        self._last: tuple = (_NONE, None)

    def __call__(self, key: K) -> V:
        last = self._last
        if last[0] != key:
            last = self._last = (key, self.make(key))
        return last[1]
