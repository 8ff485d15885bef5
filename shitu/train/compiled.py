"""Compiled functions that successive training runs in one process can share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class CompiledSteps:
    """Compiled training steps and evaluation recognizers of recent runs, by everything that shapes them
    (model, architecture, classes, recipe and schedule, devices, batch and input size).

    Hold one and pass it to each :func:`shitu.train.trainer.train` call (a resume, a sweep point repeated,
    tests): an identical later run then skips tracing and compiling. Weights are never kept, only the
    compiled functions; at most ``size`` entries, the least recently used dropped first.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = int(size)
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry of ``key``, made by ``make()`` the first time."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = make()
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
