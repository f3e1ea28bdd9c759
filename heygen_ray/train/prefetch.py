"""Read an iterator ahead in a background thread.

The training loop wraps its batch iterator in `Prefetch` as soon as it knows its data position, before
it builds DDP, attaches the tracker and counts FLOPs: the data set's start-up (Ray Data's split
coordinator, the first blocks) then runs beside that work instead of after it, and a step never waits
for a batch that could have been read while the previous step computed or while rank 0 validated.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, Optional, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = 0, 1, 2


class Prefetch(Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    Items arrive in order; an exception raised by ``source`` is raised by the ``next()`` that reaches
    it (the items before it arrive first); :meth:`close` stops the thread at its next item (it never
    blocks on a full queue for longer than ``poll_s``)."""

    def __init__(self, source: Iterator[T], depth: int = 2, *, name: str = "prefetch", poll_s: float = 0.1) -> None:
        if depth < 1:
            raise ValueError(f"Prefetch depth must be >= 1, got {depth}")
        self._queue: "queue.Queue[tuple]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._poll_s = poll_s
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        """Queue ``entry`` unless closed first; False once closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=self._poll_s)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as err:  # handed to the consumer, raised where it reads
            self._put((_ERROR, err))

    def __iter__(self) -> "Prefetch[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _END:
            raise StopIteration
        raise value

    def close(self, timeout: Optional[float] = 0.5) -> None:
        """Stop reading ahead; waits up to ``timeout`` s for the thread (it may be inside ``source``)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
