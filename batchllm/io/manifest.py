"""The run's manifest: what input and which output-changing settings a run directory belongs to.

Re-running the same command resumes the run; a run directory whose manifest disagrees with the new
command is refused with the list of what changed (``--fresh`` discards it instead).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from batchllm.config import JobSpec
from batchllm.errors import JobError, write_failure
from batchllm.io.source import InputSource, RowBatch

MANIFEST = "manifest.json"
HASH_BATCH_ROWS = 65536


def input_fingerprint(source: InputSource) -> dict:
    """Path, size, mtime, row count and a content hash of every row's id and text (conversation,
    params); with other columns read (keep, choices, score), a hash of their contents too."""
    digest = hashlib.blake2b(digest_size=16)
    columns = hashlib.blake2b(digest_size=16)
    for batch in source.iter_batches(rows_per_batch=HASH_BATCH_ROWS):
        _hash_keep(columns, batch)
        digest.update(json.dumps(batch.ids.to_pylist(), default=str).encode())
        for text, err in zip(batch.texts, batch.text_errors):
            digest.update(b"\x01" if text is None else b"\x00" + text.encode("utf-8", "surrogatepass"))
            digest.update((err or "").encode())
        if batch.params is not None:  # rows' own settings change their outputs too
            digest.update(json.dumps(batch.params, default=str, sort_keys=True).encode())
    stat = source.path.stat()
    found = {
        "path": str(source.path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "rows": source.num_rows,
        "content_hash": digest.hexdigest(),
    }
    if source.keep_columns:  # recorded only then, so run directories from before still resume
        found["columns_hash"] = columns.hexdigest()
    return found


def _hash_keep(digest: hashlib.blake2b, batch: RowBatch) -> None:
    """The batch's keep columns (the choices or score column among them), column by column."""
    if batch.keep is None:
        return
    for name in batch.keep.column_names:
        digest.update(name.encode() + b"\x00")
        digest.update(json.dumps(batch.keep.column(name).to_pylist(), default=str).encode())


def weights_fingerprint(model_path: Path, load_format: str) -> str:
    """Names, sizes and modification times of the config and weight files (cheap, no full read)."""
    if load_format == "dummy" and model_path.is_dir():
        return "dummy:" + _file_hash(model_path / "config.json")
    parts = []
    files = [model_path] if model_path.is_file() else []  # a GGUF file
    for f in files + sorted(model_path.glob("*.json")) + sorted(model_path.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


def output_settings(job: JobSpec, model_path: Path, chat_template: str | None, resolved: dict) -> dict:
    """Every setting that changes what a row's output is (and nothing that only changes speed).

    ``resolved``: the device, dtype, attention backend and deterministic flag this run resolves to
    (``engine.placement.resolved_settings``), so a resume on another device or dtype is refused."""
    return {
        "model": job.model,
        "weights": weights_fingerprint(model_path, job.engine.load_format),
        **resolved,
        "column": job.column,
        "id_column": job.id_column,
        "keep_columns": list(job.keep_columns),
        "prefix_hash": _text_hash(job.prefix),
        "chat": job.chat,
        "chat_template_hash": _text_hash(chat_template) if job.chat or job.messages_column else None,
        "messages_column": job.messages_column,
        "params_column": job.params_column,
        "sampling": _sampling(job),
        **({"explode_samples": True} if job.explode_samples else {}),  # absent: manifests before the flag
        "scoring": _scoring(job),
    }


def _sampling(job: JobSpec) -> dict:
    """The sampling settings; ``n`` and ``logprobs`` only when set, as a manifest written before they
    existed has neither (so such a run still resumes)."""
    settings = _plain(job.sampling)
    for key, default in (("n", 1), ("logprobs", 0)):
        if settings.get(key) == default:
            del settings[key]
    return settings


def _scoring(job: JobSpec) -> dict | None:
    """The scoring settings (None for a generating job, like a manifest written before scoring)."""
    if not job.scoring.enabled:
        return None
    return _plain(job.scoring)


def _plain(settings: object) -> dict:
    """A frozen settings dataclass as JSON-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def check_or_write(run_dir: Path, fingerprint: dict, settings: dict, has_results: bool = False) -> bool:
    """Writes the manifest of a new run; for an existing one, refuses any change. True: resuming.

    Shards without a manifest belong to a job nobody can name any more (the manifest was deleted, or a
    tool other than this one wrote them): they are refused, never adopted."""
    path = run_dir / MANIFEST
    new = {"input": fingerprint, "settings": settings}
    if not path.exists():
        if has_results:
            raise JobError(
                f"the run directory {run_dir} holds committed shards but no manifest ({MANIFEST}), so "
                "nothing says which job made them; re-run with --fresh to discard them, or pick another "
                "--run-dir"
            )
        try:
            _write_json_atomic(path, new)
        except OSError as e:
            raise write_failure("the manifest", path, e) from e
        return False
    changes = _diff(_read_manifest(path), new)
    if changes:
        raise JobError(
            f"the run directory {run_dir} belongs to a different job ({'; '.join(changes)}); "
            "re-run with --fresh to discard it, or pick another --run-dir"
        )
    return True


def _read_manifest(path: Path) -> dict:
    """The manifest, or a JobError naming it and how to recover (it is written atomically, so only a
    hand edit or a damaged disk leaves it unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
        old = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not JSON: {e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
        if isinstance(e, json.JSONDecodeError) and not text.strip():
            why = "it is empty"
    else:
        why = _shape_problem(old)
        if why is None:
            return old
    raise JobError(
        f"cannot read the manifest {path} ({why}); re-run with --fresh to discard the run directory "
        "and start over, or pick another --run-dir"
    )


def _shape_problem(old: object) -> str | None:
    if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
        return "no 'settings' object"
    fields = old.get("input")
    if not isinstance(fields, dict) or not {"rows", "content_hash", "path"} <= fields.keys():
        return "no 'input' object with rows, content_hash and path"
    return None


def _diff(old: dict, new: dict) -> list[str]:
    changes = []
    oi, ni = old["input"], new["input"]
    if oi["rows"] != ni["rows"] or oi["content_hash"] != ni["content_hash"]:
        changes.append(f"input changed: {oi['rows']} rows then, {ni['rows']} rows now, content differs")
    elif "columns_hash" in oi and oi["columns_hash"] != ni.get("columns_hash"):
        changes.append("input changed: the contents of its keep, choices or score columns differ")
    elif oi["path"] != ni["path"]:
        changes.append(f"input path changed from {oi['path']} to {ni['path']}")
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        a, b = old["settings"].get(key), new["settings"].get(key)
        if a != b:
            changes.append(f"{key} changed from {a!r} to {b!r}")
    return changes


def _text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() if path.exists() else "none"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
