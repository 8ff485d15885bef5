"""A background thread that keeps a few batches ready while the compiled step runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


class Prefetcher:
    """Runs ``iterator`` in a background thread, ``size`` items ahead (so decoding and augmentation overlap
    the compiled step); exceptions are re-raised in the consumer; :meth:`close` stops the thread."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], size: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="shitu-train-data")
        self._thread.start()

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put((False, exc))
            return
        self._put((True, self._END))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
