"""Ingest benchmark: 5000 images and 25,000 captions in COCO JSON (tiny 8x8 images).

Target (issue #2): well under 10 s on 2 cores, with database inserts taking a small share.
Prints the total seconds, the seconds inside the write transaction, and their ratio.

    python benchmarks/ingest.py [--images 5000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from toolkit.store import db
from toolkit.store.study import open_study

ingest_mod = importlib.import_module("toolkit.ingest.stage")


def make_dataset(root: Path, n_images: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    tiny = Image.new("RGB", (8, 8), (120, 30, 200))
    images, anns = [], []
    ann_id = 1
    for i in range(n_images):
        image_id = 100_000 + i * 7
        name = f"{image_id:012d}.jpg"
        tiny.save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        for _ in range(5):
            words = " ".join(rng.choice(["a", "man", "dog", "red", "on", "the", "table", "riding"]) for _ in range(10))
            anns.append({"id": ann_id, "image_id": image_id, "caption": words})
            ann_id += 1
    rng.shuffle(anns)
    payload = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(payload))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        make_dataset(root, args.images)
        con = open_study(Path(tmp) / "bench.duckdb")
        in_tx = {"s": 0.0}
        original = db.transaction

        import contextlib

        @contextlib.contextmanager
        def timed(con_):
            t = time.perf_counter()
            with original(con_):
                yield con_
            in_tx["s"] += time.perf_counter() - t

        ingest_mod.db.transaction = timed
        t0 = time.perf_counter()
        res = ingest_mod.ingest(con, coco_root=root, num_images=args.images, seed=42)
        total = time.perf_counter() - t0
        ingest_mod.db.transaction = original
        con.close()
    print(f"ingested {res.num_images} images, {res.num_captions} captions")
    print(f"total seconds: {total:.2f} (target: well under 10 s)")
    print(f"write transaction seconds: {in_tx['s']:.2f} ({in_tx['s'] / total:.1%} of total)")


if __name__ == "__main__":
    main()
