"""batchllm.io: reading Parquet/JSONL into RowBatches, prompts -> token ids, shards -> final Parquet."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.errors import JobError
from batchllm.io import jsonl, writer
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.io.source import RowBatch
from batchllm.io.writer import RunDir, result_table

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = [
    {"doc": 10 + i, "text": f"row {i} says hello", "lang": "en" if i % 2 else "fr", "score": i / 2}
    for i in range(10)
]


def write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def collect(source, rows_per_batch: int, start: int = 0) -> list[RowBatch]:
    return list(source.iter_batches(rows_per_batch=rows_per_batch, start=start))


def flat(batches: list[RowBatch]) -> tuple[list, list, list, list]:
    ids = [v for b in batches for v in b.ids.to_pylist()]
    texts = [t for b in batches for t in b.texts]
    errors = [e for b in batches for e in b.text_errors]
    keep = [r for b in batches if b.keep is not None for r in b.keep.to_pylist()]
    return ids, texts, errors, keep


# ------------------------------------------------------------------------------------------------ reader


@pytest.mark.parametrize("start", [0, 3, 4, 9, 10])
def test_parquet_and_jsonl_give_the_same_batches(tmp_path: Path, start: int) -> None:
    paths = [write_parquet(tmp_path / "in.parquet", ROWS), write_jsonl(tmp_path / "in.jsonl", ROWS, 5)]
    seen = []
    for path in paths:
        source = open_input(path, None, "text", "doc", ("lang", "score"))
        assert source.num_rows == 10 and source.columns == ["doc", "text", "lang", "score"]
        batches = collect(source, 3, start)  # 3 does not divide the row groups of 4: batches cross them
        assert [b.start for b in batches] == list(range(start, 10, 3))
        assert [len(b) for b in batches] == [min(3, 10 - s) for s in range(start, 10, 3)]
        assert all(b.ids.type == pa.int64() and b.keep.column_names == ["lang", "score"] for b in batches)
        seen.append(flat(batches))
    assert seen[0] == seen[1]
    ids, texts, errors, keep = seen[0]
    assert ids == [r["doc"] for r in ROWS[start:]] and texts == [r["text"] for r in ROWS[start:]]
    assert errors == [None] * (10 - start)
    assert keep == [{"lang": r["lang"], "score": r["score"]} for r in ROWS[start:]]


def test_row_indices_are_the_ids_without_an_id_column(tmp_path: Path) -> None:
    source = open_input(write_jsonl(tmp_path / "in.ndjson", ROWS), None, "text", None, ())
    batches = collect(source, 4, start=2)
    assert [b.ids.to_pylist() for b in batches] == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert batches[0].ids.type == pa.int64() and batches[0].keep is None


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_string_ids_pass_through(tmp_path: Path, fmt: str) -> None:
    rows = [{"key": f"k{i}", "text": "t"} for i in range(5)]
    path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"in.{fmt}", rows)
    (batch,) = collect(open_input(path, None, "text", "key", ()), 10)
    assert batch.ids.type == pa.string() and batch.ids.to_pylist() == [r["key"] for r in rows]


def test_null_missing_and_non_string_texts_become_row_errors(tmp_path: Path) -> None:
    rows = [{"text": "ok"}, {"text": None}, {"text": 5}, {"other": 1}, {"text": [1]}, {"text": "fine"}]
    batches = collect(open_input(write_jsonl(tmp_path / "in.jsonl", rows), None, "text", None, ()), 4)
    _, texts, errors, _ = flat(batches)
    assert texts == ["ok", None, None, None, None, "fine"]
    assert errors[:4] == [None, "text is null", "text is not a string (int64)", "text is null"]
    assert errors[4].startswith("text is not a string (list") and errors[5] is None

    path = write_parquet(tmp_path / "in.parquet", [{"text": 1}, {"text": None}])
    (batch,) = collect(open_input(path, None, "text", None, ()), 8)
    assert batch.texts == [None, None] and batch.text_errors == [
        "text is not a string (int64)",
        "text is null",
    ]


def test_jsonl_types_agree_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "_SCAN_ROWS", 2)  # validate in many small chunks, each typed on its own
    rows = [{"text": 7, "n": None, "day": "2024-01-02"}, {"text": "a", "n": 1, "day": "x"}]
    rows += [{"text": "b", "n": 2.5, "day": None}]
    source = open_input(write_jsonl(tmp_path / "in.jsonl", rows), None, "text", None, ("n", "day"))
    batches = collect(source, 1)
    assert [b.keep.schema for b in batches] == [pa.schema([("n", pa.float64()), ("day", pa.string())])] * 3
    assert flat(batches)[1:3] == ([None, "a", "b"], ["text is not a string (int64)", None, None])
    assert flat(batches)[3][0] == {"n": None, "day": "2024-01-02"}  # an ISO date stays a string


def test_a_keep_column_of_mixed_types_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "k": 1}, {"text": "b", "k": "x"}])
    with pytest.raises(JobError, match="'k'.*incompatible types"):
        open_input(path, None, "text", None, ("k",))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_unknown_columns_list_those_that_exist(tmp_path: Path, fmt: str) -> None:
    path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"in.{fmt}", ROWS)
    with pytest.raises(JobError, match=r"text column 'body' not found.*'doc', 'text', 'lang', 'score'"):
        open_input(path, None, "body", None, ())
    with pytest.raises(JobError, match="id column 'uid' not found"):
        open_input(path, None, "text", "uid", ())
    with pytest.raises(JobError, match="keep column 'topic' not found"):
        open_input(path, None, "text", None, ("lang", "topic"))


def test_keep_columns_must_not_clash_with_output_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "output": "b"}])
    with pytest.raises(JobError, match="'output' clash with output columns"):
        open_input(path, None, "text", None, ("output",))


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b" "c": 1}\n{"text": "d"}\n')
    with pytest.raises(JobError, match=r'line 3 is not valid JSON .*: \{"text": "b" "c": 1\}'):
        open_input(path, None, "text", None, ())
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(JobError, match="line 2 is not a JSON object"):
        open_input(path, None, "text", None, ())
    path.write_text('{"text": "a"}\n{"text": "' + "x" * 200 + "\n")
    with pytest.raises(JobError, match=r"line 2 .*x{60}\.\.\.$"):
        open_input(path, None, "text", None, ())


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not exist"):
        open_input(tmp_path / "nope.parquet", None, "text", None, ())
    (tmp_path / "in.csv").write_text("text\na\n")
    with pytest.raises(JobError, match="--format"):
        open_input(tmp_path / "in.csv", None, "text", None, ())
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(JobError, match="cannot read .* as Parquet"):
        open_input(tmp_path / "bad.parquet", None, "text", None, ())
    with pytest.raises(JobError, match="has no rows"):
        open_input(write_jsonl(tmp_path / "empty.jsonl", []), None, "text", None, ())


# ----------------------------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["row says hello, you are a helpful system user assistant"] * 20, trainer=trainer)
    # A BOS the plain path must add (the tokenizer's default) and the chat path must not add again.
    bpe.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[(specials[0], 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[2], chat_template=CHATML
    )


TEXTS = ["row 1 says hello", "", "ünïcode ✓ and spaces  ", "row 2"]


@pytest.mark.parametrize("prefix", [None, "You are a helpful system.\n"])
def test_plain_prompts_tokenize_like_the_tokenizer(tokenizer, prefix: str | None) -> None:
    batch = Prompter(tokenizer, prefix, chat=False).encode(TEXTS)
    assert batch.errors == [None] * len(TEXTS)
    for text, ids in zip(TEXTS, batch.token_ids):
        assert ids.dtype == np.int32 and ids[0] == 0  # the BOS
        assert ids.tolist() == tokenizer((prefix or "") + text)["input_ids"]


@pytest.mark.parametrize("prefix", [None, "You are a helpful system."])
def test_chat_prompts_tokenize_like_apply_chat_template(tokenizer, prefix: str | None) -> None:
    prompter = Prompter(tokenizer, prefix, chat=True)
    batch = prompter.encode(TEXTS)
    for text, rendered, ids in zip(TEXTS, prompter.render(TEXTS), batch.token_ids):
        messages = ([{"role": "system", "content": prefix}] if prefix is not None else []) + [
            {"role": "user", "content": text}
        ]
        expected = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids.tolist() == expected and ids[0] != 0  # no BOS added on top of the template
        assert rendered.startswith("<|im_start|>system\n" if prefix else "<|im_start|>user\n")
        assert rendered.endswith(f"{text}<|im_end|>\n<|im_start|>assistant\n")


def test_chat_needs_a_chat_template(tokenizer) -> None:
    no_template = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(JobError, match="chat template"):
        Prompter(no_template, None, chat=True)


def test_missing_and_rejected_texts_become_row_errors(tokenizer) -> None:
    prompter = Prompter(tokenizer, "p: ", chat=False)
    texts = ["good", None, "bad \ud800 surrogate", None, "also good"]
    batch = prompter.encode(texts, [None, "text is not a string (int64)", None, None, None])
    assert batch.errors[:2] == [None, "text is not a string (int64)"]
    assert batch.errors[2].startswith("tokenizer rejected the text: ") and batch.errors[3] == "text is null"
    assert [ids is None for ids in batch.token_ids] == [False, True, True, True, False]
    assert batch.token_ids[4].tolist() == tokenizer("p: also good")["input_ids"]
    assert Prompter(tokenizer, None, chat=True).encode([]).token_ids == []


# ------------------------------------------------------------------------------------------------ writer


def shard(
    rows: list[int], ids: pa.Array, keep: pa.Table | None = None, fail: set[int] = frozenset()
) -> pa.Table:
    take = pa.array(rows, type=pa.int64())
    return result_table(
        row_index=np.asarray(rows),
        ids=ids.take(take),
        keep=None if keep is None else keep.take(take),
        output=[None if r in fail else f"out {r}" for r in rows],
        prompt_tokens=[r + 1 for r in rows],
        output_tokens=np.asarray([0 if r in fail else 2 for r in rows]),
        cached_tokens=[0] * len(rows),
        finish_reason=["error" if r in fail else "stop" for r in rows],
        error=["boom" if r in fail else None for r in rows],
    )


def test_commit_and_assemble_round_trip(tmp_path: Path) -> None:
    ids = pa.array([f"id{i}" for i in range(7)])
    keep = pa.table({"lang": [f"l{i}" for i in range(7)]})
    run = RunDir(tmp_path / "run")
    run.ensure_writable(tmp_path / "out" / "result.parquet")
    for rows in ([5, 2], [6, 0, 4], [3, 1]):  # rows finish out of order
        run.commit(shard(rows, ids, keep, fail={4}))
    assert sorted(run.committed_row_indices().tolist()) == list(range(7))
    name = RunDir(tmp_path / "run").commit(shard([], ids, keep)).name  # the checksum is in the name
    assert re.fullmatch(r"shard-000003-[0-9a-f]{16}\.parquet", name)
    run.assemble(tmp_path / "out" / "result.parquet", num_rows=7)

    table = pq.read_table(tmp_path / "out" / "result.parquet")
    assert table.column_names == [*writer.OUTPUT_COLUMNS, "lang"]
    assert [f.type for f in table.schema][:7] == [pa.string(), pa.string()] + [pa.int32()] * 3 + [
        pa.string()
    ] * 2
    assert table.column("id").to_pylist() == ids.to_pylist()
    assert table.column("output").to_pylist() == [f"out {i}" if i != 4 else None for i in range(7)]
    assert table.column("prompt_tokens").to_pylist() == list(range(1, 8))
    assert table.column("finish_reason")[4].as_py() == "error" and table.column("error")[4].as_py() == "boom"
    assert table.column("lang").to_pylist() == keep.column("lang").to_pylist()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result.parquet"]  # no temp file left


def test_assemble_detects_missing_and_duplicated_rows(tmp_path: Path) -> None:
    ids = pa.array(np.arange(6))
    run = RunDir(tmp_path / "run")
    run.ensure_writable(tmp_path / "out.parquet")
    run.commit(shard([0, 1, 2], ids))
    run.commit(shard([2, 4], ids))
    with pytest.raises(
        RuntimeError, match=r"2 rows missing \(rows 3, 5\); 1 rows committed more than once \(rows 2\)"
    ):
        run.assemble(tmp_path / "out.parquet", num_rows=6)
    assert not (tmp_path / "out.parquet").exists()


def test_leftover_temp_files_are_ignored_and_removed(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.ensure_writable(tmp_path / "out.parquet")
    run.commit(shard([0, 1], pa.array([7, 8])))
    leftover = run.shards / ".shard-000001.parquet.999.tmp"
    leftover.write_bytes(b"half a parquet file")  # a commit a crash cut short
    assert run.committed_row_indices().tolist() == [0, 1]
    reopened = RunDir(tmp_path / "run")
    assert not leftover.exists() and reopened.committed_row_indices().tolist() == [0, 1]
    reopened.assemble(tmp_path / "out.parquet", num_rows=2)
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == [7, 8]


def test_unwritable_places_raise_job_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where a directory is needed: unwritable even for root
    with pytest.raises(JobError, match="cannot write the output"):
        RunDir(tmp_path / "run").ensure_writable(blocker / "out.parquet")
    with pytest.raises(JobError, match="cannot write to the run directory"):
        RunDir(blocker / "run").ensure_writable(tmp_path / "out.parquet")
    with pytest.raises(JobError, match="is a directory"):
        RunDir(tmp_path / "run").ensure_writable(tmp_path)


def test_a_full_disk_keeps_committed_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path / "run")
    run.ensure_writable(tmp_path / "out.parquet")
    run.commit(shard([0], pa.array([1, 2])))

    def full_disk(table: pa.Table, where) -> None:
        where.write(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.pq, "write_table", full_disk)
    with pytest.raises(JobError, match="disk is full"):
        run.commit(shard([1], pa.array([1, 2])))
    with pytest.raises(JobError, match="disk is full"):
        run.assemble(tmp_path / "out.parquet", num_rows=1)
    assert [re.sub("-[0-9a-f]{16}[.]", ".", p.name) for p in run.shards.iterdir()] == ["shard-000000.parquet"]
    assert not (tmp_path / "out.parquet").exists() and run.committed_row_indices().tolist() == [0]


def test_result_table_checks_its_columns() -> None:
    with pytest.raises(ValueError, match="finish_reason"):
        result_table(np.array([0]), pa.array([0]), None, ["x"], [1], [1], [0], ["eos"], [None])
    with pytest.raises(ValueError, match="differ in length"):
        result_table(np.array([0, 1]), pa.array([0]), None, ["x"], [1], [1], [0], ["stop"], [None])
