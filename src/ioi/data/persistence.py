"""Canonical serialisation, content hash, and Parquet / JSONL files for IOI datasets.

A saved dataset is one row per prompt plus a metadata header:

* Parquet: the rows as columns; the header as JSON under the schema-metadata key ``ioi``.
* JSONL: line 1 is ``{"meta": header}``, then one JSON object per prompt.

The content hash is SHA-256 over a canonical JSON (sorted keys, no whitespace) of the settings,
the flip history and, per prompt, its token ids, positions, slot words, labels, template id, place
and object. It does not include the package version, so it is comparable across versions that
produce the same data.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

FORMAT = "ioi-dataset"
FORMAT_VERSION = 1
META_KEY = b"ioi"


def canonical_json(payload) -> str:
    """Deterministic JSON: sorted keys, compact separators, ASCII only."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_hex(payload) -> str:
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}.get(
        path.suffix.lower()
    )
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"Cannot tell the file format of {str(path)!r}; use .parquet or .jsonl.")
    return fmt


def write_records(
    path: str | Path, meta: dict, records: Sequence[dict], fmt: str | None = None
) -> Path:
    """Write rows + header atomically (temporary file, then rename)."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(canonical_json({"meta": meta}) + "\n")
            for record in records:
                handle.write(canonical_json(record) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(list(records))
        table = table.replace_schema_metadata({META_KEY: canonical_json(meta).encode("ascii")})
        pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_records(path: str | Path, fmt: str | None = None) -> tuple[dict, list[dict]]:
    """Read ``(header, rows)`` written by :func:`write_records`."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    if fmt == "jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or "meta" not in json.loads(lines[0]):
            raise ValueError(f"{str(path)!r} is not an IOI dataset file (no metadata line).")
        return json.loads(lines[0])["meta"], [json.loads(line) for line in lines[1:] if line]
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{str(path)!r} is not an IOI dataset file (no 'ioi' metadata).")
    return json.loads(raw), table.to_pylist()


def check_header(meta: dict, path: str | Path) -> None:
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format {meta.get('format')!r} v{meta.get('format_version')!r}; "
            f"expected {FORMAT!r} v{FORMAT_VERSION}."
        )
