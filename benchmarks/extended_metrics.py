"""Extended-positive metrics benchmark (issue 27): their cost on the COCO 5k test (25,000 x 5,000) as a ratio
to the plain R@K computation.

Builds a study whose subset is the 5k test split by its real COCO ids (the eccv_caption package's own lists:
5,000 images, 25,000 captions; rows written directly, no image files, since only the ids matter here), with
seeded random unit embeddings (--dim, 512 as ViT-B/32's). Then, for each direction:

- plain: `evaluate` (the exact ranks of every query, top-k, stored) plus reading recall_summary;
- extended: the rank of every positive (COCO's, ECCV Caption's and CxC's) of every query of the run, from the
  same scores (`rank_positives`: what `positives import` does for each existing run, and `evaluate` for a
  run made after an import), plus reading recall_extended;
- printed beside, not in the ratio: the two imports themselves (reading the package's JSON, keeping the pairs
  inside the subset, coverage), which happen once per study whatever the number of runs.

Prints each time and the ratio extended / plain (target: <= 2). Needs the eccv_caption package.

    python benchmarks/extended_metrics.py [--dim 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.retrieval.evaluate import evaluate  # noqa: E402
from toolkit.retrieval.positives import _package_dir, import_positives, rank_positives  # noqa: E402
from toolkit.store import artifacts, db  # noqa: E402
from toolkit.store.study import open_study  # noqa: E402


def build(con, folder: Path, dim: int) -> str:
    data_dir, _ = _package_dir()
    raw = json.loads((data_dir / "original_image_to_caption.json").read_text())
    i2c = {int(k): sorted(int(x) for x in v) for k, v in raw.items()}
    images = sorted(i2c)
    caps = [(c, i) for i in images for c in i2c[i]]
    with db.transaction(con):
        run_id = db.insert_run(con, "ingest", {"benchmark": "extended_metrics"}, db.now())
        sid = con.execute(
            "INSERT INTO subsets (name, seed, num_images, captions_per_image, source_file, source_sha256, "
            "image_root, split, config_hash, created_at, run_id) VALUES ('coco5k', NULL, ?, 5, 'none', 'none', "
            "'none', 'test', 'none', ?, ?) RETURNING subset_id",
            [len(images), db.now(), run_id],
        ).fetchone()[0]
        con.executemany(  # 5,000 rows once, for a benchmark
            "INSERT INTO images VALUES (?, ?, NULL, NULL, ?)", [(i, f"{i}.jpg", f"{i}.jpg") for i in images]
        )
        import pandas as pd

        db.insert_df(
            con, "subset_images", pd.DataFrame({"subset_id": sid, "image_id": images, "position": range(len(images))})
        )
        capdf = pd.DataFrame(caps, columns=["caption_id", "image_id"])
        capdf["position"] = capdf.groupby("image_id").cumcount()
        db.insert_df(con, "captions", capdf[["caption_id", "image_id"]].assign(text="a caption"))
        db.insert_df(con, "subset_captions", capdf.assign(subset_id=sid))
    rng = np.random.default_rng(0)
    img = rng.normal(size=(len(images), dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    row = {i: k for k, i in enumerate(images)}
    noise = rng.normal(size=(len(caps), dim)).astype(np.float32) * np.float32(12 / np.sqrt(dim))
    txt = img[[row[i] for _, i in caps]] + noise
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    for kind, arr, ids in (("image", img, images), ("text", txt, [c for c, _ in caps])):
        path = folder / f"{kind}.npy"
        sha = artifacts.save_array(path, arr)
        cfg = {"kind": kind, "benchmark": "extended_metrics"}
        with db.transaction(con):
            rid = db.insert_run(con, "embed", cfg, db.now(), model="seeded")
            artifacts.register_embedding_set(
                con, kind=kind, subset_id=sid, model="seeded", pretrained=None, checkpoint_sha256=None,
                precision="fp32", config=cfg, path=path, array=arr, item_ids=np.asarray(ids, dtype=np.int64),
                sha256=sha, run_id=rid,
            )  # fmt: skip
    return "coco5k"


def _drop_run(con, rrid: int) -> None:
    """Forget a run and every positive (a benchmark's own study): each direction is timed alone."""
    with db.transaction(con):
        for sql in (
            "DELETE FROM positive_ranks",
            "DELETE FROM extra_positives",
            "DELETE FROM positive_sets",
            f"DELETE FROM retrieval_ranks WHERE retrieval_run_id = {int(rrid)}",
            f"DELETE FROM retrieval_runs WHERE retrieval_run_id = {int(rrid)}",
        ):
            con.execute(sql)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dbp = Path(tmp) / "bench.duckdb"
        with open_study(dbp) as con:
            subset = build(con, Path(tmp), args.dim)
            # warm-up: BLAS threads, page cache of the embedding files
            _drop_run(con, evaluate(con, subset, device=args.device, topk=1).retrieval_run_id)
            rows = []
            for direction in ("text-to-image", "image-to-text"):
                t0 = time.perf_counter()
                res = evaluate(con, subset, device=args.device, direction=direction)  # no positives yet: plain
                con.execute("SELECT * FROM recall_summary WHERE retrieval_run_id = ?", [res.retrieval_run_id]).df()
                plain = time.perf_counter() - t0
                t0 = time.perf_counter()
                for source in ("eccv", "cxc"):  # once per study, whatever the runs: timed apart
                    import_positives(con, subset, source=source, rank_runs=False)
                imported = time.perf_counter() - t0
                t0 = time.perf_counter()
                rank_positives(con, res.retrieval_run_id)  # what import (or evaluate) does for each run
                ext = con.execute(
                    "SELECT * FROM recall_extended WHERE retrieval_run_id = ?", [res.retrieval_run_id]
                ).df()
                extended = time.perf_counter() - t0
                rows.append((direction, plain, extended, imported, len(ext)))
                _drop_run(con, res.retrieval_run_id)
    print(f"COCO 5k test by real ids: 5,000 images, 25,000 captions, dim {args.dim}, device {args.device}")
    for direction, plain, extended, imported, n in rows:
        print(
            f"{direction}: plain R@K (evaluate + recall_summary) {plain:.2f} s; extended (the rank of every "
            f"positive of the run + recall_extended, {n} rows) {extended:.2f} s; ratio {extended / plain:.2f} "
            f"(target <= 2); once per study beside it: importing eccv + cxc {imported:.2f} s"
        )
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
