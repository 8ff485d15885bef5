"""Dynamic batching: preprocessed images of concurrent requests coalesced into one model call.

A request awaits :meth:`DynamicBatcher.embed` with its images (already decoded and resized, off the event
loop). One worker task takes the first waiting image, then keeps taking until ``max_batch`` images are
gathered or ``max_wait`` seconds have passed since the first, and runs the model on them in a dedicated
thread (one model call at a time; the event loop stays free). Each request gets its own rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future[np.ndarray]


class DynamicBatcher:
    """Runs ``embed_arrays`` (float32 [N, S, S, 3] → [N, D]) on batches of at most ``max_batch`` images.

    ``sizes``: the batch sizes the model runs without padding (the JAX embedder's buckets; None: any size).
    A gathered batch of another size below ``max_batch`` runs as the largest such size, and the images left
    over lead the next batch at once (a batch of 9 padded to 16 would waste 7 images of compute).

    ``on_batch(size, seconds)`` is called after each model call and ``on_queue(depth)`` when the number of
    waiting images changes (for metrics). Start with :meth:`start` inside the event loop; :meth:`stop` ends it.
    """

    def __init__(
        self,
        embed_arrays: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        max_wait: float = 0.005,
        sizes: Sequence[int] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be at least 1 and max_wait not negative")
        self._embed = embed_arrays
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.sizes = sorted({int(size) for size in sizes or () if 1 <= size <= max_batch} | {1}) if sizes else None
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_queue = on_queue or (lambda depth: None)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shitu-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._model_thread.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def embed(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Features of ``images`` (float32 [N, S, S, 3], or N arrays [S, S, 3], preprocessed): float32 [N, D]
        unit rows."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        loop = asyncio.get_running_loop()
        pending = [_Pending(image, loop.create_future()) for image in images]
        for item in pending:
            self._queue.put_nowait(item)
        self._on_queue(self._queue.qsize())
        rows = await asyncio.gather(*(item.future for item in pending))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carried: list[_Pending] = []
        while True:
            # images carried over from the last batch have waited already: take what is queued, wait no more
            batch = carried or [await self._queue.get()]
            deadline = time.monotonic() + (0.0 if carried else self.max_wait)
            carried = []
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self._on_queue(self._queue.qsize())
            batch = [item for item in batch if not item.future.done()]  # a cancelled request's images
            if not batch:
                continue
            if self.sizes is not None and len(batch) < self.max_batch and len(batch) not in self.sizes:
                fits = max(size for size in self.sizes if size <= len(batch))
                batch, carried = batch[:fits], batch[fits:]
            started = time.perf_counter()
            try:
                features = await loop.run_in_executor(self._model_thread, self._stack_and_embed, batch)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._on_batch(len(batch), time.perf_counter() - started)
            for item, row in zip(batch, features, strict=True):
                if not item.future.done():
                    item.future.set_result(row)

    def _stack_and_embed(self, batch: list[_Pending]) -> np.ndarray:
        # in the model thread: at 224 px a batch of 32 is 19 MB to copy, which the event loop should not wait on
        return self._embed(np.stack([item.image for item in batch]))


def warm_up(embed_arrays: Callable[[np.ndarray], np.ndarray], buckets: Any, size: int, max_batch: int) -> int:
    """Run the model once on zeros at every bucket size up to ``max_batch`` so XLA compiles each batch shape
    before traffic arrives; returns how many shapes were run."""
    sizes = sorted({b for b in buckets if b <= max_batch} | {min(max_batch, max(buckets))})
    for batch in sizes:
        embed_arrays(np.zeros((batch, size, size, 3), np.float32))
    return len(sizes)
