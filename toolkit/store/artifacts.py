"""Large arrays live in .npy files; the database holds a checksummed reference to each.

- `save_array` writes atomically (temporary file, then rename) and returns the sha256.
- `register_embedding_set` records a finished file in `embedding_sets` and its row order in
  `embedding_rows`; call it inside the stage's transaction.
- `load_embedding_set` verifies the checksum before returning the array: a file that no longer
  matches is an error, never silently reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit.errors import UserError
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.paths import sha256_file  # also reached as artifacts.sha256_file


def save_array(path: str | Path, array: np.ndarray) -> str:
    """Write `array` to `path` (.npy) atomically; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


@dataclass
class EmbeddingSet:
    embedding_set_id: int
    kind: str
    model: str
    path: str
    array: np.ndarray  # rows x dim
    item_ids: np.ndarray  # row_index -> image_id / caption_id


def register_embedding_set(
    con,
    *,
    kind: str,
    subset_id: int | None,
    model: str,
    pretrained: str | None,
    checkpoint_sha256: str | None,
    precision: str,
    config: dict,
    path: str | Path,
    array: np.ndarray,
    item_ids,
    sha256: str,
    run_id: int,
) -> int:
    """Insert an embedding_sets row and its embedding_rows; returns embedding_set_id."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if len(item_ids) != array.shape[0]:
        raise ValueError("item_ids must have one entry per row")
    row = con.execute(
        """
        INSERT INTO embedding_sets (kind, subset_id, model, pretrained, checkpoint_sha256, precision,
            config_json, config_hash, path, rows, dim, dtype, sha256, created_at, run_id)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        RETURNING embedding_set_id
        """,
        [
            kind,
            subset_id,
            model,
            pretrained,
            checkpoint_sha256,
            precision,
            db.canonical_json(config),
            db.config_hash(config),
            study_paths.to_stored(con, path),
            int(array.shape[0]),
            int(array.shape[1]),
            str(array.dtype),
            sha256,
            db.now(),
            run_id,
        ],
    ).fetchone()
    set_id = int(row[0])
    db.insert_df(
        con,
        "embedding_rows",
        pd.DataFrame(
            {
                "embedding_set_id": np.full(len(item_ids), set_id, dtype=np.int64),
                "row_index": np.arange(len(item_ids), dtype=np.int64),
                "item_id": item_ids,
            }
        ),
    )
    return set_id


def verify_file(path: str | Path, expected_sha256: str, what: str = "file", fix: str = "") -> None:
    path = Path(path)
    if not path.exists():
        raise UserError(f"The {what} {path} is missing. {fix}".strip())
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise UserError(
            f"The {what} {path} has changed since it was written (sha256 {actual[:12]}… but the database "
            f"recorded {expected_sha256[:12]}…). It will not be reused. {fix}".strip()
        )


def load_embedding_set(con, embedding_set_id: int, fix: str = "") -> EmbeddingSet:
    """Load a registered set after checking its checksum, shape and dtype."""
    row = con.execute(
        "SELECT kind, model, path, rows, dim, dtype, sha256 FROM embedding_sets WHERE embedding_set_id = ?",
        [embedding_set_id],
    ).fetchone()
    if row is None:
        raise UserError(f"No embedding set {embedding_set_id} in the database.")
    kind, model, path, rows, dim, dtype, sha = row
    path = str(study_paths.resolve(con, path))
    if not os.path.exists(path):
        fix = f"{study_paths.moved_hint(con, '--cache-dir')} {fix}"
    verify_file(path, sha, what=f"{kind} embedding file", fix=fix)
    array = np.load(path, allow_pickle=False)
    if array.shape != (rows, dim) or str(array.dtype) != dtype:
        raise UserError(
            f"The embedding file {path} has shape {array.shape} {array.dtype}, expected ({rows}, {dim}) {dtype}."
        )
    ids = con.execute(
        "SELECT item_id FROM embedding_rows WHERE embedding_set_id = ? ORDER BY row_index", [embedding_set_id]
    ).fetchnumpy()["item_id"]
    return EmbeddingSet(int(embedding_set_id), kind, model, path, array, np.asarray(ids, dtype=np.int64))
