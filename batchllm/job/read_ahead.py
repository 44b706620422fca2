"""The next window read and tokenized in a thread while the engine runs this one.

Reading is Arrow, numpy and the Rust tokenizer, which mostly run without the GIL, so it overlaps the
engine's steps instead of stalling between windows. At most one window waits ahead: a run holds two
windows' token ids at most (the default ``--window`` takes a quarter of the memory available).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``items`` one ahead: ``next()`` gives what the thread has read (or waits for it) and raises what
    reading raised. ``close()`` (or leaving the ``with`` block) tells the thread to stop; it is not waited
    for (an interrupted run exits at once; the thread is a daemon)."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._ended: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="batchllm-read-ahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._ended is not None:
            raise self._ended
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._ended = StopIteration() if kind == "done" else value
        raise self._ended

    def _read(self) -> None:
        try:
            for item in self._items:
                if not self._put(("item", item)):
                    return
                del item
        except BaseException as e:  # raised again by the caller's next()
            self._put(("error", e))
            return
        self._put(("done", None))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
