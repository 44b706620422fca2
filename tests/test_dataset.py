"""Datasets of many files: a directory or a glob of Parquet/JSONL files read as one input, in sorted
order, with Hive partition values as string columns; ids unique across files; --output-dir."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crash_runs import run_killed
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.errors import JobError
from batchllm.io.reader import open_input

MAX_NEW = "6"


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_rows) -> dict:
    """reviews/date=.../part-*.{parquet,jsonl} (unsorted names on disk), and the same rows in one file."""
    root = tmp_path_factory.mktemp("dataset")
    texts = make_rows(num_groups=3, rows_per_group=5, duplicates=2, seed=7)
    layout = [("date=2026-12-01", "part-0.parquet", 5), ("date=2026-12-01", "part-1.jsonl", 3),
              ("date=2026-12-02", "part-0.parquet", 4), ("date=2026-12-02", "part-1.parquet", 0),
              ("date=2026-12-02", "part-2.parquet", len(texts) - 12)]  # fmt: skip
    rows, n = [], 0
    for directory, name, count in layout:
        part = [{"text": t, "key": f"k{n + i}"} for i, t in enumerate(texts[n : n + count])]
        if count == 0:
            pq.write_table(pa.table({"text": pa.array([], pa.string()), "key": pa.array([], pa.string())}),
                           (root / "reviews" / directory).joinpath(name))  # fmt: skip
        else:
            write(root / "reviews" / directory / name, part)
        rows += [r | {"date": directory.split("=")[1]} for r in part]
        n += count
    (root / "reviews" / "_SUCCESS").write_text("")
    (root / "reviews" / "date=2026-12-01" / ".part-9.parquet.crc").write_text("x")
    pq.write_table(pa.Table.from_pylist(rows), root / "single.parquet")
    return {"root": root, "rows": rows}


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--max-new-tokens", MAX_NEW, "--quiet"])
    return result.exit_code, result.output


def test_a_directory_reads_every_file_in_sorted_order_with_partition_columns(data):
    source = open_input(data["root"] / "reviews", None, "text", "key", ("date",))
    assert source.num_rows == len(data["rows"])
    batches = list(source.iter_batches(rows_per_batch=4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 1]  # windows cross file boundaries
    assert [b.start for b in batches] == [0, 4, 8, 12, 16]
    texts = [t for b in batches for t in b.texts]
    keys = [k for b in batches for k in b.ids.to_pylist()]
    dates = [d for b in batches for d in b.keep.column("date").to_pylist()]
    assert texts == [r["text"] for r in data["rows"]]
    assert keys == [r["key"] for r in data["rows"]] and dates == [r["date"] for r in data["rows"]]
    resumed = list(source.iter_batches(rows_per_batch=4, start=6))
    assert [t for b in resumed for t in b.texts] == texts[6:] and resumed[0].start == 6


def test_a_glob_picks_its_files(data):
    source = open_input(data["root"] / "reviews" / "date=*" / "*.parquet", None, "text", None, ("date",))
    assert source.num_rows == len(data["rows"]) - 3  # not the JSONL part
    ids = [i for b in source.iter_batches() for i in b.ids.to_pylist()]
    assert ids == list(range(source.num_rows))  # row indices across the dataset


def test_the_dataset_gives_the_single_file_output_and_output_dir_splits_it(data, tiny_models):
    root, model = data["root"], tiny_models["llama"]
    common = ("--model", model, "--id-column", "key", "--keep-columns", "date")
    code, out = cli(root / "single.parquet", *common, "--output", root / "single.out.parquet")
    assert code == 0, out
    expected = pq.read_table(root / "single.out.parquet").to_pylist()
    code, out = cli(root / "reviews", *common, "--output", root / "all.out.parquet")
    assert code == 0, out
    assert pq.read_table(root / "all.out.parquet").to_pylist() == expected
    code, out = cli(root / "reviews", *common, "--output-dir", root / "out")
    assert code == 0, out
    written = sorted(p.relative_to(root / "out").as_posix() for p in (root / "out").rglob("*") if p.is_file())
    assert written == ["date=2026-12-01/part-0.parquet", "date=2026-12-01/part-1.jsonl",
                       "date=2026-12-02/part-0.parquet", "date=2026-12-02/part-1.parquet",
                       "date=2026-12-02/part-2.parquet"]  # fmt: skip
    got = []
    for name in written:
        path = root / "out" / name
        got += [json.loads(x) for x in path.read_text().splitlines()] if name.endswith(".jsonl") else (
            pq.read_table(path).to_pylist())  # fmt: skip
    assert got == expected


def test_a_killed_dataset_run_resumes_to_the_same_files(data, tiny_models):
    root, model = data["root"], tiny_models["llama"]
    args = [root / "reviews", "--model", model, "--output-dir", root / "killed", "--checkpoint-rows", "2"]
    run_killed("run", *args, "--max-new-tokens", MAX_NEW, "--quiet", crash_at="commit:3")
    code, out = cli(*args)
    assert code == 0, out
    code, out = cli(root / "reviews", "--model", model, "--output-dir", root / "straight")
    assert code == 0, out
    for path in (root / "straight").rglob("*.parquet"):
        # cached_tokens says what this attempt's plan shared, which a resume changes; the rest is equal
        straight = pq.read_table(path).drop_columns(["cached_tokens"])
        resumed = pq.read_table(root / "killed" / path.relative_to(root / "straight"))
        assert resumed.drop_columns(["cached_tokens"]).equals(straight)
    report = json.loads(CliRunner().invoke(app, ["report", str(root / "killed.run"), "--json"]).output)
    assert report["attempts"] == 2 and report["rows_done"] == len(data["rows"])


def test_a_job_file_takes_a_glob_and_an_output_dir(data, tiny_models):
    root = data["root"]
    (root / "job.toml").write_text(
        f'input = "reviews/date=2026-12-02/*.parquet"\nmodel = "{tiny_models["llama"]}"\n'
        f'output-dir = "job_out"\nkeep-columns = ["date"]\nmax-new-tokens = 4\n'
    )
    result = CliRunner().invoke(app, ["run", "--job", str(root / "job.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(root / "job_out" / "part-2.parquet")  # named below the glob's fixed part
    assert set(table.column("date").to_pylist()) == {"2026-12-02"}


def test_ids_repeated_across_files_are_a_job_error(tmp_path):
    write(tmp_path / "d" / "a.parquet", [{"text": "x", "key": 1}, {"text": "y", "key": 2}])
    write(tmp_path / "d" / "b.jsonl", [{"text": "z", "key": 2}])
    with pytest.raises(JobError, match=r"id 2 of column 'key' appears 2 times .*a.parquet, b.jsonl"):
        open_input(tmp_path / "d", None, "text", "key", ())


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no input files"),
        ("missing_column", "text column 'text' not found in .*b.parquet"),
        ("types_differ", "column 'key' is string in .* but int64 in"),
        ("malformed_line", r"b.jsonl: line 2 is not valid JSON"),
    ],
)
def test_bad_datasets_are_one_line_job_errors(tmp_path, case, message):
    d = tmp_path / "d"
    d.mkdir()
    if case != "empty":
        write(d / "a.parquet", [{"text": "x", "key": "a"}])
    if case == "missing_column":
        write(d / "b.parquet", [{"body": "y", "key": "b"}])
    if case == "types_differ":
        write(d / "b.parquet", [{"text": "y", "key": 3}])
    if case == "malformed_line":
        (d / "b.jsonl").write_text('{"text": "y", "key": "b"}\n{"text": \n')
    with pytest.raises(JobError, match=message):
        open_input(d, None, "text", "key", ())


def test_the_cli_refuses_an_output_inside_the_input_directory_and_both_outputs(data, tiny_models):
    root, model = data["root"], tiny_models["llama"]
    code, out = cli(root / "reviews", "--model", model, "--output-dir", root / "reviews" / "out")
    assert code == 2 and "inside the input directory" in out and len(out.strip().splitlines()) == 1
    code, out = cli(
        root / "reviews", "--model", model, "--output", root / "o.parquet", "--output-dir", root / "o"
    )
    assert code == 2 and "not both" in out


def test_a_dataset_of_conversations_gives_the_single_file_output(tmp_path, tiny_models):
    lines = (Path(__file__).parent / "data" / "messages.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "d" / "b.jsonl").write_text("".join(lines[3:]))
    (tmp_path / "one.jsonl").write_text("".join(lines))
    common = ("--model", tiny_models["qwen2"], "--messages-column", "messages", "--id-column", "id")
    assert cli(tmp_path / "one.jsonl", *common, "--output", tmp_path / "one.parquet")[0] == 0
    assert cli(tmp_path / "d", *common, "--output", tmp_path / "d.parquet")[0] == 0
    assert pq.read_table(tmp_path / "d.parquet").equals(pq.read_table(tmp_path / "one.parquet"))
