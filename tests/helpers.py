"""Helpers shared by test files (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit import artifacts, db


def register_hand_built(
    con, path: str | Path, kind: str, array: np.ndarray, item_ids, subset_id: int, *,
    model: str = "hand-built", pretrained: str | None = None, config: dict | None = None,
) -> int:  # fmt: skip
    """Save `array` to `path` and register it as an embedding set of `kind`, in its own embed run."""
    cfg = config or {"kind": kind, "model": model, "path": str(path)}
    sha = artifacts.save_array(path, array)
    with db.transaction(con):
        run_id = db.insert_run(con, "embed", cfg, db.now(), model=model)
        return artifacts.register_embedding_set(
            con, kind=kind, subset_id=subset_id, model=model, pretrained=pretrained, checkpoint_sha256=None,
            precision="fp32", config=cfg, path=path, array=array,
            item_ids=np.asarray(item_ids, dtype=np.int64), sha256=sha, run_id=run_id,
        )  # fmt: skip
