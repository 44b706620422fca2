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
    reading raised. The thread starts on an item only once the one before was taken, so at most two are
    alive: the caller's and the next. ``close()`` (or leaving the ``with`` block) tells the thread to stop;
    it is not waited for (an interrupted run exits at once; the thread is a daemon): it finishes the item
    it is reading, then closes ``items``."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(1)  # taken to read an item, given back when the caller takes it
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
            self._slot.release()
            return value
        self._ended = StopIteration() if kind == "done" else value
        raise self._ended

    def _read(self) -> None:
        try:
            while self._take_slot():
                try:
                    item = next(self._items)
                except StopIteration:
                    self._queue.put(("done", None))
                    return
                self._queue.put(("item", item))
                del item
        except BaseException as e:  # raised again by the caller's next()
            self._queue.put(("error", e))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()  # a generator's own clean-up (open files), in the thread that ran it

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slot.acquire(timeout=0.1):
                return not self._stop.is_set()
        return False

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
