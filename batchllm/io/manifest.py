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
from batchllm.errors import JobError
from batchllm.io.source import InputSource

MANIFEST = "manifest.json"
HASH_BATCH_ROWS = 65536


def input_fingerprint(source: InputSource) -> dict:
    """Path, size, mtime, row count and a content hash of every row's id and text."""
    digest = hashlib.blake2b(digest_size=16)
    for batch in source.iter_batches(rows_per_batch=HASH_BATCH_ROWS):
        digest.update(json.dumps(batch.ids.to_pylist(), default=str).encode())
        for text, err in zip(batch.texts, batch.text_errors):
            digest.update(b"\x01" if text is None else b"\x00" + text.encode("utf-8", "surrogatepass"))
            digest.update((err or "").encode())
    stat = source.path.stat()
    return {
        "path": str(source.path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "rows": source.num_rows,
        "content_hash": digest.hexdigest(),
    }


def weights_fingerprint(model_path: Path, load_format: str) -> str:
    """Names, sizes and modification times of the config and weight files (cheap, no full read)."""
    if load_format == "dummy":
        return "dummy:" + _file_hash(model_path / "config.json")
    parts = []
    for f in sorted(model_path.glob("*.json")) + sorted(model_path.glob("*.safetensors")):
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
        "chat_template_hash": _text_hash(chat_template) if job.chat else None,
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job.sampling).items()},
    }


def check_or_write(run_dir: Path, fingerprint: dict, settings: dict) -> bool:
    """Writes the manifest of a new run; for an existing one, refuses any change. True: resuming."""
    path = run_dir / MANIFEST
    new = {"input": fingerprint, "settings": settings}
    if not path.exists():
        _write_json_atomic(path, new)
        return False
    old = json.loads(path.read_text())
    changes = _diff(old, new)
    if changes:
        raise JobError(
            f"the run directory {run_dir} belongs to a different job ({'; '.join(changes)}); "
            "re-run with --fresh to discard it, or pick another --run-dir"
        )
    return True


def _diff(old: dict, new: dict) -> list[str]:
    changes = []
    oi, ni = old["input"], new["input"]
    if oi["rows"] != ni["rows"] or oi["content_hash"] != ni["content_hash"]:
        changes.append(f"input changed: {oi['rows']} rows then, {ni['rows']} rows now, content differs")
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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
