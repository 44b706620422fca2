"""A window is read and tokenized in parts (only one part's texts held at a time) and comes out as if read
whole; the next window is read in a thread while the engine runs this one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.job import windows as windows_module
from batchllm.job.read_ahead import ReadAhead
from batchllm.job.windows import read_windows


def _windows(path: Path, prompter: Prompter, window_rows: int, skip: np.ndarray) -> list:
    source = open_input(path, None, "text", None, ())
    return list(read_windows(source, prompter, window_rows, 8, 4096, skip))


def test_windows_read_in_parts_equal_windows_read_whole(tmp_path, tokenizer_dir, make_rows, monkeypatch):
    texts = [*make_rows(num_groups=3, rows_per_group=6, duplicates=3, seed=2), None, ""]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    skip = np.zeros(len(texts), bool)
    skip[[1, 8]] = True
    skip[14:21] = True  # the third window of 7 rows was committed before: it is not read again
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    whole = _windows(path, Prompter(tokenizer, "Rate this.\n", False), 7, skip)
    monkeypatch.setattr(windows_module, "CONVERT_ROWS", 3)  # parts of 3 rows, cut where windows end
    parts = _windows(path, Prompter(tokenizer, "Rate this.\n", False), 7, skip)
    assert [w.start for w in parts] == [w.start for w in whole] == [0, 7, 21]
    for a, b in zip(parts, whole, strict=True):
        assert a.errors == b.errors and np.array_equal(a.skip, b.skip) and a.ids.equals(b.ids)
        for x, y in zip(a.token_ids, b.token_ids, strict=True):
            assert (x is None and y is None) or np.array_equal(x, y)
    assert len(texts) == 23 and parts[0].errors[1] == "skipped"
    assert parts[2].errors == ["text is null", None]  # "" is a prompt: the prefix


def test_read_ahead_reads_one_window_ahead_and_raises_what_reading_raised():
    read: list[int] = []
    gate = threading.Event()

    def items():
        for i in range(3):
            read.append(i)
            yield i
        gate.wait(5)
        raise ValueError("bad row file")

    ahead = ReadAhead(items())
    assert next(ahead) == 0
    time.sleep(0.3)
    assert read == [0, 1]  # the next item only: the caller's and that one are all that is alive
    assert next(ahead) == 1
    gate.set()
    assert next(ahead) == 2
    with pytest.raises(ValueError, match="bad row file"):
        next(ahead)
    with pytest.raises(ValueError):  # and again, as a finished iterator would
        next(ahead)
    assert list(ReadAhead(iter(range(4)))) == [0, 1, 2, 3]


def test_a_closed_read_ahead_stops_its_thread_and_closes_the_items():
    produced: list[int] = []
    closed = threading.Event()

    def endless():
        i = 0
        try:
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    with ReadAhead(endless()) as ahead:
        assert next(ahead) == 0
    ahead._thread.join(5)
    assert not ahead._thread.is_alive() and closed.is_set() and len(produced) <= 2
